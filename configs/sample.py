"""Sample-mode configs: `python -m dlm.main --config=configs/sample.py[:preset] --workdir=W`.

W is any dlm workdir (a run's or an import's from `python -m dlm.convert`): its latest checkpoint (or `checkpoint_step`) and the config saved
with it rebuild the model and tokenizer; samples go to W/<output> as JSON lines.
Presets: `semi_ar` (default), `radd` (cached ancestral sampler, exact categorical), `threshold`,
`fast` (threshold + prefix KV cache), `llada` (LLaDA/d1 settings: 256 tokens, block 32).
Use: `--config=configs/sample.py:fast --config.prompts="('count from 3 by 2:',)"`.
"""
import ml_collections

import configs


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.mode = 'sample'
  c.seed = 0
  c.dry_run = ''  # dlm.dry_run compiles training steps: a value here is an error (none here)
  c.checkpoint_step = -1  # -1 = latest
  c.use_ema = True  # sample with the EMA weights when the run kept them
  c.prompts = ('',)  # '' = unconditional; prompts of different lengths are left-padded
  # 'auto': non-empty prompts go through the tokenizer's chat template when it has one (an
  # Instruct model, e.g. an imported LLaDA-8B-Instruct); '' = raw; else text with '{prompt}'
  c.chat_template = 'auto'
  c.num_samples = 4  # per prompt
  c.batch_size = 8  # rows per jitted call (the last batch is padded, never recompiled)
  c.output = 'samples.jsonl'  # relative to the workdir

  # Mirrors dlm.sampling.SamplerConfig (every field declared; validated there).
  c.sampler = s = ml_collections.ConfigDict()
  s.strategy = 'semi_ar'  # 'radd' | 'semi_ar' | 'threshold'
  s.gen_length = 48  # tokens generated after the prompt
  s.steps = 48  # radd: grid steps n; semi_ar: total steps, split evenly over blocks
  s.radd_cached = True  # radd: call the network only when the row changed
  s.schedule = 'loglinear'  # radd: 'loglinear' | 'linear' | 'cosine'
  s.eps = 1e-3  # radd: log-linear epsilon
  s.t_min = 1e-5  # radd: grid = linspace(1, t_min, steps + 1)
  s.categorical = 'exact'  # radd: 'exact' (62-bit inverse CDF) | 'gumbel32' (float32, truncates)
  s.block_length = 16  # semi_ar / threshold
  s.temperature = 0.0  # semi_ar / threshold: 0 = greedy
  s.cfg_scale = 0.0  # classifier-free guidance (prompt masked = unconditional)
  s.remasking = 'low_confidence'  # semi_ar: 'low_confidence' | 'random'
  s.threshold = 0.9  # threshold: reveal tokens with confidence > threshold, ≥ 1 per step
  s.cache = 'none'  # semi_ar / threshold: 'none' | 'prefix' | 'dual' (approximate KV cache)
  return c


def semi_ar(c):
  return c


def radd(c):
  c.sampler.update(strategy='radd', steps=256)
  return c


def threshold(c):
  c.sampler.update(strategy='threshold')
  return c


def fast(c):
  c.sampler.update(strategy='threshold', cache='prefix')
  return c


def llada(c):
  c.sampler.update(gen_length=256, steps=256, block_length=32)
  return c


PRESETS = {'semi_ar': semi_ar, 'radd': radd, 'threshold': threshold, 'fast': fast,
           'llada': llada}


def get_config(preset: str = 'semi_ar') -> ml_collections.ConfigDict:
  return configs.from_preset(PRESETS, preset, base_config())
