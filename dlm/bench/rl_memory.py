"""Peak memory of one RL update vs the number of Monte Carlo samples n_t: BGPO vs VRPO-OL.

`python -m dlm.bench.rl_memory [--sizes=1,4,16,64] [--d_model=256 ...]`
Compiles one full update (gradients + AdamW) of the same model and batch for each objective and
n_t, reads XLA's temporary-buffer size from `compile().memory_analysis()`, and times the step.
BGPO accumulates ∇ of its per-sample terms with lax.scan, so its peak should stay flat in n_t;
VRPO-OL keeps all n_t graphs alive, so its peak should grow roughly linearly.
"""
import json
import time

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags

from dlm import model as model_lib
from dlm import rl_objectives as rlo
from dlm import sharding
from dlm import trainer as trainer_lib

_SIZES = flags.DEFINE_list('sizes', ['1', '4', '16', '64'], 'n_t values')
_D = flags.DEFINE_integer('d_model', 256, 'model width')
_LAYERS = flags.DEFINE_integer('n_layers', 4, 'layers')
_VOCAB = flags.DEFINE_integer('vocab', 1024, 'real vocabulary size')
_B = flags.DEFINE_integer('responses', 8, 'responses per update (prompts × G)')
_P = flags.DEFINE_integer('prompt_len', 32, 'prompt tokens')
_R = flags.DEFINE_integer('response_len', 96, 'response tokens')
_DTYPE = flags.DEFINE_string('dtype', 'float32', 'compute dtype')
_TIME = flags.DEFINE_bool('time', True, 'also time one step per configuration')

RULES = (('batch', ('data', 'fsdp')), ('vocab', 'tensor'), ('embed', 'fsdp'),
         ('heads', 'tensor'), ('mlp', 'tensor'), ('layers', None), ('norm', None))


def make_batch(B, P, R, vocab):
  k1, k2 = jax.random.split(jax.random.key(0))
  T = P + R
  return {'tokens_BxT': jax.random.randint(k1, (B, T), 0, vocab),
          'maskable_BxT': jnp.broadcast_to(jnp.arange(T) >= P, (B, T)),
          'attend_BxT': jnp.ones((B, T), bool),
          'adv_B': jnp.linspace(-1.0, 1.0, B),
          'row_key_Bx2': jax.random.key_data(jax.random.split(k2, B))}


def measure(trainer, state, batch, shard, objective, n_t):
  if objective == 'bgpo':
    step = trainer.compile_step(rlo.bgpo_loss(trainer.mcfg.mask_id, False), shard, n_t)
  else:
    step = trainer.compile_step(rlo.vrpo_ol_loss(trainer.mcfg.mask_id, n_t, False), shard, 1)
  try:
    compiled = step.lower(state, batch).compile()
  except Exception as e:  # e.g. RESOURCE_EXHAUSTED on an accelerator
    print(f'{objective} n_t={n_t}: did not compile ({type(e).__name__})')
    return None, None, state
  temp = compiled.memory_analysis().temp_size_in_bytes
  seconds = None
  if _TIME.value:
    state, m = compiled(state, batch)  # warm-up
    jax.block_until_ready(m)
    t = time.perf_counter()
    state, m = compiled(state, batch)
    jax.block_until_ready(m)
    seconds = time.perf_counter() - t
  return temp, seconds, state


def main(argv):
  del argv
  mcfg = model_lib.ModelConfig(num_embeddings=_VOCAB.value + 1, mask_id=_VOCAB.value,
                               d_model=_D.value, n_layers=_LAYERS.value,
                               n_heads=max(_D.value // 64, 1), mlp_dim=4 * _D.value,
                               dtype=_DTYPE.value)
  tc = ml_collections.ConfigDict(dict(lr=1e-6, warmup_steps=1, b1=0.9, b2=0.999, eps=1e-8,
                                      weight_decay=0.0, clip_norm=1.0, ema_max_decay=0.0,
                                      microbatches=1))
  mesh = sharding.make_mesh(ml_collections.ConfigDict({'data': 1, 'fsdp': 1, 'tensor': 1}),
                            jax.devices()[:1])
  trainer = trainer_lib.Trainer(mcfg, tc, mesh, RULES, seed=0)
  state = trainer.init_state()
  batch = make_batch(_B.value, _P.value, _R.value, _VOCAB.value)
  shard = sharding.batch_shardings(batch, mesh, RULES)
  batch = jax.device_put(batch, shard)
  out = {'bgpo_temp_bytes': {}, 'vrpo_ol_temp_bytes': {}, 'bgpo_step_seconds': {},
         'vrpo_ol_step_seconds': {}}
  print(f'model {model_lib.count_params(mcfg):,} params, {_B.value} responses × '
        f'({_P.value} prompt + {_R.value} response) tokens, {jax.devices()[0].device_kind}')
  print(f'{"n_t":>4} {"bgpo temp MiB":>14} {"vrpo_ol temp MiB":>17} {"bgpo s":>8} '
        f'{"vrpo_ol s":>10}')
  for n in _SIZES.value:
    row = {}
    for obj in ('bgpo', 'vrpo_ol'):
      temp, sec, state = measure(trainer, state, batch, shard, obj, int(n))
      out[f'{obj}_temp_bytes'][n], out[f'{obj}_step_seconds'][n] = temp, sec
      row[obj] = (temp, sec)
    fmt = lambda b: f'{b / 2**20:.1f}' if b is not None else 'OOM'
    fs = lambda s: f'{s:.3f}' if s is not None else '-'
    print(f'{n:>4} {fmt(row["bgpo"][0]):>14} {fmt(row["vrpo_ol"][0]):>17} '
          f'{fs(row["bgpo"][1]):>8} {fs(row["vrpo_ol"][1]):>10}')
  b = out['bgpo_temp_bytes']
  first, last = _SIZES.value[0], _SIZES.value[-1]
  if b[first] and b[last]:
    out['bgpo_peak_ratio_last_vs_first'] = b[last] / b[first]
  out['params'] = model_lib.count_params(mcfg)
  out['device'] = jax.devices()[0].device_kind
  print(json.dumps(out))


if __name__ == '__main__':
  app.run(main)
