"""Peak resident memory of `python -m dlm.convert` on a multi-GB LLaDA-layout checkpoint.

`python -m dlm.bench.convert_memory [--d_model=2048 --n_layers=16 --mlp=5632 --vocab=32000]
[--dtype=float32] [--dir=/tmp/dlm_bench_convert]` writes a random checkpoint of that shape (one
safetensors shard per layer, written shard by shard), imports it in a child process with
`--param_dtype` equal to the file's dtype, and reports the child's peak RSS against the
checkpoint's bytes (goal: ≤ 1.5× plus a constant). A second child runs the same import in-process
and reports each stage's peak and what it leaves resident (VmHWM, reset between stages through
/proc/self/clear_refs): `ready` (interpreter with dlm and JAX imported), `read` (read_params:
tensors → parameters), `save` (the orbax save). Prints a table and, last, one JSON line.
"""
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import ml_dtypes
import numpy as np
from absl import app, flags
from etils import epath

from dlm import bench
from dlm import host_memory

_D = flags.DEFINE_integer('d_model', 2048, 'model width')
_L = flags.DEFINE_integer('n_layers', 16, 'layers')
_F = flags.DEFINE_integer('mlp', 5632, 'MLP hidden size')
_V = flags.DEFINE_integer('vocab', 32000, 'vocabulary rows (mask included)')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'file and param dtype')
_DIR = flags.DEFINE_string('dir', '/tmp/dlm_bench_convert', 'scratch folder (removed after)')
_STAGES = flags.DEFINE_bool('stages', True, 'also run the per-stage child')
_STAGE_CHILD = flags.DEFINE_string('stage_child', None, 'internal: SRC,OUT,DTYPE of the stage '
                                   'child, which prints its stages as one JSON line')


def _reset_peak() -> None:
  with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')  # VmHWM := VmRSS


def stage_child(src: str, out: str, dtype: str) -> dict:
  """Imports `src` into `out` in this process, wrapping its stages to read each one's peak."""
  stages = {}
  import dlm.convert as convert  # pylint: disable=g-import-not-at-top
  from dlm import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  stages['ready'] = host_memory.resident_bytes()

  def staged(module, name, stage):
    fn = getattr(module, name)

    def wrapper(*args, **kwargs):
      _reset_peak()
      try:
        return fn(*args, **kwargs)
      finally:
        stages[stage] = host_memory.resident_bytes()
    setattr(module, name, wrapper)

  staged(convert, 'read_params', 'read')
  staged(ckpt_lib, 'save_uncompressed', 'save')
  convert.import_checkpoint(src, out, param_dtype=dtype)
  return {k: {'peak': hwm, 'after': rss} for k, (rss, hwm) in stages.items()}


def write_checkpoint(path: epath.Path, d: int, n_layers: int, f: int, v: int, dtype) -> int:
  """A LLaDA-layout folder with random weights; returns its tensor bytes."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  path.mkdir(parents=True)
  heads = max(1, d // 128)
  (path / 'config.json').write_text(json.dumps({
      'model_type': 'llada', 'd_model': d, 'n_heads': heads, 'n_kv_heads': heads,
      'n_layers': n_layers, 'mlp_hidden_size': f, 'vocab_size': v, 'embedding_size': v,
      'mask_token_id': v - 1, 'rope_theta': 500000.0, 'rms_norm_eps': 1e-5,
      'weight_tying': False}))
  rng = np.random.default_rng(0)
  w = lambda *shape: (rng.standard_normal(shape, np.float32) * 0.02).astype(dtype)
  p = 'model.transformer'
  total = _save(save_file, {f'{p}.wte.weight': w(v, d), f'{p}.ln_f.weight': w(d),
                            f'{p}.ff_out.weight': w(v, d)}, path / 'model-embed.safetensors')
  for i in range(n_layers):  # one shard per layer, each freed once written
    b = f'{p}.blocks.{i}'
    layer = {f'{b}.attn_norm.weight': w(d), f'{b}.ff_norm.weight': w(d)}
    for name, shape in (('q_proj', (d, d)), ('k_proj', (d, d)), ('v_proj', (d, d)),
                        ('attn_out', (d, d)), ('ff_proj', (f, d)), ('up_proj', (f, d)),
                        ('ff_out', (d, f))):
      layer[f'{b}.{name}.weight'] = w(*shape)
    total += _save(save_file, layer, path / f'model-layer{i:03d}.safetensors')
  return total


def _save(save_file, tensors: dict, path) -> int:
  save_file(tensors, str(path))
  return sum(a.nbytes for a in tensors.values())


def main(argv):
  del argv
  if _STAGE_CHILD.value:
    print(json.dumps(stage_child(*_STAGE_CHILD.value.split(','))))
    return
  scratch = epath.Path(_DIR.value)
  if scratch.exists():
    shutil.rmtree(scratch)
  dtype = ml_dtypes.bfloat16 if _DTYPE.value == 'bfloat16' else np.float32
  t = time.perf_counter()
  nbytes = write_checkpoint(scratch / 'src', _D.value, _L.value, _F.value, _V.value, dtype)
  write_s = time.perf_counter() - t
  t = time.perf_counter()
  child = subprocess.run([sys.executable, '-m', 'dlm.convert', f'--src={scratch / "src"}',
                          f'--out={scratch / "out"}', f'--param_dtype={_DTYPE.value}'],
                         env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
                         capture_output=True, text=True)
  import_s = time.perf_counter() - t
  if child.returncode:
    print(child.stderr[-2000:])
    raise SystemExit(child.returncode)
  peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # the import child
  out = {'dtype': _DTYPE.value, 'checkpoint_bytes': nbytes, 'import_peak_rss_bytes': peak,
         'ratio': peak / nbytes, 'write_seconds': write_s, 'import_seconds': import_s}
  if _STAGES.value:
    shutil.rmtree(scratch / 'out')
    child = subprocess.run(
        [sys.executable, '-m', 'dlm.bench.convert_memory',
         f'--stage_child={scratch / "src"},{scratch / "out2"},{_DTYPE.value}'],
        env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, capture_output=True, text=True)
    if child.returncode:
      print(child.stderr[-2000:])
      raise SystemExit(child.returncode)
    for stage, m in json.loads(child.stdout.strip().splitlines()[-1]).items():
      out[f'{stage}_peak_ratio'] = m['peak'] / nbytes
      out[f'{stage}_after_ratio'] = m['after'] / nbytes
  shutil.rmtree(scratch)
  bench.print_report(out)


if __name__ == '__main__':
  app.run(main)
