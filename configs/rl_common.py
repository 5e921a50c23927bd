"""The RL config shared by every task's file (`rl_countdown.py`, `rl_sudoku.py`): policy, sampler,
objective, optimizer, warm start and mesh. Each task file adds its `task` keys and presets."""
import ml_collections

from configs import pretrain


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.mode = 'rl'
  c.seed = 0
  c.dry_run = ''  # v5p-32, v5e-8, … or 'local': compile the step, report memory (dlm.dry_run)
  c.model = pretrain.get_config('llada_8b').model.copy_and_resolve_references()
  c.model.unlock()
  c.model.remat = 'full'

  c.init = i = ml_collections.ConfigDict()
  i.checkpoint = ''  # a dlm workdir (any mode): its parameters, tokenizer and architecture
  i.use_ema = True  # start from its EMA parameters when it kept them

  c.task = t = ml_collections.ConfigDict()  # the task's file adds name, eval_file and its keys
  t.prompt = 'd1'  # 'd1' (the d1 training prompt) | 'compact' (tiny models)
  # 'auto': the tokenizer's chat template when it has one (LLaDA-8B-Instruct), else the raw
  # prompt; '' = raw prompt; else text with '{prompt}'
  t.chat_template = 'auto'
  t.train_size = 50_000
  t.test_size = 256  # held-out problems generated disjoint from training (eval_file '')

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
  r.checkpoint_minutes = 30.0  # also save when this long has passed since the last save (0 = off)
  r.keep_checkpoints = 3

  # The optimizer of the RL updates.
  c.train = pretrain.optimizer(lr=5e-7, warmup_steps=1, b2=0.99, ema_max_decay=0.0)

  # Supervised warm start (SFT with the one training loop, in <workdir>/warmstart) when there is
  # no init.checkpoint; 0 steps = none.
  c.warmstart = w = ml_collections.ConfigDict()
  w.steps = 0
  w.batch_size = 64
  w.lr = 1e-3
  w.warmup_steps = 50
  w.loss = 'k_dce'  # prompt-aware masked-diffusion loss over the response only
  w.vocab_size = 48  # pieces of the tokenizer trained on the task texts
  w.demo_error = 0.0  # fraction of demonstrations replaced by a lazy demonstrator's (dlm.sft)
  w.problem_fraction = 1.0  # the warm start reads this fraction of the training problems
  w.disjoint = False  # True: a seeded random split, RL prompts come from the rest only
  w.log_every = 50
  w.checkpoint_every = 200

  c.sharding = pretrain.base_config().sharding
  return c


def tiny_model(c, **sizes) -> None:
  """The CPU presets' policy: the pretraining `tiny` architecture at the given sizes, float32."""
  c.model = pretrain.get_config('tiny').model.copy_and_resolve_references()
  c.model.unlock()
  c.model.update(remat='none', **sizes)


def cpu_pipeline(c, gen_length: int) -> None:
  """What every task's `cpu` preset shares: the tiny policy, a 2 500-step warm start on a seeded
  half of the training problems by a demonstrator that is lazy half the time (`sft.LAZY`), then
  100 BGPO steps on the other half (a task may run fewer); greedy evaluation every 25 steps."""
  tiny_model(c, d_model=128, n_layers=4, n_heads=4, mlp_dim=512)
  c.task.update(prompt='compact', train_size=7000, test_size=256, eval_file='')
  c.sampler.update(gen_length=gen_length, steps=gen_length, block_length=8, temperature=1.0)
  c.eval_sampler.update(steps=gen_length, batch_size=128)
  c.rl.update(num_steps=100, num_prompts=16, group_size=8, num_mc=8, eval_every=25,
              checkpoint_every=10)
  c.train.update(lr=5e-5, warmup_steps=1, clip_norm=1.0)
  c.warmstart.update(steps=2500, batch_size=64, lr=5e-4, warmup_steps=100, log_every=100,
                     checkpoint_every=500, problem_fraction=0.5, disjoint=True, demo_error=0.5)


def tiny_pipeline(c) -> None:
  """What every task's `tiny` preset (seconds, for tests) shares: the cpu pipeline shrunk."""
  c.model.update(d_model=32, n_layers=1, n_heads=2, mlp_dim=64)
  c.eval_sampler.update(batch_size=16)
  c.rl.update(num_steps=4, num_prompts=2, group_size=4, num_mc=2, eval_every=2,
              checkpoint_every=2)
  c.warmstart.update(steps=4, batch_size=8, warmup_steps=1, log_every=2, checkpoint_every=2,
                     problem_fraction=1.0, disjoint=False)
