"""Sampler benchmark (SPEC §4): RADD cached vs uncached; semi_ar vs threshold (± KV cache).

`python -m dlm.bench.sampling [--workdir=DIR] [--train_steps=N] [--quick]`

Part 1, RADD (§4.1): one unconditional sequence of l = --radd_len tokens at n = --radd_steps,
exact categorical, from a small model (d 64, 2 layers, V 256 + mask, random head: the call count
does not depend on the weights). Network calls and seconds of the cached and the uncached sampler.
Part 2 (§4.2, §4.3): a model trained once by `dlm.train.run` on the builtin corpus into
--workdir (reused when its checkpoint exists); --batch held-out prompts of --prompt_len tokens,
gen_length --gen_length, block --block, greedy. Tokens/s of semi_ar (one token per step),
threshold, threshold + prefix cache and threshold + dual cache, and each one's token agreement
with greedy semi_ar. Seconds exclude compilation (ahead-of-time compiled). Prints a table and,
last, one JSON line.
"""
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
from absl import app, flags, logging
from flax import nnx

from ml_collections import ConfigDict, config_flags

from dlm import checkpoint as ckpt_lib
from dlm import data as data_lib
from dlm import task_tokens
from dlm import model as model_lib
from dlm import sampling as S
from dlm import train as train_lib
from dlm import workdir as workdir_lib

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/pretrain.py:tiny',
                                          'pretraining config of the part-2 model (its sizes '
                                          'are then set by the flags below)')
_WORKDIR = flags.DEFINE_string('workdir', '/tmp/dlm_bench_sampling', 'trained model cache')
_QUICK = flags.DEFINE_bool('quick', False, 'tiny sizes: a smoke test of the script')
_RADD_LEN = flags.DEFINE_integer('radd_len', 1024, 'RADD sequence length l')
_RADD_STEPS = flags.DEFINE_list('radd_steps', ['1024', '4096'], 'RADD step counts n')
_TRAIN_STEPS = flags.DEFINE_integer('train_steps', 200, 'training steps of the part-2 model '
                                     '(the recorded numbers use 1000: a stronger model)')
_D_MODEL = flags.DEFINE_integer('d_model', 128, 'part-2 model width (4 heads, MLP 4×)')
_LAYERS = flags.DEFINE_integer('n_layers', 4, 'part-2 model depth')
_GEN = flags.DEFINE_integer('gen_length', 256, 'generated tokens per prompt')
_BLOCK = flags.DEFINE_integer('block', 32, 'block length')
_BATCH = flags.DEFINE_integer('batch', 8, 'prompts per call')
_PROMPT = flags.DEFINE_integer('prompt_len', 16, 'prompt tokens')
_THRESHOLD = flags.DEFINE_float('threshold', 0.9, 'threshold strategy confidence')


def _timed(graphdef, params, ids, mask, cfg, repeats=1):
  """(tokens, stats, best seconds) of one sampler, compiled ahead of time."""
  key = jax.random.key(0)
  fn = S.sample_params.lower(graphdef, params, ids, mask, key, cfg=cfg).compile()
  best = float('inf')
  for _ in range(repeats):
    t = time.perf_counter()
    out = jax.block_until_ready(fn(params, ids, mask, key))
    best = min(best, time.perf_counter() - t)
  x, stats = jax.device_get(out)
  return x, stats, best


def radd_part(l: int, steps: list[int]) -> tuple[list[dict], dict]:
  mcfg = model_lib.ModelConfig(num_embeddings=257, mask_id=256, d_model=64, n_layers=2,
                               n_heads=4, mlp_dim=256)
  model = model_lib.Transformer(mcfg, nnx.Rngs(0))
  model.head.value = jax.random.normal(jax.random.key(1), model.head.shape)
  graphdef, params = nnx.split(model)
  empty = jnp.zeros((1, 0), jnp.int32)
  rows, out = [], {}
  for n in steps:
    res = {}
    for cached in (False, True):
      cfg = S.SamplerConfig('radd', gen_length=l, steps=n, radd_cached=cached)
      x, st, sec = _timed(graphdef, params, empty, empty.astype(bool), cfg)
      assert (x != mcfg.mask_id).all()
      res[cached] = (int(st['calls_B'][0]), sec, x)
    assert (res[True][2] == res[False][2]).all(), 'cached and uncached RADD samples differ'
    (cc, cs, _), (uc, us, _) = res[True], res[False]
    rows.append({'n': n, 'expected': S.expected_calls(n, l), 'cached_calls': cc,
                 'cached_s': cs, 'uncached_calls': uc, 'uncached_s': us})
    out.update({f'radd_calls_n{n}': cc, f'radd_expected_calls_n{n}': S.expected_calls(n, l),
                f'radd_cached_seconds_n{n}': cs, f'radd_uncached_seconds_n{n}': us,
                f'radd_call_ratio_n{n}': uc / cc, f'radd_time_ratio_n{n}': us / cs})
  return rows, out


def trained_model(workdir: str):
  """Trains (once) a small model on sequences of ≥ prompt + gen_length tokens (a multiple of
  64); returns its pieces. A workdir that already holds that step is reused, not retrained."""
  c = ConfigDict(_CONFIG.value.to_dict())
  c.model.update(d_model=_D_MODEL.value, n_layers=_LAYERS.value, mlp_dim=4 * _D_MODEL.value)
  c.data.update(seq_len=-(-(_PROMPT.value + _GEN.value) // 64) * 64, builtin_documents=8000)
  c.train.update(num_steps=_TRAIN_STEPS.value, log_every=100, eval_every=_TRAIN_STEPS.value,
                 checkpoint_every=_TRAIN_STEPS.value)
  ckpt = ckpt_lib.Checkpointer(workdir)
  latest = ckpt.latest_step()
  ckpt.close()
  t = time.perf_counter()
  if latest is None or latest < _TRAIN_STEPS.value:
    train_lib.run(c, workdir)
  train_s = time.perf_counter() - t
  # Raw weights: with a few hundred steps the EMA (decay up to 0.999) still remembers the init.
  tok, _, graphdef, params, _, step = workdir_lib.load(workdir, _TRAIN_STEPS.value, use_ema=False)
  _, _, eval_src = data_lib.prepare(c.data, workdir)
  return tok, graphdef, params, step, eval_src, train_s


def decode_part(workdir: str) -> tuple[list[dict], dict]:
  tok, graphdef, params, step, eval_src, train_s = trained_model(workdir)
  P, G, K, B = _PROMPT.value, _GEN.value, _BLOCK.value, _BATCH.value
  docs = (tok.encode(data_lib.example_text(eval_src[i])) for i in range(len(eval_src)))
  prompts = [d[:P] for d in docs if len(d) >= P][:B]
  ids, mask = task_tokens.left_pad(prompts, P)
  base = dict(gen_length=G, block_length=K)
  runs = {'semi_ar': S.SamplerConfig('semi_ar', steps=G, **base)}
  for cache in S.CACHES:
    runs['threshold' + ('' if cache == 'none' else f'_{cache}')] = S.SamplerConfig(
        'threshold', threshold=_THRESHOLD.value, cache=cache, **base)
  rows, ref = [], None
  for name, cfg in runs.items():
    x, st, sec = _timed(graphdef, params, ids, mask, cfg)
    gen = x[:, P:]
    ref = gen if ref is None else ref
    rows.append({'name': name, 'seconds': sec, 'tokens_per_sec': B * G / sec,
                 'calls': float(st['calls_B'].mean()), 'agreement': float((gen == ref).mean())})
  by = {r['name']: r for r in rows}
  out = {'semi_ar_tokens_per_sec': by['semi_ar']['tokens_per_sec'],
         'threshold_tokens_per_sec': by['threshold']['tokens_per_sec'],
         'threshold_cache_tokens_per_sec': by['threshold_prefix']['tokens_per_sec'],
         'threshold_dual_tokens_per_sec': by['threshold_dual']['tokens_per_sec'],
         'threshold_agreement': by['threshold']['agreement'],
         'threshold_cache_agreement': by['threshold_prefix']['agreement'],
         'threshold_dual_agreement': by['threshold_dual']['agreement'],
         'threshold_calls': by['threshold']['calls'], 'train_steps': step,
         'train_seconds': train_s, 'sample_text': tok.decode(ref[0])}
  return rows, out


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
  if _QUICK.value:
    flags.FLAGS.radd_len, flags.FLAGS.radd_steps = 64, ['64', '128']
    flags.FLAGS.train_steps, flags.FLAGS.gen_length, flags.FLAGS.block = 20, 32, 16
    flags.FLAGS.batch, flags.FLAGS.d_model, flags.FLAGS.n_layers = 2, 32, 1
  l = _RADD_LEN.value
  steps = [int(s) for s in _RADD_STEPS.value]
  radd_rows, radd_out = radd_part(l, steps)
  print(f'\nRADD, l = {l}, one sequence, exact categorical (d 64, 2 layers, V 257)')
  print(f'{"n":>6} {"E[calls]":>9} {"cached":>7} {"uncached":>8} {"cached s":>9} '
        f'{"uncached s":>10} {"call ratio":>10} {"time ratio":>10}')
  for r in radd_rows:
    print(f'{r["n"]:>6} {r["expected"]:>9.1f} {r["cached_calls"]:>7} {r["uncached_calls"]:>8} '
          f'{r["cached_s"]:>9.2f} {r["uncached_s"]:>10.2f} '
          f'{r["uncached_calls"] / r["cached_calls"]:>10.2f} '
          f'{r["uncached_s"] / r["cached_s"]:>10.2f}')
  dec_rows, dec_out = decode_part(_WORKDIR.value)
  print(f'\nDecoding: {_BATCH.value} prompts × {_PROMPT.value} tokens, gen_length {_GEN.value}, '
        f'block {_BLOCK.value}, greedy; model d {_D_MODEL.value} × {_LAYERS.value} layers, '
        f'{dec_out["train_steps"]} training steps')
  print(f'{"sampler":>18} {"seconds":>8} {"tokens/s":>9} {"calls/row":>9} {"agreement":>9} '
        f'{"speed-up":>8}')
  for r in dec_rows:
    print(f'{r["name"]:>18} {r["seconds"]:>8.2f} {r["tokens_per_sec"]:>9.1f} {r["calls"]:>9.1f} '
          f'{r["agreement"]:>9.3f} {r["tokens_per_sec"] / dec_rows[0]["tokens_per_sec"]:>8.2f}')
  print(f'greedy semi_ar sample: {dec_out["sample_text"][:200]!r}')
  goals = {}
  for r in radd_rows:  # issue #3 goals
    n = r['n']
    goals[f'radd_calls_within_3pct_n{n}'] = abs(r['cached_calls'] / r['expected'] - 1) <= 0.03
    goals[f'radd_time_ratio_ge_call_ratio_over_1.1_n{n}'] = (
        r['uncached_s'] / r['cached_s'] >= r['uncached_calls'] / r['cached_calls'] / 1.1)
  for name, key in (('threshold', 'threshold'), ('threshold_cache', 'threshold_cache'),
                    ('threshold_dual', 'threshold_dual')):
    fast = dec_out[f'{key}_tokens_per_sec'] >= 4 * dec_out['semi_ar_tokens_per_sec']
    goals[f'{name}_4x_at_95pct_agreement'] = bool(
        fast and dec_out[f'{key}_agreement'] >= 0.95)
  print('goals: ' + ', '.join(f'{k}={"met" if v else "NOT met"}' for k, v in goals.items()))
  print(json.dumps({**radd_out, **dec_out, 'goals': goals, 'radd_len': l, 'gen_length': _GEN.value,
                    'block': _BLOCK.value, 'batch': _BATCH.value,
                    'threshold': _THRESHOLD.value, 'device': jax.devices()[0].device_kind,
                    'cpus': os.cpu_count(), 'machine': platform.machine()}))


if __name__ == '__main__':
  app.run(main)
