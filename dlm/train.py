"""The pretraining / SFT loop: data → sharded jitted step → metrics, eval, checkpoints, resume."""
import json
import math
import time

import jax
import numpy as np

from dlm import checkpoint as ckpt_lib
from dlm import data as data_lib
from dlm import diffusion
from dlm import metrics as metrics_lib
from dlm import model as model_lib
from dlm import sharding
from dlm import trainer as trainer_lib


class NonFiniteLossError(FloatingPointError):
  pass


def validate(cfg) -> None:
  """Cross-field checks with messages a user can act on (single-field ones live where used)."""
  d, t = cfg.data, cfg.train
  if cfg.diffusion.loss not in diffusion.LOSSES:
    raise ValueError(f'diffusion.loss={cfg.diffusion.loss!r}; valid: {diffusion.LOSSES}')
  if cfg.diffusion.schedule not in diffusion.SCHEDULES:
    raise ValueError(f'diffusion.schedule={cfg.diffusion.schedule!r}; valid: '
                     f'{diffusion.SCHEDULES}')
  for k in ('seq_len', 'batch_size'):
    if d[k] < 1:
      raise ValueError(f'data.{k}={d[k]} must be ≥ 1')
  if t.microbatches < 1 or d.batch_size % t.microbatches:
    raise ValueError(f'data.batch_size={d.batch_size} must be a multiple of '
                     f'train.microbatches={t.microbatches}')
  for k in ('num_steps', 'log_every', 'eval_every', 'checkpoint_every'):
    if t[k] < 1:
      raise ValueError(f'train.{k}={t[k]} must be ≥ 1')
  if not 0 <= t.ema_max_decay < 1:
    raise ValueError(f'train.ema_max_decay={t.ema_max_decay} must be in [0, 1)')


def pretrain_loss(dcfg, mask_id: int):
  """loss_fn for Trainer.compile_step: objective = batch mean of per-sequence losses (SPEC §3)."""

  def loss_fn(model, tokens_BxL, key, sample_index=0):
    del sample_index  # one Monte Carlo draw per sequence per step
    k_drop, k_noise = jax.random.split(key)
    apply = lambda xt_BxL: model(xt_BxL, dropout_key=k_drop)
    loss_B, ntok_B = diffusion.diffusion_loss(
        apply, tokens_BxL, k_noise, loss=dcfg.loss, schedule=dcfg.schedule, eps=dcfg.eps,
        mask_id=mask_id)
    return loss_B.mean(), {'loss_sum': loss_B.sum(), 'tokens': ntok_B.sum()}

  return loss_fn


def make_eval_step(trainer, dcfg, batch_shard):
  """Held-out loss with a fixed key per batch (comparable across steps); EMA weights if kept."""
  loss_fn = pretrain_loss(dcfg, trainer.mcfg.mask_id)

  def step(params, tokens_BxL, key):
    _, sums = loss_fn(trainer.model(params), tokens_BxL, key)
    return sums

  return jax.jit(step, in_shardings=(trainer.param_shardings, batch_shard, None),
                 out_shardings=sharding.replicated(trainer.mesh))


def setup(cfg, workdir: str, devices=None):
  """Everything a pretraining run needs, built from the config (also used by benchmarks/tests)."""
  validate(cfg)
  tok, train_src, eval_src = data_lib.prepare(cfg.data, workdir)
  mcfg = model_lib.config_from(cfg.model, tok.vocab_size + 1)
  if mcfg.num_embeddings < tok.vocab_size + 1 or mcfg.mask_id != tok.mask_id:
    raise ValueError(f'tokenizer has {tok.vocab_size} tokens + mask id {tok.mask_id}, but '
                     f'model.num_embeddings={mcfg.num_embeddings}, model.mask_id={mcfg.mask_id}; '
                     'set both to 0 / -1 to size the model from the tokenizer')
  mesh = sharding.make_mesh(cfg.sharding, devices)
  rules = cfg.sharding.rules
  sharding.check_batch(cfg.data.batch_size, mesh, rules, cfg.train.microbatches,
                       'data.batch_size')
  trainer = trainer_lib.Trainer(mcfg, cfg.train, mesh, rules, cfg.seed)
  return tok, train_src, eval_src, trainer


def run(cfg, workdir: str, devices=None) -> dict:
  """Trains to cfg.train.num_steps, resuming from the latest checkpoint in workdir."""
  tok, train_src, eval_src, trainer = setup(cfg, workdir, devices)
  d, t = cfg.data, cfg.train
  batch_shard = sharding.batch_sharding(trainer.mesh, trainer.rules)
  step_fn = trainer.compile_step(pretrain_loss(cfg.diffusion, trainer.mcfg.mask_id), batch_shard)
  eval_fn = make_eval_step(trainer, cfg.diffusion, batch_shard)
  eval_data = data_lib.eval_batches(eval_src, tok, seq_len=d.seq_len, global_batch=d.batch_size,
                                    num_batches=d.eval_batches)
  it = data_lib.make_train_iterator(train_src, tok, seq_len=d.seq_len,
                                    global_batch=d.batch_size, seed=cfg.seed)
  ckpt = ckpt_lib.Checkpointer(workdir, keep=t.keep_checkpoints)
  start = ckpt.latest_step() or 0
  if start:
    state, data_state, saved = ckpt.restore(start, trainer.abstract_state)
    if _as_json(saved['model']) != _as_json(cfg.model.to_dict()):
      raise ValueError(f'{workdir} holds a run with a different model config: {saved["model"]}')
    states = json.loads(data_state)
    if len(states) != jax.process_count():
      raise ValueError(f'checkpoint {start} was written by {len(states)} processes; the data '
                       f'position cannot be split over {jax.process_count()}')
    data_lib.restore_iterator(it, states[jax.process_index()])
    _log(f'resumed from step {start} in {ckpt.directory}')
  else:
    state = trainer.init_state()
  writer = metrics_lib.MetricsWriter(workdir, start)
  n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))
  _log(f'model {n_params:,} params on mesh {dict(trainer.mesh.shape)}; '
       f'{t.num_steps - start} steps to go')
  tokens_per_step = d.batch_size * d.seq_len
  eval_key = jax.random.key_data(jax.random.key(cfg.seed + 1))
  last = {}
  pending = None  # (step, device metrics): read one step late so the host never stalls the device
  t0, t0_step = time.time(), start

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
      tps = tokens_per_step * (s - t0_step) / max(now - t0, 1e-9)
      t0, t0_step = now, s
      last = {'train/loss': loss, 'train/grad_norm': float(m['grad_norm']),
              'train/tokens_per_sec': tps}
      writer.write(s, last)
      _log(f'step {s}/{t.num_steps} | loss {loss:.4f} | {tps:,.0f} tok/s')

  for s in range(start + 1, t.num_steps + 1):
    batch = sharding.global_batch(next(it), batch_shard)
    state, m = step_fn(state, batch)
    drain()
    pending = (s, m)
    if s % t.eval_every == 0 or s == t.num_steps:
      drain()
      params = state.ema if trainer.use_ema else state.params
      sums = [eval_fn(params, sharding.global_batch(b, batch_shard),
                      jax.random.fold_in(jax.random.wrap_key_data(eval_key), i))
              for i, b in enumerate(eval_data)]
      ev = float(sum(x['loss_sum'] for x in sums) / sum(x['tokens'] for x in sums))
      writer.write(s, {'eval/loss': ev})
      _log(f'step {s} | eval loss {ev:.4f}')
    if s % t.checkpoint_every == 0 or s == t.num_steps:
      drain()  # never write a checkpoint whose step produced a non-finite loss
      ckpt.save(s, state, json.dumps(all_iterator_states(it)), cfg.to_dict())
  drain()
  ckpt.wait()
  ckpt.close()
  writer.close()
  return last


def all_iterator_states(it) -> list[str]:
  """Every process's data position (each reads its own documents), gathered for one file."""
  mine = data_lib.iterator_state(it)
  if jax.process_count() == 1:
    return [mine]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  raw = np.frombuffer(mine.encode(), np.uint8)
  n = int(np.max(multihost_utils.process_allgather(np.array([raw.size]))))
  padded = np.zeros(n, np.uint8)
  padded[:raw.size] = raw
  rows = multihost_utils.process_allgather(padded)
  return [bytes(r).rstrip(b'\0').decode() for r in np.asarray(rows).reshape(-1, n)]


def _as_json(x):
  return json.loads(json.dumps(x))


def _log(msg: str):
  if jax.process_index() == 0:
    print(msg, flush=True)
