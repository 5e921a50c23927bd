"""MFU of a full pretraining step: model FLOP/s ÷ f32 matmul FLOP/s measured in the same run.

`python -m dlm.bench.train_step [--preset=bench20m|radd_small] [--dtype=float32|bfloat16]`, from
the repository root (the model comes from `--config`, by default configs/pretrain.py:radd_small).
Prints a table and, last, one JSON line. MFU is against the vendor's dense bf16 peak on GPU/TPU
and against this machine's own measured matmul rate on CPU (no vendor peak exists).
`--topology=v5p-8` (or any `dlm.dry_run` slice) instead compiles the same step for that slice
ahead of time and reports its per-chip memory (the dry run's table and JSON line); nothing runs.
"""
import math
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import ConfigDict, config_flags

from dlm import bench
from dlm import metrics as metrics_lib
from dlm import model as model_lib
from dlm import sharding
from dlm import train as train_lib
from dlm import trainer as trainer_lib

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/pretrain.py:radd_small',
                                          'pretraining config whose model, optimizer and loss '
                                          'are timed')
_PRESET = flags.DEFINE_string('preset', 'bench20m', 'bench20m (CPU) or radd_small (accelerator)')
_DTYPE = flags.DEFINE_string('dtype', 'float32', 'compute dtype')
_BATCH = flags.DEFINE_integer('batch', 8, 'sequences per step')
_SEQ = flags.DEFINE_integer('seq_len', 256, 'sequence length')
_STEPS = flags.DEFINE_integer('steps', 5, 'timed steps (after one warm-up); best is kept')
_TOPOLOGY = flags.DEFINE_string('topology', None, 'compile only, for this TPU slice (dlm.dry_run '
                                'names, e.g. v5p-8) or local: per-chip memory, nothing runs')


def bench_config(preset: str) -> ConfigDict:
  c = ConfigDict(_CONFIG.value.to_dict())
  c.model.dropout = 0.0
  if preset == 'bench20m':  # ~20M params: d 384, 8 layers, vocab 8192+1
    c.model.update(num_embeddings=8193, mask_id=8192, d_model=384, n_layers=8, n_heads=6,
                   mlp_dim=1536)
  elif preset != 'radd_small':
    raise ValueError(f'unknown preset {preset!r}')
  return c


def matmul_fn(dtype, n: int = 2048):
  """A dense n³ matmul: the roofline a train step's matmuls can reach on this device."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  f = jax.jit(lambda a, b: a @ b)
  return (lambda: f(a, b)), 2.0 * n ** 3


def _seconds(fn) -> float:
  t = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t


def main(argv):
  del argv
  c = bench_config(_PRESET.value)
  c.model.dtype = _DTYPE.value
  c.data.update(batch_size=_BATCH.value, seq_len=_SEQ.value)
  if _TOPOLOGY.value:
    from dlm import dry_run  # pylint: disable=g-import-not-at-top
    c.dry_run = _TOPOLOGY.value
    raise SystemExit(dry_run.run(c, ''))
  mcfg = model_lib.config_from(c.model)
  dev = jax.devices()[:1]
  mesh = sharding.make_mesh(ConfigDict({'data': 1, 'fsdp': 1, 'tensor': 1}), dev)
  trainer = trainer_lib.Trainer(mcfg, c.train, mesh, c.sharding.rules, seed=0)
  state = trainer.init_state()
  shard = {'tokens': sharding.batch_sharding(mesh, c.sharding.rules)}
  step = trainer.compile_step(train_lib.diffusion_objective(c.diffusion, mcfg.mask_id), shard)
  tokens = jax.device_put({'tokens': jax.random.randint(
      jax.random.key(0), (_BATCH.value, _SEQ.value), 0, mcfg.mask_id)}, shard)
  holder = [state]

  def one_step():
    holder[0], m = step(holder[0], tokens)
    return m

  mm, mm_flops = matmul_fn(jnp.dtype(_DTYPE.value))
  _seconds(one_step), _seconds(mm)  # compile + warm-up
  # Interleave step and matmul timings and keep the best of each: on a shared, noisy machine
  # both then see the same conditions, so their ratio is stable.
  step_s, mm_s = math.inf, math.inf
  for _ in range(_STEPS.value):
    step_s = min(step_s, _seconds(one_step))
    mm_s = min(mm_s, min(_seconds(mm) for _ in range(3)))
  n_params = model_lib.count_params(mcfg)
  flops = metrics_lib.model_flops_per_token(mcfg, _SEQ.value) * _BATCH.value * _SEQ.value
  mm = mm_flops / mm_s
  model_fps = flops / step_s
  peak = metrics_lib.peak_flops_per_device()
  # MFU against the vendor's dense peak on accelerators (a large matmul reaches only part of it:
  # 130 of 989 TFLOP/s on the H200 for 2048³); on CPU, which has no table entry, against this
  # machine's measured matmul rate.
  out = {'preset': _PRESET.value, 'dtype': _DTYPE.value, 'device': dev[0].device_kind,
         'params': n_params, 'batch': _BATCH.value, 'seq_len': _SEQ.value,
         'step_seconds': step_s, 'model_flops_per_step': flops, 'model_flops_per_sec': model_fps,
         'matmul_flops_per_sec': mm, 'mfu': model_fps / (peak or mm),
         'mfu_basis': 'vendor peak' if peak else 'measured matmul (CPU)',
         'tokens_per_sec': _BATCH.value * _SEQ.value / step_s}
  bench.print_report(out)


if __name__ == '__main__':
  app.run(main)
