"""RL post-training on Countdown (SPEC §5–6): `python -m dlm.main --config=configs/rl_countdown.py`.

Default preset: the BGPO paper setting (LLaDA-8B-Instruct from `init.checkpoint`, 16 prompts × 8
responses, n_t = 16, lr 5e-7, 256 tokens, 128 steps, block 32, 560 steps).
Preset `cpu`: the whole pipeline on a laptop CPU with no checkpoint: a short supervised warm start
of a tiny model on generated (prompt, solution) pairs, BGPO, held-out greedy evaluation and plots.
Change the objective with `--config.rl.objective=vrpo_ol|diffu_grpo`.
"""
import ml_collections

import configs

from configs import pretrain


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.mode = 'rl'
  c.seed = 0
  c.model = pretrain.get_config('llada_8b').model.copy_and_resolve_references()
  c.model.unlock()
  c.model.remat = 'full'

  c.init = i = ml_collections.ConfigDict()
  i.checkpoint = ''  # a dlm checkpoint directory (e.g. written by the LLaDA importer)
  i.tokenizer = ''  # the tokenizer that goes with it

  c.task = t = ml_collections.ConfigDict()
  t.name = 'countdown'
  t.prompt = 'd1'  # 'd1' (SPEC §6.1 training prompt) | 'compact' (tiny models)
  t.num_numbers = (3, 4)  # numbers per problem in the training source
  t.low = 1  # numbers and targets lie in [low, high]
  t.high = 100
  t.train_size = 50_000
  t.test_size = 256  # held-out problems generated disjoint from training
  t.eval_file = ''  # d1 test format ({"input": "a,b,c", "output": "T"} per line); '' = generated

  c.sampler = s = ml_collections.ConfigDict()  # rollouts (mirrors dlm.sampling.SamplerConfig)
  s.strategy = 'semi_ar'
  s.gen_length = 256
  s.steps = 128
  s.block_length = 32
  s.temperature = 1.0
  s.remasking = 'low_confidence'
  s.threshold = 0.9
  s.cache = 'none'
  c.eval_sampler = e = ml_collections.ConfigDict()  # held-out evaluation: greedy (d1 protocol)
  e.steps = 256
  e.batch_size = 64

  c.rl = r = ml_collections.ConfigDict()
  r.objective = 'bgpo'  # 'bgpo' | 'vrpo_ol' | 'diffu_grpo'
  r.num_steps = 560
  r.num_prompts = 16
  r.group_size = 8
  r.num_mc = 16  # n_t: Monte Carlo samples of the ELBO per response (bgpo, vrpo_ol)
  r.num_minibatches = 1  # > 1: off-policy, ℓ_old computed once per (response, sample)
  r.inner_updates = 1  # diffu_grpo: μ updates per rollout, each with a fresh prompt mask
  r.clip_eps = 0.2  # diffu_grpo
  r.kl_beta = 0.0  # diffu_grpo: k3 KL to the initial policy (0 = no reference model)
  r.prompt_mask_prob = 0.15  # diffu_grpo
  r.log_every = 1
  r.eval_every = 50
  r.checkpoint_every = 10
  r.keep_checkpoints = 3

  # The optimizer of the RL updates.
  c.train = pretrain.optimizer(lr=5e-7, warmup_steps=1, b2=0.99, ema_max_decay=0.0)

  c.warmstart = w = ml_collections.ConfigDict()  # supervised warm start (cpu preset; 0 = none)
  w.steps = 0
  w.batch_size = 64
  w.lr = 1e-3
  w.warmup_steps = 50
  w.loss = 'k_dce'  # prompt-aware masked-diffusion loss over the response only
  w.vocab_size = 48  # pieces of the tokenizer trained on the task texts
  w.demo_error = 0.0  # fraction of demonstrations replaced by the lazy answer (see cpu preset)
  w.problem_fraction = 1.0  # the warm start reads this fraction of the training problems
  w.disjoint = False  # True: a seeded random split, RL prompts come from the rest only
  w.log_every = 50
  w.checkpoint_every = 200

  c.sharding = pretrain.base_config().sharding
  return c


def cpu(c):
  """Tiny model on numbers in [1, 20], ≈ 11 minutes on 2 cores. The warm start learns from a
  demonstrator that is wrong half the time: for a seeded half of its problems the target is the
  lazy answer (all numbers added: well formed, right numbers, usually the wrong value), so the
  warm-started policy often writes it (held-out greedy accuracy ≈ 0.05). BGPO on problems the warm
  start never saw must learn from the reward alone to solve instead (≈ 0.2 after 50 steps). With
  `--config.warmstart.demo_error=0` the warm start reaches ≈ 0.21 itself and 150 BGPO steps add
  only 2–3 points (BENCHMARKS.md)."""
  c.model = pretrain.get_config('tiny').model.copy_and_resolve_references()
  c.model.unlock()
  c.model.update(d_model=128, n_layers=4, n_heads=4, mlp_dim=512, remat='none')
  c.task.update(prompt='compact', num_numbers=(3,), low=1, high=20, train_size=7000,
                test_size=256)
  c.sampler.update(gen_length=16, steps=16, block_length=8, temperature=1.0)
  c.eval_sampler.update(steps=16, batch_size=128)
  c.rl.update(num_steps=100, num_prompts=16, group_size=8, num_mc=8, eval_every=25,
              checkpoint_every=10)
  c.train.update(lr=5e-5, warmup_steps=1, clip_norm=1.0)
  c.warmstart.update(steps=2500, batch_size=64, lr=5e-4, warmup_steps=100, log_every=100,
                     checkpoint_every=500, problem_fraction=0.5, disjoint=True, demo_error=0.5)
  return c


def tiny(c):
  """Seconds-scale smoke run for tests: the cpu pipeline with everything shrunk."""
  cpu(c)
  c.model.update(d_model=32, n_layers=1, n_heads=2, mlp_dim=64)
  c.task.update(high=10, train_size=300, test_size=16)
  c.warmstart.update(problem_fraction=1.0, disjoint=False)
  c.eval_sampler.update(batch_size=16)
  c.rl.update(num_steps=4, num_prompts=2, group_size=4, num_mc=2, eval_every=2,
              checkpoint_every=2)
  c.warmstart.update(steps=4, batch_size=8, warmup_steps=1, log_every=2, checkpoint_every=2)
  return c


PRESETS = {'paper': lambda c: c, 'cpu': cpu, 'tiny': tiny}


def get_config(preset: str = 'paper') -> ml_collections.ConfigDict:
  return configs.from_preset(PRESETS, preset, base_config())
