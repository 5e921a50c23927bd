"""Outside checkpoints in and out: LLaDA (Hugging Face remote-code layout) and RADD (SPEC §7).

  import_checkpoint(src, out)  an outside folder (config.json + *.safetensors, sharded or not)
                               → a dlm workdir `out` (checkpoints/0 with params and config, plus
                               the source's tokenizer files), loadable by `dlm.workdir.load`,
                               `--config.init.checkpoint`, sample and eval modes
  export_llada(src, out)       a dlm workdir → LLaDA's layout (config.json, sharded safetensors
                               with model.safetensors.index.json, tokenizer files)
  load_model(src)              an outside folder → `dlm.model.Transformer` with its weights

Untrusted input: only safetensors are read (never unpickled); a missing, extra, mis-shaped or
truncated tensor is an error naming it, found from the headers before any data is read; output
is written to a temporary folder renamed into place at the end, so an error leaves nothing.
Tensors stream one dlm parameter at a time into their shardings: no random initialisation and
no second copy of the model.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any

import jax
import ml_dtypes
import numpy as np
from etils import epath

from dlm import checkpoint as ckpt_lib
from dlm import model as model_lib
from dlm import sharding
from dlm import trainer as trainer_lib
from dlm import workdir as workdir_lib
from dlm.convert import layouts
from dlm.errors import ConfigError, DataError, MissingFileError

PICKLES = ('.bin', '.pth', '.pt', '.ckpt', '.pkl', '.pickle')
TOKENIZER_FILES = (workdir_lib.TOKENIZER, 'tokenizer.json', 'tokenizer_config.json',
                   'chat_template.jinja', 'special_tokens_map.json', 'generation_config.json')
DTYPES = {'float32': np.float32, 'bfloat16': ml_dtypes.bfloat16}
STEP = 0  # the step an imported checkpoint is saved as


def _safetensors_files(src: epath.Path) -> list[epath.Path]:
  files = sorted(src.glob('*.safetensors'))
  if files:
    return files
  pickles = sorted(p.name for p in src.iterdir() if p.suffix in PICKLES)
  if pickles:
    raise DataError(
        f'{src} holds only pickle files ({", ".join(pickles)}), which are never loaded (they can '
        'run code). Convert them once where you trust them: python -c "import torch; from '
        'safetensors.torch import save_file; save_file(torch.load(\'IN\', weights_only=True), '
        '\'OUT.safetensors\')"')
  raise MissingFileError(f'no *.safetensors file in {src}')


def tensor_index(src) -> dict[str, tuple[epath.Path, tuple[int, ...], str]]:
  """name → (file, shape, dtype) from the safetensors headers alone (no tensor data read)."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  index = {}
  for f in _safetensors_files(epath.Path(src)):
    try:
      with safe_open(os.fspath(f), framework='numpy') as h:
        for name in h.keys():
          s = h.get_slice(name)
          index[name] = (f, tuple(s.get_shape()), s.get_dtype())
    except Exception as e:  # SafetensorError: truncated or malformed header
      raise DataError(f'{f} is not a readable safetensors file ({type(e).__name__}: '
                      f'{str(e)[:200]})') from e
  return index


def read_config(src) -> dict:
  path = epath.Path(src) / 'config.json'
  if not path.exists():
    raise MissingFileError(f'{path} not found: the source folder needs its config.json')
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise DataError(f'{path} is not valid JSON ({e})') from e


def check_tensors(fmt: str, model: dict, index: dict) -> list[layouts.Slot]:
  """The layout's slots after checking names and shapes against the headers."""
  slots = layouts.slots(fmt, model)
  expected = {s.name: s for s in slots}
  missing = sorted(set(expected) - set(index))
  extra = sorted(set(index) - set(expected) - set(layouts.IGNORED[fmt]))
  if missing or extra:
    raise DataError(f'the {fmt} checkpoint does not match its config.json: missing tensors '
                    f'{missing[:5] or "none"}{" …" if len(missing) > 5 else ""}, unexpected '
                    f'tensors {extra[:5] or "none"}{" …" if len(extra) > 5 else ""}')
  for s in slots:
    shape = index[s.name][1]
    if shape != s.outside_shape:
      raise DataError(f'tensor {s.name} has shape {shape}, but config.json implies '
                      f'{s.outside_shape}')
  return slots


def _read(index, name: str) -> np.ndarray:
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  f = index[name][0]
  try:
    with safe_open(os.fspath(f), framework='numpy') as h:
      return h.get_tensor(name)
  except Exception as e:
    raise DataError(f'reading tensor {name} from {f} failed ({type(e).__name__}: '
                    f'{str(e)[:200]})') from e


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _set(tree, path, value):
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def read_params(src, fmt: str | None = None, param_dtype: str = 'float32', mesh=None,
                dtype: str = 'auto'):
  """(model section, graphdef, params) of an outside folder, each parameter assembled on the
  host from its tensors and placed into its sharding before the next is read. `dtype`: the
  compute dtype (model.dtype; 'auto' = bfloat16 on accelerators, float32 on CPU)."""
  src = epath.Path(src)
  config = read_config(src)
  fmt = fmt or layouts.detect(config)
  if param_dtype not in DTYPES:
    raise ConfigError(f'param_dtype={param_dtype!r}; valid: {tuple(DTYPES)}')
  model = {**layouts.model_section(fmt, config), 'param_dtype': param_dtype, 'dtype': dtype}
  index = tensor_index(src)
  slots = check_tensors(fmt, model, index)
  mcfg = model_lib.config_from(model)
  mesh = mesh or sharding.make_mesh({'data': 1, 'fsdp': -1, 'tensor': 1})
  graphdef, abstract = trainer_lib.abstract_params(mcfg, mesh, sharding.DEFAULT_RULES)
  by_param: dict[tuple, list[layouts.Slot]] = {}
  for s in slots:
    by_param.setdefault(s.path, []).append(s)
  params: dict[str, Any] = {}
  for path, group in by_param.items():
    target = _get(abstract, path)
    host = _aligned_empty(target.shape, DTYPES[param_dtype])
    for s in group:
      # to_dlm is a view (transpose/reshape) and the copy into `host` converts the dtype, so
      # each tensor is copied once, and freed before the next is read.
      host[s.index] = s.to_dlm(_read(index, s.name))
    _set(params, path, _to_device(host, target.sharding))
    del host
  return model, graphdef, params, fmt


# XLA's CPU client adopts a host buffer aligned to this many bytes instead of copying it.
_ALIGN = 64


def _aligned_empty(shape, dtype) -> np.ndarray:
  """np.empty(shape, dtype) whose data starts on a _ALIGN-byte boundary (numpy's own large
  allocations sit 16 bytes past a page start)."""
  dtype = np.dtype(dtype)
  nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  raw = np.empty(nbytes + _ALIGN, np.uint8)
  start = -raw.ctypes.data % _ALIGN
  return raw[start:start + nbytes].view(dtype).reshape(shape)


def _to_device(host: np.ndarray, sharding) -> jax.Array:
  """`host` as a jax.Array with `sharding`. On a one-device CPU sharding the array adopts the
  (aligned) host buffer instead of copying it, so a parameter exists once, not twice, while it
  is placed; other devices get copies of their shards. `host` is not written afterwards."""
  return jax.device_put(host, sharding, may_alias=True)


def load_model(src, fmt: str | None = None, param_dtype: str = 'float32', dtype: str = 'auto'):
  """The outside checkpoint in `src` as a `dlm.model.Transformer`: calling it gives log-probs
  over the real vocabulary (mask column −inf), `.logits` the raw scores over every row."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  _, graphdef, params, _ = read_params(src, fmt, param_dtype, dtype=dtype)
  return nnx.merge(graphdef, params)


def _fresh_out(out) -> tuple[epath.Path, epath.Path]:
  out = epath.Path(out)
  if out.exists() and any(out.iterdir()):
    raise ConfigError(f'--out={out} exists and is not empty; give a new folder')
  tmp = out.parent / f'.{out.name}.partial-{os.getpid()}'
  if tmp.exists():
    shutil.rmtree(tmp)
  tmp.mkdir(parents=True)
  return out, tmp


def _publish(tmp: epath.Path, out: epath.Path) -> None:
  if out.exists():
    out.rmdir()  # empty, checked before
  tmp.rename(out)


def import_checkpoint(src, out, fmt: str | None = None, param_dtype: str = 'float32',
                      tokenizer=None) -> str:
  """Writes the dlm workdir `out` from the outside folder `src`; returns `out`.

  The tokenizer files come from `src` (LLaDA ships them), or from `tokenizer`: a folder with a
  Hugging Face tokenizer.json (RADD's checkpoints use GPT-2's, which they do not ship) or a
  dlm tokenizer.model file. It must fit the model (its mask id is the model's)."""
  src = epath.Path(src)
  if not src.is_dir():
    raise MissingFileError(f'--src={src} is not a folder')
  tok_src = _tokenizer_files(epath.Path(tokenizer)) if tokenizer else _tokenizer_files(src)
  out, tmp = _fresh_out(out)
  try:
    model, _, params, fmt = read_params(src, fmt, param_dtype)
    config = {'mode': 'import', 'seed': 0, 'model': model,
              'sharding': {'data': 1, 'fsdp': -1, 'tensor': 1,
                           'rules': sharding.DEFAULT_RULES},
              'source': {'format': fmt, 'path': str(src)}}
    # Uncompressed: orbax then writes from the parameters' own buffers instead of holding a
    # compressed copy of all of them until the save commits (BENCHMARKS.md, import memory).
    ckpt_lib.save_uncompressed(str(tmp), STEP, {'params': params}, '[]', config)
    del params
    for f in tok_src:
      shutil.copyfile(f, tmp / f.name)
    if workdir_lib.has_tokenizer(tmp):
      workdir_lib.model_config(model, workdir_lib.load_tokenizer(tmp))  # fits, or ConfigError
    else:
      logging.warning('%s has no tokenizer: sampling, evaluation and RL need one; import again '
                      'with --tokenizer=<folder with tokenizer.json>', src)
    _publish(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return str(out)


def _tokenizer_files(path: epath.Path) -> list[epath.Path]:
  """The tokenizer files at `path` (a folder, or a tokenizer.model / tokenizer.json file)."""
  if path.is_file():
    if path.name not in (workdir_lib.TOKENIZER, workdir_lib.HF_TOKENIZER):
      raise ConfigError(f'--tokenizer={path}: expected a folder, {workdir_lib.TOKENIZER} or '
                        f'{workdir_lib.HF_TOKENIZER}')
    return [path]
  if not path.is_dir():
    raise MissingFileError(f'tokenizer {path} not found')
  return [path / name for name in TOKENIZER_FILES if (path / name).exists()]


def export_llada(src, out, use_ema: bool = True, max_shard_bytes: int = 5 * 2**30) -> str:
  """Writes the dlm workdir `src`'s model (a LLaDA-family one) in LLaDA's layout to `out`."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  loaded = workdir_lib.load(src, use_ema=use_ema, need_tokenizer=False)
  model, params = loaded.config['model'], workdir_lib.base_params(loaded)  # LoRA folded in
  if model['family'] != 'llada':
    raise ConfigError(f'{src} holds a {model["family"]} model; --export=llada needs a LLaDA one')
  out, tmp = _fresh_out(out)
  try:
    shards, current, size = [], {}, 0
    for s in layouts.slots('llada', model):
      a = np.ascontiguousarray(s.to_outside(np.asarray(_get(params, s.path)[s.index])))
      if current and size + a.nbytes > max_shard_bytes:
        shards.append(current)
        current, size = {}, 0
      current[s.name] = a
      size += a.nbytes
    shards.append(current)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
      name = f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors'
      save_file(shard, os.fspath(tmp / name), metadata={'format': 'pt'})
      weight_map.update({k: name for k in shard})
      total += sum(a.nbytes for a in shard.values())
      shard.clear()
    (tmp / 'model.safetensors.index.json').write_text(json.dumps(
        {'metadata': {'total_size': total}, 'weight_map': weight_map}, indent=2))
    cfg = layouts.outside_config('llada', model)
    cfg['torch_dtype'] = 'bfloat16' if model['param_dtype'] == 'bfloat16' else 'float32'
    (tmp / 'config.json').write_text(json.dumps(cfg, indent=2))
    for f in _tokenizer_files(epath.Path(src)):
      shutil.copyfile(f, tmp / f.name)
    _publish(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return str(out)
