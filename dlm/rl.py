"""RL post-training of a diffusion LM on a verifiable task (SPEC §5–6).

One RL step: rollout (jitted sampler, temperature > 0) → rewards on the host (never executing model
output) → group-relative advantages → the configured objective → optimizer update(s).
`bgpo` accumulates ∇ of its per-sample terms with lax.scan inside ONE jitted update, so memory is
flat in n_t. Held-out greedy evaluation at step 0 and every `rl.eval_every`; checkpoints hold the
policy, optimizer, prompt-iterator position and config, and randomness is fold_in(key, step),
so a killed run restarted with the same command reproduces the uninterrupted run exactly.
"""
import time
from typing import Any, NamedTuple

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from dlm import checkpoint as ckpt_lib
from dlm import data as data_lib
from dlm import diffusion
from dlm import generate
from dlm import metrics as metrics_lib
from dlm import model as model_lib
from dlm import plots
from dlm import rl_objectives as rlo
from dlm import sampling
from dlm import sharding
from dlm import trainer as trainer_lib
from dlm.tasks import countdown
from dlm.tasks import countdown_tfds
from dlm.tokenizer import Tokenizer

TASKS = ('countdown',)
PROMPTS = ('d1', 'compact')


def validate(cfg) -> None:
  r = cfg.rl
  if cfg.task.name not in TASKS:
    raise ValueError(f'task.name={cfg.task.name!r}; valid: {TASKS}')
  if cfg.task.prompt not in PROMPTS:
    raise ValueError(f'task.prompt={cfg.task.prompt!r}; valid: {PROMPTS}')
  if r.objective not in rlo.OBJECTIVES:
    raise ValueError(f'rl.objective={r.objective!r}; valid: {rlo.OBJECTIVES}')
  for k in ('num_steps', 'num_prompts', 'group_size', 'num_mc', 'num_minibatches',
            'inner_updates', 'log_every', 'eval_every', 'checkpoint_every'):
    if r[k] < 1:
      raise ValueError(f'rl.{k}={r[k]} must be ≥ 1')
  if r.group_size < 2:
    raise ValueError('rl.group_size must be ≥ 2: advantages are relative within a group')
  responses = r.num_prompts * r.group_size
  if responses % (r.num_minibatches * cfg.train.microbatches):
    raise ValueError(f'rl.num_prompts × rl.group_size = {responses} must split into '
                     f'rl.num_minibatches={r.num_minibatches} × '
                     f'train.microbatches={cfg.train.microbatches}')
  if not 0 <= cfg.warmstart.demo_error < 1:
    raise ValueError(f'warmstart.demo_error={cfg.warmstart.demo_error} must be in [0, 1)')
  frac = cfg.warmstart.problem_fraction
  if not 0 < frac <= 1 or (cfg.warmstart.disjoint and frac == 1):
    raise ValueError(f'warmstart.problem_fraction={frac} must be in (0, 1], and < 1 with '
                     'warmstart.disjoint=True (RL needs problems of its own)')
  if not cfg.init.checkpoint and cfg.warmstart.steps == 0:
    raise ValueError(
        'no policy to post-train: this preset starts from a pretrained model. Pass '
        '--config.init.checkpoint=<dlm workdir with checkpoints> (a LLaDA-8B-Instruct import '
        'needs the LLaDA importer, dlm.convert, which is not implemented yet), or run the CPU '
        'pipeline with --config=configs/rl_countdown.py:cpu')


# ------------------------------------------------------------------------------------------------
# Task data


def prompt_text(cfg, p: countdown.Problem) -> str:
  return countdown.compact_prompt(p) if cfg.task.prompt == 'compact' else countdown.d1_prompt(p)


def task_problems(cfg, workdir: str):
  """(train, held-out) problems. Both splits are tfds data sources (generated, array_record)."""
  t = cfg.task
  held_out = countdown.load_d1_test(t.eval_file) if t.eval_file else None
  src = countdown_tfds.data_source(
      epath.Path(workdir) / 'tfds', 'train', train_size=t.train_size, test_size=t.test_size,
      train_seed=cfg.seed, test_seed=cfg.seed + 1, num_numbers=tuple(t.num_numbers), low=t.low,
      high=t.high, exclude=held_out or ())
  if held_out is None:
    test = countdown_tfds.data_source(
        epath.Path(workdir) / 'tfds', 'test', train_size=t.train_size, test_size=t.test_size,
        train_seed=cfg.seed, test_seed=cfg.seed + 1, num_numbers=tuple(t.num_numbers),
        low=t.low, high=t.high, exclude=())
    held_out = [countdown_tfds.problem(test[i]) for i in range(len(test))]
  return [countdown_tfds.problem(src[i]) for i in range(len(src))], held_out


def index_iterator(n: int, batch: int, seed: int) -> grain.DatasetIterator:
  """Endless checkpointable grain stream of shuffled index batches (reshuffled every epoch)."""
  ds = grain.MapDataset.range(n).shuffle(seed=seed).repeat(None).batch(batch)
  return iter(ds.to_iter_dataset())


def task_tokenizer(cfg, workdir: str, train) -> Tokenizer:
  """The tokenizer of the warm-started model: trained on the task's prompts and solutions."""
  path = epath.Path(workdir) / 'tokenizer.model'
  if path.exists():
    return Tokenizer.load(path)
  problems = train[:5000]
  texts = [f'{prompt_text(cfg, p)} {countdown.compact_solution(p)}' for p in problems]
  return Tokenizer.train(texts, cfg.warmstart.vocab_size, path)


# ------------------------------------------------------------------------------------------------
# Sequences


class Encoder:
  """Prompt/response ↔ fixed-shape token arrays: prompts left-padded to P, responses of R tokens.

  The training split is tokenized once up front (prompt ids, attention mask and the SFT target),
  so a step gathers rows by index instead of re-encoding text.
  """

  def __init__(self, cfg, tok: Tokenizer, train: list[countdown.Problem],
               held_out: list[countdown.Problem]):
    self.cfg, self.tok, self.R = cfg, tok, cfg.sampler.gen_length
    self.train = train
    self.P = max(len(tok.encode(prompt_text(cfg, p))) for p in train + held_out)
    self.train_ids, self.train_attend = self.prompts(train)
    self._train_targets = None

  def prompts(self, problems):
    rows = [self.tok.encode(prompt_text(self.cfg, p)) for p in problems]
    return generate.left_pad(rows, self.P)

  def targets(self):
    """Solution + EOS padding per training problem (LLaDA SFT), computed on first use. A seeded
    `warmstart.demo_error` fraction of problems get the lazy answer instead (a demonstrator
    that is often wrong), so the warm start writes it often and RL must learn not to."""
    if self._train_targets is None:
      resp = np.full((len(self.train), self.R), self.tok.eos_id, np.int32)
      lazy = (np.random.default_rng(self.cfg.seed + 13).random(len(self.train))
              < self.cfg.warmstart.demo_error)
      for i, p in enumerate(self.train):
        sol = self.tok.encode(countdown.lazy_answer(p) if lazy[i] else
                              countdown.compact_solution(p))
        if len(sol) >= self.R:
          raise ValueError(f'solution of {p} takes {len(sol)} tokens; raise '
                           f'sampler.gen_length above {self.R}')
        resp[i, :len(sol)] = sol
      self._train_targets = resp
    return self._train_targets

  def supervised(self, idx):
    """{tokens, maskable, attend} of training rows `idx`: prompt + solution + EOS padding."""
    tokens = np.concatenate([self.train_ids[idx], self.targets()[idx]], 1)
    maskable = np.zeros(tokens.shape, bool)
    maskable[:, self.P:] = True
    attend = np.concatenate([self.train_attend[idx], np.ones((len(idx), self.R), bool)], 1)
    return {'tokens': tokens, 'maskable': maskable, 'attend': attend}

  def completion(self, row_T) -> str:
    gen = [int(t) for t in row_T[self.P:]]
    return self.tok.decode(gen[:gen.index(self.tok.eos_id)] if self.tok.eos_id in gen else gen)


def rewards_of(enc: Encoder, tokens_BxT, problems) -> np.ndarray:
  return np.array([countdown.reward(enc.completion(row), p.numbers, p.target)
                   for row, p in zip(np.asarray(tokens_BxT), problems)], np.float32)


# ------------------------------------------------------------------------------------------------
# Warm start


def problem_split(cfg, n: int) -> tuple[np.ndarray, np.ndarray]:
  """Indices of the training problems read by (warm start, RL).

  The warm start reads a `warmstart.problem_fraction` of them; with `warmstart.disjoint`, RL reads
  the rest, so a policy that memorised its warm-start problems still meets new ones in RL. The
  split is a seeded random one: deduplicated generation makes later problems rarer and harder,
  so a split by position would hand RL a harder distribution than the held-out set.
  """
  k = max(1, int(n * cfg.warmstart.problem_fraction))
  if not cfg.warmstart.disjoint:
    return np.arange(k), np.arange(n)
  perm = np.random.default_rng(cfg.seed + 11).permutation(n)
  return np.sort(perm[:k]), np.sort(perm[k:])


def _sub_train_cfg(cfg, **over):
  tc = ml_collections.ConfigDict(cfg.train.to_dict())
  tc.update(over)
  return tc


def warm_start(cfg, workdir, enc: Encoder, mcfg, mesh, log) -> dict:
  """Supervised warm start with the prompt-aware masked-diffusion loss; resumable on its own."""
  w = cfg.warmstart
  wdir = str(epath.Path(workdir) / 'warmstart')
  tc = _sub_train_cfg(cfg, lr=w.lr, warmup_steps=w.warmup_steps, ema_max_decay=0.0,
                      microbatches=1)
  trainer = trainer_lib.Trainer(mcfg, tc, mesh, cfg.sharding.rules, cfg.seed)
  ckpt = ckpt_lib.Checkpointer(wdir, keep=2)
  rows = problem_split(cfg, len(enc.train))[0]
  it = index_iterator(len(rows), w.batch_size, cfg.seed + 7)
  start = ckpt.latest_step() or 0
  if start:
    state, data_state, _ = ckpt.restore(start, trainer.abstract_state)
    data_lib.restore_iterator(it, data_state)
  else:
    state = trainer.init_state()
  if start >= w.steps:
    ckpt.close()
    return state.params

  def loss_fn(model, batch, key, j):
    del j
    apply = lambda xt: model(xt, key_mask_BxL=batch['attend'])
    loss_B, ntok_B = diffusion.diffusion_loss(apply, batch['tokens'], key, loss=w.loss,
                                              mask_id=mcfg.mask_id, maskable_BxL=batch['maskable'])
    return loss_B.mean(), {'loss_sum': loss_B.sum(), 'tokens': ntok_B.sum()}

  shard = sharding.batch_shardings(enc.supervised(np.arange(w.batch_size)), mesh,
                                   cfg.sharding.rules)
  step = trainer.compile_step(loss_fn, shard)
  writer = metrics_lib.MetricsWriter(wdir, start)
  log(f'warm start: {w.steps - start} supervised steps ({w.loss}, batch {w.batch_size})')
  t0 = time.time()
  for s in range(start + 1, w.steps + 1):
    batch = jax.device_put(enc.supervised(rows[next(it)]), shard)
    state, m = step(state, batch)
    if s % w.log_every == 0 or s == w.steps:
      loss = float(m['loss_sum'] / m['tokens'])
      if not np.isfinite(loss):
        raise FloatingPointError(f'warm start: non-finite loss at step {s}')
      writer.write(s, {'warmstart/loss': loss})
      log(f'warm start {s}/{w.steps} | loss {loss:.4f} | {time.time() - t0:.0f}s')
    if s % w.checkpoint_every == 0 or s == w.steps:
      ckpt.save(s, state, data_lib.iterator_state(it), cfg.to_dict())
  ckpt.wait()
  ckpt.close()
  writer.close()
  return state.params


# ------------------------------------------------------------------------------------------------
# The RL loop


class Learner:
  """Jitted rollout, evaluation and update functions for one configuration."""

  def __init__(self, cfg, trainer: trainer_lib.Trainer, enc: Encoder):
    self.cfg, self.trainer, self.enc = cfg, trainer, enc
    r, mask_id = cfg.rl, trainer.mcfg.mask_id
    s = cfg.sampler
    self.rollout_cfg = sampling.SamplerConfig(
        strategy=s.strategy, gen_length=s.gen_length, steps=s.steps, block_length=s.block_length,
        temperature=s.temperature, remasking=s.remasking, threshold=s.threshold, cache=s.cache)
    self.eval_cfg = sampling.SamplerConfig(
        strategy='semi_ar', gen_length=s.gen_length, steps=cfg.eval_sampler.steps,
        block_length=s.block_length, temperature=0.0)
    self.responses = r.num_prompts * r.group_size
    self.off_policy = (r.num_minibatches > 1 if r.objective != 'diffu_grpo'
                       else r.inner_updates > 1)
    if r.objective == 'bgpo':
      loss, n = rlo.bgpo_loss(mask_id, self.off_policy), r.num_mc
    elif r.objective == 'vrpo_ol':
      loss, n = rlo.vrpo_ol_loss(mask_id, r.num_mc, self.off_policy), 1
    else:
      loss, n = rlo.diffu_grpo_loss(mask_id, r.clip_eps, r.kl_beta, r.prompt_mask_prob,
                                    self.off_policy), 1
    example = self.batch_template(self.responses // max(r.num_minibatches, 1)
                                  if r.objective != 'diffu_grpo' else self.responses)
    self.shard = sharding.batch_shardings(example, trainer.mesh, cfg.sharding.rules)
    self.step = trainer.compile_step(loss, self.shard, n)
    self.old_terms = jax.jit(self._old_terms)

  def batch_template(self, b):
    T, r = self.enc.P + self.enc.R, self.cfg.rl
    t = {'tokens_BxT': np.zeros((b, T), np.int32), 'maskable_BxT': np.zeros((b, T), bool),
         'attend_BxT': np.zeros((b, T), bool), 'adv_B': np.zeros((b,), np.float32),
         'row_key_Bx2': np.zeros((b, 2), np.uint32)}
    if self.off_policy and r.objective != 'diffu_grpo':
      t['ell_old_BxN'] = np.zeros((b, r.num_mc), np.float32)
    if r.objective == 'diffu_grpo':
      t['iteration'] = np.zeros((b,), np.int32)
      if self.off_policy:
        t['logp_old_BxT'] = np.zeros((b, T), np.float32)
      if r.kl_beta > 0:
        t['logp_ref_BxT'] = np.zeros((b, T), np.float32)
    return t

  def batch(self, tokens_BxT, attend_BxT, adv_B, key) -> dict:
    """The update's input: rollout tokens, response positions, advantages, per-response keys."""
    maskable = np.zeros(np.shape(tokens_BxT), bool)
    maskable[:, self.enc.P:] = True
    keys = jax.random.key_data(jax.random.split(key, len(adv_B)))
    return {'tokens_BxT': np.asarray(tokens_BxT), 'maskable_BxT': maskable,
            'attend_BxT': np.asarray(attend_BxT), 'adv_B': np.asarray(adv_B, np.float32),
            'row_key_Bx2': np.asarray(keys)}

  def sample(self, params, problems, key, cfg):
    ids, mask = self.enc.prompts(problems)
    tokens, _ = sampling.sample_params(self.trainer.graphdef, params, ids, mask, key, cfg=cfg)
    return tokens, np.concatenate([mask, np.ones((len(problems), self.enc.R), bool)], 1)

  def evaluate(self, params, problems) -> float:
    bs = self.cfg.eval_sampler.batch_size
    correct = []
    for i in range(0, len(problems), bs):
      chunk = problems[i:i + bs]
      padded = chunk + [chunk[-1]] * (bs - len(chunk))  # one shape: compiled once
      tokens, _ = self.sample(params, padded, jax.random.key(0), self.eval_cfg)
      correct.extend(rewards_of(self.enc, tokens, padded)[:len(chunk)] == 1.0)
    return float(np.mean(correct))

  def _old_terms(self, params, batch):
    """ℓ_old per (response, sample) — or per-token log p for diffu_grpo — before any update."""
    model = self.trainer.model(params)
    r, mask_id = self.cfg.rl, self.trainer.mcfg.mask_id
    if r.objective == 'diffu_grpo':
      return jax.lax.map(lambda k: rlo.grpo_token_logps(model, batch, k, mask_id,
                                                        r.prompt_mask_prob),
                         jnp.arange(r.inner_updates))
    ell = jax.lax.map(lambda j: rlo.elbo_term(model, batch, j, mask_id), jnp.arange(r.num_mc))
    return ell.T

  def update(self, state, batch, ref_params):
    """All optimizer updates of one rollout batch; returns (state, metrics of the last)."""
    r = self.cfg.rl
    if r.objective == 'diffu_grpo':
      if self.off_policy:
        batch['logp_old_KxBxT'] = np.asarray(self.old_terms(state.params, batch))
      if r.kl_beta > 0:
        batch['logp_ref_KxBxT'] = np.asarray(self.old_terms(ref_params, batch))
      for k in range(r.inner_updates):
        b = {n: v for n, v in batch.items() if not n.endswith('KxBxT')}
        b['iteration'] = np.full((self.responses,), k, np.int32)
        if self.off_policy:
          b['logp_old_BxT'] = batch['logp_old_KxBxT'][k]
        if r.kl_beta > 0:
          b['logp_ref_BxT'] = batch['logp_ref_KxBxT'][k]
        state, m = self.step(state, b)
      return state, m
    if not self.off_policy:
      return self.step(state, batch)
    batch['ell_old_BxN'] = np.asarray(self.old_terms(state.params, batch))
    rows = np.arange(self.responses).reshape(r.num_minibatches, -1)
    for mb in rows:
      state, m = self.step(state, jax.tree.map(lambda x: x[mb], batch))
    return state, m


class Setup(NamedTuple):
  train: list
  held_out: list
  enc: Encoder
  trainer: trainer_lib.Trainer
  learner: Learner
  init_params: Any  # from init.checkpoint, else None (the warm start provides them)


def build(cfg, workdir: str, devices=None) -> Setup:
  """Task data, tokenizer, model config, trainer and jitted functions for one RL config."""
  validate(cfg)
  r = cfg.rl
  train, held_out = task_problems(cfg, workdir)
  mesh = sharding.make_mesh(cfg.sharding, devices)
  init_params = None
  if cfg.init.checkpoint:
    tok, graphdef, init_params, _ = generate.load(cfg.init.checkpoint, use_ema=True)
    mcfg = nnx.merge(graphdef, init_params).cfg  # the checkpoint decides the architecture
  else:
    tok = task_tokenizer(cfg, workdir, train)
    mcfg = model_lib.config_from(cfg.model, tok.vocab_size + 1)
  enc = Encoder(cfg, tok, train, held_out)
  rows = r.num_prompts * r.group_size // (1 if r.objective == 'diffu_grpo' else r.num_minibatches)
  sharding.check_batch(rows, mesh, cfg.sharding.rules, cfg.train.microbatches,
                       'the responses of one update')
  trainer = trainer_lib.Trainer(mcfg, cfg.train, mesh, cfg.sharding.rules, cfg.seed)
  return Setup(train, held_out, enc, trainer, Learner(cfg, trainer, enc), init_params)


def run(cfg, workdir: str, devices=None) -> dict:
  """Warm start (if needed), then RL to rl.num_steps, resuming from workdir's checkpoints."""
  train, held_out, enc, trainer, learner, init_params = build(cfg, workdir, devices)
  r, log, mesh = cfg.rl, _log, trainer.mesh
  ckpt = ckpt_lib.Checkpointer(workdir, keep=r.keep_checkpoints)
  rows = problem_split(cfg, len(train))[1]
  it = index_iterator(len(rows), r.num_prompts, cfg.seed)
  start = ckpt.latest_step() or 0
  if start:
    state, data_state, _ = ckpt.restore(start, trainer.abstract_state)
    data_lib.restore_iterator(it, data_state)
    log(f'resumed RL from step {start}')
  else:
    if init_params is None:
      init_params = warm_start(cfg, workdir, enc, trainer.mcfg, mesh, log)
    state = jax.jit(lambda p: trainer_lib.TrainState(
        step=jnp.zeros((), jnp.int32), params=p, opt_state=trainer.optimizer.init(p), ema=None),
        out_shardings=trainer.state_shardings)(init_params)
  ref_params = None  # diffu_grpo's KL reference: the initial policy
  if r.kl_beta > 0:
    ref_params = (_initial_params(cfg, workdir, trainer, enc, mesh, log) if start
                  else jax.tree.map(jnp.copy, state.params))  # updates donate state's buffers
  writer = metrics_lib.MetricsWriter(workdir, start)
  log(f'RL ({r.objective}): {r.num_prompts} prompts × {r.group_size} responses, n_t {r.num_mc}, '
      f'{r.num_steps - start} steps; {len(held_out)} held-out problems')
  if start == 0:
    acc = learner.evaluate(state.params, held_out)
    writer.write(0, {'eval/accuracy': acc})
    log(f'step 0 | eval accuracy {acc:.3f} (warm start)')
  base = jax.random.key(cfg.seed + 2)
  last = {}
  for s in range(start + 1, r.num_steps + 1):
    key = jax.random.fold_in(base, s)
    k_roll, k_rows = jax.random.split(key)
    problems = [train[i] for i in rows[next(it)] for _ in range(r.group_size)]
    t0 = time.perf_counter()
    tokens, attend = learner.sample(state.params, problems, k_roll, learner.rollout_cfg)
    rewards = rewards_of(enc, tokens, problems)
    t1 = time.perf_counter()
    adv = rlo.group_advantages(rewards.reshape(r.num_prompts, r.group_size),
                               scale=r.objective != 'diffu_grpo').reshape(-1)
    batch = learner.batch(tokens, attend, adv, k_rows)
    state, m = learner.update(state, batch, ref_params)
    m = jax.device_get(m)
    t2 = time.perf_counter()
    if not np.isfinite(m['objective']) or not np.isfinite(m['grad_norm']):
      raise FloatingPointError(f'non-finite RL objective at step {s}; last good checkpoint: '
                               f'{ckpt.latest_step()}')
    last = {'rl/reward_mean': float(rewards.mean()), 'rl/accuracy': float((rewards == 1).mean()),
            'rl/objective': float(m['objective']), 'rl/grad_norm': float(m['grad_norm']),
            'rl/rollout_seconds': t1 - t0, 'rl/update_seconds': t2 - t1}
    if s % r.log_every == 0 or s == r.num_steps:
      writer.write(s, last)
      log(f'step {s}/{r.num_steps} | reward {last["rl/reward_mean"]:.3f} | '
          f'acc {last["rl/accuracy"]:.3f} | rollout {t1 - t0:.2f}s | update {t2 - t1:.2f}s')
    if s % r.eval_every == 0 or s == r.num_steps:
      acc = learner.evaluate(state.params, held_out)
      writer.write(s, {'eval/accuracy': acc})
      last['eval/accuracy'] = acc
      log(f'step {s} | eval accuracy {acc:.3f}')
    if s % r.checkpoint_every == 0 or s == r.num_steps:
      ckpt.save(s, state, data_lib.iterator_state(it), cfg.to_dict())
  ckpt.wait()
  ckpt.close()
  writer.close()
  if jax.process_index() == 0:
    path = plots.rl_curves(workdir)
    log(f'plots: {path}')
  return last


def _initial_params(cfg, workdir, trainer, enc, mesh, log):
  if cfg.init.checkpoint:
    return generate.load(cfg.init.checkpoint, use_ema=True)[2]
  return warm_start(cfg, workdir, enc, trainer.mcfg, mesh, log)


def _log(msg: str):
  if jax.process_index() == 0:
    print(msg, flush=True)
