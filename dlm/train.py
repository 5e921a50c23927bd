"""The one training loop: pretraining and SFT (the RL warm start is SFT).

data → sharded jitted step (NaN guard on every step, read one step late) → metrics, held-out
loss, checkpoints, and the one resume path (`Checkpointer.resume`: saved config checked first).
Modes differ only in their data: `pretrain` packs a text corpus (`dlm.data`); `sft` feeds a
task's (prompt, demonstration) pairs with the prompt never masked (`dlm.sft`), optionally
starting from a checkpoint's parameters (`init.checkpoint`).
"""
import hashlib
import json
import math
import time

import jax
from absl import logging
import ml_collections
import numpy as np

from dlm import checkpoint as ckpt_lib
from dlm import data as data_lib
from dlm import diffusion
from dlm import metrics as metrics_lib
from dlm import preemption
from dlm import sft
from dlm import sharding
from dlm import trainer as trainer_lib
from dlm import workdir as workdir_lib
from dlm.errors import ConfigError, MissingFileError, NonFiniteLossError
from dlm.tokenizer import Tokenizer

MODES = ('pretrain', 'sft')
_BUILTIN_MAX_VOCAB = 1000  # the generated demo corpus holds a few hundred distinct pieces


def validate(cfg) -> None:
  """Checks with messages a user can act on, before any corpus, tokenizer or device work."""
  d, t = cfg.data, cfg.train
  if cfg.mode not in MODES:
    raise ConfigError(f'mode={cfg.mode!r}; the training loop runs {MODES}')
  if cfg.diffusion.loss not in diffusion.LOSSES:
    raise ConfigError(f'diffusion.loss={cfg.diffusion.loss!r}; valid: {diffusion.LOSSES}')
  if cfg.diffusion.schedule not in diffusion.SCHEDULES:
    raise ConfigError(f'diffusion.schedule={cfg.diffusion.schedule!r}; valid: '
                      f'{diffusion.SCHEDULES}')
  if d.batch_size < 1:
    raise ConfigError(f'data.batch_size={d.batch_size} must be ≥ 1')
  if t.microbatches < 1 or d.batch_size % t.microbatches:
    raise ConfigError(f'data.batch_size={d.batch_size} must be a multiple of '
                      f'train.microbatches={t.microbatches}')
  for k in ('num_steps', 'log_every', 'eval_every', 'checkpoint_every'):
    if t[k] < 1:
      raise ConfigError(f'train.{k}={t[k]} must be ≥ 1')
  if not 0 <= t.ema_max_decay < 1:
    raise ConfigError(f'train.ema_max_decay={t.ema_max_decay} must be in [0, 1)')
  if cfg.mode == 'sft':
    sft.validate(cfg)
  else:
    if d.seq_len < 1:
      raise ConfigError(f'data.seq_len={d.seq_len} must be ≥ 1')
    check_vocabulary(cfg)


def check_vocabulary(cfg) -> None:
  """A model with a fixed vocabulary (the RADD presets: 50257 + mask) needs a tokenizer of that
  size, which only a real corpus or a given tokenizer provides: say so before building one."""
  m, d = cfg.model, cfg.data
  if m.num_embeddings <= 0:
    return
  if d.tokenizer:
    v = Tokenizer.load(d.tokenizer).vocab_size
    source = f'data.tokenizer={d.tokenizer} has {v} pieces'
  elif d.corpus == 'builtin' and m.num_embeddings - 1 > _BUILTIN_MAX_VOCAB:
    raise ConfigError(
        f'model.num_embeddings={m.num_embeddings} needs a {m.num_embeddings - 1}-piece tokenizer, '
        'but data.corpus=builtin is a small generated demo corpus. Pass a real text corpus '
        '(--config.data.corpus=text_files --config.data.text_files=/path/*.txt, or '
        '--config.data.corpus=tfds --config.data.tfds_name=NAME --config.data.tfds_data_dir=DIR) '
        f'and --config.data.vocab_size={m.num_embeddings - 1} or a tokenizer with '
        '--config.data.tokenizer=/path/to.model; or --config.model.num_embeddings=0 to size '
        'the model from the tokenizer')
  else:
    v, source = d.vocab_size, f'data.vocab_size={d.vocab_size}'
  if v + 1 != m.num_embeddings:
    raise ConfigError(f'{source}, but model.num_embeddings={m.num_embeddings} needs '
                      f'{m.num_embeddings - 1} (+1 mask); make them agree, or set '
                      'model.num_embeddings=0 to size the model from the tokenizer')


def diffusion_objective(dcfg, mask_id: int):
  """loss_fn for Trainer.compile_step: batch mean of per-sequence losses (SPEC §3), over the
  `maskable` positions (all when absent) with padding keys (`attend` False) ignored."""

  def loss_fn(model, batch, key, sample_index=0):
    del sample_index  # one Monte Carlo draw per sequence per step
    k_drop = jax.random.fold_in(key, 1)  # key itself draws the noise and the mask
    logp = lambda xt_BxL, x0_BxL: model.token_logp(
        xt_BxL, x0_BxL, key_mask_BxL=batch.get('attend'), dropout_key=k_drop)
    loss_B, ntok_B = diffusion.diffusion_loss(
        logp, batch['tokens'], key, loss=dcfg.loss, schedule=dcfg.schedule, eps=dcfg.eps,
        mask_id=mask_id, maskable_BxL=batch.get('maskable'))
    return loss_B.mean(), {'loss_sum': loss_B.sum(), 'tokens': ntok_B.sum()}

  return loss_fn


def make_eval_step(trainer, dcfg, batch_shard):
  """Held-out loss with a fixed key per batch (comparable across steps)."""
  loss_fn = diffusion_objective(dcfg, trainer.mcfg.mask_id)

  def step(params, batch, key):
    with trainer.activations():
      _, sums = loss_fn(trainer.model(params), batch, key)
    return sums

  return jax.jit(step, in_shardings=(trainer.param_shardings, batch_shard, None),
                 out_shardings=sharding.replicated(trainer.mesh))


def pretrain_data(cfg, workdir, share: tuple[int, int] = (0, 1)) -> data_lib.Data:
  """`share` = (index, count): this process reads block `index` of `count` of every batch."""
  d = cfg.data
  tok, train_src, eval_src = data_lib.prepare(d, workdir)
  index, count = share
  it = data_lib.make_train_iterator(train_src, tok, seq_len=d.seq_len, global_batch=d.batch_size,
                                    seed=cfg.seed, process_index=index, process_count=count,
                                    streams=data_lib.input_streams(d.batch_size))
  evals = data_lib.eval_batches(eval_src, tok, seq_len=d.seq_len, global_batch=d.batch_size,
                                num_batches=d.eval_batches, process_index=index,
                                process_count=count)
  return data_lib.Data(tok, it, lambda x: {'tokens': x}, [{'tokens': b} for b in evals],
                  d.batch_size * d.seq_len)


# What the run decides about a model it loads: how to run it, and which LoRA adapters it trains.
RUN_MODEL_KEYS = ('remat', 'dtype', 'head_chunk', 'attention', 'lora')


def with_model(cfg, model_section: dict):
  """A copy of cfg whose model section is `model_section` (the architecture a checkpoint
  decides), so the saved config describes the model actually trained; `RUN_MODEL_KEYS`
  (rematerialisation, compute dtype, head chunks, attention kernel, LoRA adapters) stay the run
  config's."""
  c = ml_collections.ConfigDict(cfg.to_dict())
  section = dict(model_section)
  section.update({k: cfg.model[k] for k in RUN_MODEL_KEYS if k in cfg.model})
  c.model = ml_collections.ConfigDict(section)
  c.lock()
  return c


def setup(cfg, workdir: str, devices=None):
  """(cfg, start step, data, trainer, checkpointer, init) of a run. Checks come first (config,
  mesh, the saved config of a run to resume), then the data and the model."""
  validate(cfg)
  mesh = sharding.make_mesh(cfg.sharding, devices)
  rules = cfg.sharding.rules
  sharding.check_batch(cfg.data.batch_size, mesh, rules, cfg.train.microbatches,
                       'data.batch_size')
  init = None  # (step, saved config) of the checkpoint SFT starts from
  if cfg.mode == 'sft' and cfg.init.checkpoint:
    init = workdir_lib.latest_config(cfg.init.checkpoint)
    if init is None:
      raise MissingFileError(f'init.checkpoint={cfg.init.checkpoint} holds no checkpoint')
    cfg = with_model(cfg, init[1]['model'])  # the checkpoint decides the architecture
  ckpt = ckpt_lib.Checkpointer(workdir, keep=cfg.train.keep_checkpoints)
  try:
    start = ckpt.resume_step(cfg.to_dict())
    share = sharding.share(mesh, rules, cfg.data.batch_size)  # this process's rows of a batch
    if cfg.mode == 'sft':
      tok = workdir_lib.load_tokenizer(cfg.init.checkpoint) if init else None
      data = sft.prepare(cfg, workdir, tok, share)
    else:
      data = pretrain_data(cfg, workdir, share)
    mcfg = workdir_lib.model_config(cfg.model, data.tokenizer)
    trainer = trainer_lib.Trainer(mcfg, cfg.train, mesh, rules, cfg.seed)
  except BaseException:  # e.g. a missing corpus: orbax's threads must not outlive the error
    ckpt.close()
    raise
  return cfg, start, data, trainer, ckpt, init


def log_rows(what: str, step: int, block: slice, rows) -> None:
  """Debug record (`--v=1`): the rows of the global batch this process read, one digest per
  row; comparing the records of the processes shows who read what (launch/local.sh)."""
  if logging.vlog_is_on(1):
    digests = [hashlib.sha1(np.ascontiguousarray(r).tobytes()).hexdigest()[:12] for r in rows]
    logging.vlog(1, 'dlm-rows %s', json.dumps({
        'what': what, 'process': jax.process_index(), 'step': step,
        'rows': [block.start, block.stop], 'digests': digests}))


def run(cfg, workdir: str, devices=None) -> dict:
  """Trains to cfg.train.num_steps, resuming from the latest checkpoint in workdir."""
  cfg, start, data, trainer, ckpt, init = setup(cfg, workdir, devices)
  t, log = cfg.train, metrics_lib.log
  if start:
    items, data_state = ckpt.restore(start, trainer.abstract_items())
    state = trainer.from_items(items)
    data_lib.restore_process_iterator(data.iterator, data_state)
    log(f'resumed from step {start} in {ckpt.directory}')
  elif init:
    state = trainer.state_from_params(workdir_lib.base_params(workdir_lib.load(
        cfg.init.checkpoint, init[0], cfg.init.use_ema, mesh=trainer.mesh)))
  else:
    state = trainer.init_state()
  writer = metrics_lib.MetricsWriter(workdir, start)
  n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))
  log(f'{cfg.mode}: model {n_params:,} params on mesh {dict(trainer.mesh.shape)}; '
      f'{max(t.num_steps - start, 0)} steps to go')
  flops_per_token = metrics_lib.model_flops_per_token(
      trainer.mcfg, data.tokens_per_step // cfg.data.batch_size)
  eval_key = jax.random.key_data(jax.random.key(cfg.seed + 1))
  step_fn = eval_fn = batch_shard = None
  last = {}
  pending = None  # (step, device metrics): read one step late so the host never stalls the device
  t0, t0_step = time.time(), start
  block = sharding.process_rows(trainer.mesh, trainer.rules, cfg.data.batch_size)

  def drain():
    nonlocal pending, t0, t0_step, last
    if pending is None:
      return
    s, m = pending
    pending = None
    m = jax.device_get(m)
    loss = float(m['loss_sum'] / m['tokens'])
    if not np.isfinite(loss) or not np.isfinite(m['grad_norm']):
      raise NonFiniteLossError(
          f'non-finite loss ({loss}) or gradient norm ({m["grad_norm"]}) at step {s}; the run '
          f'stopped without saving. Last good checkpoint: {ckpt.latest_step()}. Try a lower '
          'train.lr or a longer train.warmup_steps.')
    if s % t.log_every == 0 or s in (1, t.num_steps):
      now = time.time()
      tps = data.tokens_per_step * (s - t0_step) / max(now - t0, 1e-9)
      t0, t0_step = now, s
      last = {'train/loss': loss, 'train/grad_norm': float(m['grad_norm']),
              'train/tokens_per_sec': tps}
      util = metrics_lib.mfu(tps, flops_per_token, trainer.mesh.size)
      if util is not None:  # accelerators only: the per-chip peak table has no CPUs
        last['train/mfu'] = util
      writer.write(s, last)
      log(f'{cfg.mode} step {s}/{t.num_steps} | loss {loss:.4f} | {tps:,.0f} tok/s'
          + (f' | MFU {util:.1%}' if util is not None else ''))

  stop = False
  with preemption.Stopper(t.checkpoint_minutes) as stopper:
    for s in range(start + 1, t.num_steps + 1):
      local = data.to_batch(next(data.iterator))
      log_rows(cfg.mode, s, block, local['tokens'])
      if step_fn is None:  # shardings follow the batch's keys and ranks
        batch_shard = sharding.batch_shardings(local, trainer.mesh, trainer.rules)
        step_fn = trainer.compile_step(diffusion_objective(cfg.diffusion, trainer.mcfg.mask_id),
                                       batch_shard)
        eval_fn = make_eval_step(trainer, cfg.diffusion, batch_shard)
      state, m = step_fn(state, sharding.global_batch(local, batch_shard))
      drain()
      pending = (s, m)
      if s % t.eval_every == 0 or s == t.num_steps:
        drain()
        params = state.ema if trainer.use_ema else state.params
        sums = [eval_fn(params, sharding.global_batch(b, batch_shard),
                        jax.random.fold_in(jax.random.wrap_key_data(eval_key), i))
                for i, b in enumerate(data.eval_batches)]
        ev = float(sum(x['loss_sum'] for x in sums) / sum(x['tokens'] for x in sums))
        writer.write(s, {'eval/loss': ev})
        log(f'{cfg.mode} step {s} | eval loss {ev:.4f}')
      stop, due = stopper.poll(s)  # a signal (preemption) or the clock: save this step
      if stop or due or s % t.checkpoint_every == 0 or s == t.num_steps:
        drain()  # never write a checkpoint whose step produced a non-finite loss
        writer.flush()  # gs://: rows up to a checkpoint are stored with it
        ckpt.save(s, trainer.to_items(state), data_lib.all_iterator_states(data.iterator),
                  cfg.to_dict())
        stopper.saved()
      if stop:
        break
  drain()
  ckpt.wait()
  ckpt.close()
  writer.close()
  if stop:
    raise preemption.Stopped(f'{cfg.mode}: stopped by {stopper.name} after step {s}; checkpoint '
                             f'{s} written to {ckpt.directory}. Run the same command to resume.')
  return last
