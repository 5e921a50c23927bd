"""RL post-training of a diffusion LM on a verifiable task (SPEC §5–6): the learner and the loop.

One RL step: rollout (jitted sampler, temperature > 0) → rewards on the host (the task's, never
executing model output) → group-relative advantages → the configured objective → optimizer
update(s). `bgpo` accumulates ∇ of its per-sample terms with lax.scan inside ONE jitted update, so
memory is flat in n_t. Any registered task works (`task.name`, `dlm.tasks`).

The policy starts from a checkpoint's parameters alone (`init.checkpoint`, any dlm workdir), or
from a supervised warm start that is an SFT run of the one training loop in `<workdir>/warmstart`.
Held-out greedy evaluation at step 0 and every `rl.eval_every`; checkpoints hold the policy,
optimizer, prompt-iterator position and config; resuming goes through the one resume path, and
randomness is fold_in(key, step), so a killed run restarted with the same command reproduces the
uninterrupted run exactly.
"""
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from dlm import checkpoint as ckpt_lib
from dlm import data as data_lib
from dlm import evaluate
from dlm import metrics as metrics_lib
from dlm import plots
from dlm import preemption
from dlm import rl_objectives as rlo
from dlm import sampling
from dlm import sft
from dlm import sharding
from dlm import task_tokens
from dlm import train as train_lib
from dlm import trainer as trainer_lib
from dlm import workdir as workdir_lib
from dlm.errors import ConfigError, NonFiniteLossError


def validate(cfg) -> None:
  r = cfg.rl
  if r.objective not in rlo.OBJECTIVES:
    raise ConfigError(f'rl.objective={r.objective!r}; valid: {rlo.OBJECTIVES}')
  for k in ('num_steps', 'num_prompts', 'group_size', 'num_mc', 'num_minibatches',
            'inner_updates', 'log_every', 'eval_every', 'checkpoint_every'):
    if r[k] < 1:
      raise ConfigError(f'rl.{k}={r[k]} must be ≥ 1')
  if r.group_size < 2:
    raise ConfigError('rl.group_size must be ≥ 2: advantages are relative within a group')
  responses = r.num_prompts * r.group_size
  if responses % (r.num_minibatches * cfg.train.microbatches):
    raise ConfigError(f'rl.num_prompts × rl.group_size = {responses} must split into '
                      f'rl.num_minibatches={r.num_minibatches} × '
                      f'train.microbatches={cfg.train.microbatches}')
  if not cfg.init.checkpoint and cfg.warmstart.steps == 0:
    raise ConfigError(
        'no policy to post-train: this preset starts from a pretrained model. Pass '
        '--config.init.checkpoint=<dlm workdir with checkpoints>, e.g. LLaDA-8B-Instruct '
        'imported by python -m dlm.convert --src=<its folder> --out=<workdir> (README: "Use '
        'LLaDA-8B-Instruct"), or run the CPU pipeline with --config=configs/rl_countdown.py:cpu')
  sft.validate(sft_config(cfg, ''))


def sft_config(cfg, workdir) -> ml_collections.ConfigDict:
  """The warm start as a run of the one training loop: SFT on the task's demonstrations with
  the RL config's model, task, seed and mesh, and the `warmstart` section's settings; it reads
  the task data the RL run prepared in `<workdir>/tfds`."""
  w = cfg.warmstart
  c = ml_collections.ConfigDict()
  c.mode, c.seed = 'sft', cfg.seed
  c.model = cfg.model.to_dict()
  c.task = cfg.task.to_dict()
  c.init = {'checkpoint': '', 'use_ema': False}
  c.diffusion = {'loss': w.loss, 'schedule': 'loglinear', 'eps': 1e-3}
  c.data = {'batch_size': w.batch_size, 'eval_batches': 1,
            'tfds_data_dir': str(epath.Path(workdir) / 'tfds')}
  c.train = {**cfg.train.to_dict(), 'lr': w.lr, 'warmup_steps': w.warmup_steps,
             'ema_max_decay': 0.0, 'microbatches': 1, 'num_steps': w.steps,
             'log_every': w.log_every, 'eval_every': max(w.steps, 1),
             'checkpoint_every': w.checkpoint_every,
             'checkpoint_minutes': cfg.rl.checkpoint_minutes, 'keep_checkpoints': 2}
  c.sft = {'response_length': cfg.sampler.gen_length, 'vocab_size': w.vocab_size,
           'demo_error': w.demo_error, 'problem_fraction': w.problem_fraction,
           'disjoint': w.disjoint}
  c.sharding = cfg.sharding.to_dict()
  c.lock()
  return c


def policy_source(cfg, workdir) -> str:
  """The workdir the initial policy loads from: init.checkpoint, else the warm start's."""
  return cfg.init.checkpoint or str(epath.Path(workdir) / 'warmstart')


# ------------------------------------------------------------------------------------------------
# The learner


class Learner:
  """The sampler settings and jitted update functions of one RL configuration."""

  def __init__(self, cfg, trainer: trainer_lib.Trainer, enc: task_tokens.Encoder):
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
    self.block = process_block(cfg, trainer.mesh)
    example = self.batch_template(self.responses // max(r.num_minibatches, 1)
                                  if r.objective != 'diffu_grpo' else self.responses)
    self.shard = sharding.batch_shardings(example, trainer.mesh, cfg.sharding.rules)
    self.step = trainer.compile_step(loss, self.shard, n)
    self.old_terms = jax.jit(self._old_terms, out_shardings=sharding.replicated(trainer.mesh))

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
    """The update's input: rollout tokens, response positions, advantages, per-response keys,
    for this process's rows (`self.block`) of the step's responses."""
    maskable = np.zeros(np.shape(tokens_BxT), bool)
    maskable[:, self.enc.P:] = True
    keys = np.asarray(jax.random.key_data(jax.random.split(key, self.responses)))[self.block]
    return {'tokens_BxT': np.asarray(tokens_BxT), 'maskable_BxT': maskable,
            'attend_BxT': np.asarray(attend_BxT), 'adv_B': np.asarray(adv_B, np.float32),
            'row_key_Bx2': np.asarray(keys)}

  def place(self, batch) -> dict:
    """This process's rows of a batch assembled into global arrays sharded by batch over the
    data-parallel axes: each device holds, and computes on, its own rows."""
    return sharding.global_batch(batch, sharding.batch_shardings(batch, self.trainer.mesh,
                                                                 self.cfg.sharding.rules))

  def _old_terms(self, params, batch):
    """ℓ_old per (response, sample) — or per-token log p for diffu_grpo — before any update."""
    with self.trainer.activations():
      return self._old_terms_traced(params, batch)

  def _old_terms_traced(self, params, batch):
    model = self.trainer.model(params)
    r, mask_id = self.cfg.rl, self.trainer.mcfg.mask_id
    if r.objective == 'diffu_grpo':
      return jax.lax.map(lambda k: rlo.grpo_token_logps(model, batch, k, mask_id,
                                                        r.prompt_mask_prob),
                         jnp.arange(r.inner_updates))
    ell = jax.lax.map(lambda j: rlo.elbo_term(model, batch, j, mask_id), jnp.arange(r.num_mc))
    return ell.T

  def update(self, state, batch, ref_params):
    """All optimizer updates of one rollout batch (this process's rows of it); returns (state,
    metrics of the last). Off-policy mini-batch i is rows i, i + n, i + 2n, … (n =
    rl.num_minibatches) of the step's responses: the same rows for any process count."""
    r, mine = self.cfg.rl, self.block
    rows = self.place(batch) if self.off_policy or r.kl_beta > 0 else None
    if r.objective == 'diffu_grpo':  # the old / reference terms come back replicated
      if self.off_policy:
        batch['logp_old_KxBxT'] = np.asarray(self.old_terms(state.params, rows))[:, mine]
      if r.kl_beta > 0:
        batch['logp_ref_KxBxT'] = np.asarray(self.old_terms(ref_params, rows))[:, mine]
      for k in range(r.inner_updates):
        b = {n: v for n, v in batch.items() if not n.endswith('KxBxT')}
        b['iteration'] = np.full((len(b['adv_B']),), k, np.int32)
        if self.off_policy:
          b['logp_old_BxT'] = batch['logp_old_KxBxT'][k]
        if r.kl_beta > 0:
          b['logp_ref_BxT'] = batch['logp_ref_KxBxT'][k]
        state, m = self.step(state, self.place(b))
      return state, m
    if not self.off_policy:
      return self.step(state, self.place(batch))
    batch['ell_old_BxN'] = np.asarray(self.old_terms(state.params, rows))[mine]
    n = r.num_minibatches
    for i in range(n):
      state, m = self.step(state, self.place(jax.tree.map(lambda x: x[i::n], batch)))
    return state, m


def process_block(cfg, mesh) -> slice:
  """This process's rows of every step's responses (`sharding.process_rows`): whole groups,
  whose advantages it computes, and whole strided mini-batches (rows i, i + n, … of the
  step), so each process rolls out, scores and ranks only its own prompts."""
  r = cfg.rl
  responses = r.num_prompts * r.group_size
  block = sharding.process_rows(mesh, cfg.sharding.rules, responses)
  mine = block.stop - block.start
  if mine % r.group_size or block.start % r.group_size or mine % r.num_minibatches:
    raise ConfigError(
        f'each of {responses // mine} processes holds {mine} of the {responses} responses of a '
        f'step: not whole groups of rl.group_size={r.group_size} and '
        f'rl.num_minibatches={r.num_minibatches}; make rl.num_prompts a multiple of the '
        'process count')
  return block


class Setup(NamedTuple):
  cfg: Any  # the run's config, its model section the architecture actually trained
  task: Any
  train: list
  held_out: list
  enc: task_tokens.Encoder
  trainer: trainer_lib.Trainer
  learner: Learner
  ckpt: ckpt_lib.Checkpointer
  start: int  # the step to resume from (0: a fresh run)
  init_params: Any  # the initial policy; None when resuming (the checkpoint holds the policy)


def build(cfg, workdir: str, devices=None) -> Setup:
  """Task data, the initial policy (warm start run here if needed), trainer and learner."""
  validate(cfg)
  r = cfg.rl
  mesh = sharding.make_mesh(cfg.sharding, devices)
  rows = r.num_prompts * r.group_size // (1 if r.objective == 'diffu_grpo' else r.num_minibatches)
  sharding.check_batch(rows, mesh, cfg.sharding.rules, cfg.train.microbatches,
                       'the responses of one update')
  process_block(cfg, mesh)  # before any warm start
  task, train, held_out = sft.task_problems(cfg, workdir)
  saved = workdir_lib.latest_config(workdir)
  init_params = None
  if saved:  # resuming: the tokenizer and architecture are this workdir's
    tok = workdir_lib.load_tokenizer(workdir)
    model_section = saved[1]['model'] if cfg.init.checkpoint else cfg.model.to_dict()
  else:
    if not cfg.init.checkpoint:
      train_lib.run(sft_config(cfg, workdir), policy_source(cfg, workdir), devices)
    init = workdir_lib.load(policy_source(cfg, workdir), use_ema=cfg.init.use_ema, mesh=mesh)
    tok, model_section = init.tokenizer, init.config['model']
    init_params = workdir_lib.base_params(init)  # this run's LoRA adapters (if any) start fresh
    if jax.process_index() == 0:
      workdir_lib.save_tokenizer(tok, workdir)  # the workdir must load alone
  cfg = train_lib.with_model(cfg, model_section)
  ckpt = ckpt_lib.Checkpointer(workdir, keep=r.keep_checkpoints)
  start = ckpt.resume_step(cfg.to_dict())
  enc = task_tokens.Encoder(task, cfg.task, tok, cfg.sampler.gen_length, train + held_out)
  trainer = trainer_lib.Trainer(workdir_lib.model_config(cfg.model, tok), cfg.train, mesh,
                                cfg.sharding.rules, cfg.seed)
  return Setup(cfg, task, train, held_out, enc, trainer, Learner(cfg, trainer, enc), ckpt, start,
               init_params)


def run(cfg, workdir: str, devices=None) -> dict:
  """Warm start (if needed), then RL to rl.num_steps, resuming from workdir's checkpoints."""
  (cfg, task, train, held_out, enc, trainer, learner, ckpt, start,
   init_params) = build(cfg, workdir, devices)
  r, log = cfg.rl, metrics_lib.log
  rows = sft.problem_split(cfg.warmstart, cfg.seed, len(train))[1]
  it = sft.index_iterator(len(rows), r.num_prompts, cfg.seed)
  if start:
    items, data_state = ckpt.restore(start, trainer.abstract_items())
    state = trainer.from_items(items)
    data_lib.restore_process_iterator(it, data_state)
    log(f'resumed RL from step {start}')
  else:
    state = trainer.state_from_params(init_params)  # a copy: updates donate the state
  ref_params = None  # diffu_grpo's KL reference: the initial policy
  if r.kl_beta > 0:
    ref_params = trainer.params_from(init_params if init_params is not None else
                                     workdir_lib.base_params(workdir_lib.load(
                                         policy_source(cfg, workdir), use_ema=cfg.init.use_ema,
                                         mesh=trainer.mesh)))
  writer = metrics_lib.MetricsWriter(workdir, start)
  mine = learner.block  # this process's rows of every step's responses
  log(f'RL ({r.objective}, {task.name}): {r.num_prompts} prompts × {r.group_size} responses, '
      f'n_t {r.num_mc}, {max(r.num_steps - start, 0)} steps; {len(held_out)} held-out problems')

  def evaluate_at(s, params):
    ev = evaluate.task_accuracy(trainer.graphdef, params, task, enc, held_out,
                                learner.eval_cfg, cfg.eval_sampler.batch_size)
    writer.write(s, {'eval/accuracy': ev['accuracy'], 'eval/reward_mean': ev['reward_mean']})
    log(f'step {s} | eval accuracy {ev["accuracy"]:.3f} | reward {ev["reward_mean"]:.3f}')
    return ev['accuracy']

  if start == 0:
    evaluate_at(0, state.params)
  base = jax.random.key(cfg.seed + 2)
  last = {}
  stop = False
  with preemption.Stopper(r.checkpoint_minutes) as stopper:
    for s in range(start + 1, r.num_steps + 1):
      key = jax.random.fold_in(base, s)
      k_roll, k_rows = jax.random.split(key)
      # Every process draws the same prompts; it rolls out, scores and ranks only its own
      # whole groups (learner.block), and the update assembles the global batch.
      problems = [train[i] for i in rows[next(it)] for _ in range(r.group_size)][mine]
      t0 = time.perf_counter()
      tokens, attend = evaluate.rollout(trainer.graphdef, state.params, enc, problems, k_roll,
                                        learner.rollout_cfg, cfg.sharding.rules, local=True)
      train_lib.log_rows('rl', s, mine, tokens)
      local_rewards, errors = evaluate.rewards(task, enc, tokens, problems)
      t1 = time.perf_counter()
      adv = rlo.group_advantages(local_rewards.reshape(-1, r.group_size),
                                 scale=r.objective != 'diffu_grpo').reshape(-1)
      rewards, errors = sharding.gather_rows(local_rewards, mine, errors)
      batch = learner.batch(tokens, attend, adv, k_rows)
      state, m = learner.update(state, batch, ref_params)
      m = jax.device_get(m)
      t2 = time.perf_counter()
      if not np.isfinite(m['objective']) or not np.isfinite(m['grad_norm']):
        raise NonFiniteLossError(f'non-finite RL objective at step {s}; the run stopped without '
                                 f'saving. Last good checkpoint: {ckpt.latest_step()}')
      last = {'rl/reward_mean': float(rewards.mean()), 'rl/accuracy': float((rewards == 1).mean()),
              'rl/reward_errors': float(errors), 'rl/objective': float(m['objective']),
              'rl/grad_norm': float(m['grad_norm']), 'rl/rollout_seconds': t1 - t0,
              'rl/update_seconds': t2 - t1}
      if s % r.log_every == 0 or s == r.num_steps:
        writer.write(s, last)
        log(f'step {s}/{r.num_steps} | reward {last["rl/reward_mean"]:.3f} | '
            f'acc {last["rl/accuracy"]:.3f} | rollout {t1 - t0:.2f}s | update {t2 - t1:.2f}s')
      if s % r.eval_every == 0 or s == r.num_steps:
        last['eval/accuracy'] = evaluate_at(s, state.params)
      stop, due = stopper.poll(s)  # a signal (preemption) or the clock: save this step
      if stop or due or s % r.checkpoint_every == 0 or s == r.num_steps:
        writer.flush()  # gs://: rows up to a checkpoint are stored with it
        ckpt.save(s, trainer.to_items(state), data_lib.all_iterator_states(it), cfg.to_dict())
        stopper.saved()
      if stop:
        break
  ckpt.wait()
  ckpt.close()
  writer.close()
  if jax.process_index() == 0:
    log(f'plots: {plots.rl_curves(workdir)}')
  if stop:
    raise preemption.Stopped(f'RL: stopped by {stopper.name} after step {s}; checkpoint {s} '
                             f'written to {ckpt.directory}. Run the same command to resume.')
  return last
