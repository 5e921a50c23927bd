"""Outside checkpoint layouts (SPEC §7) as name maps onto dlm's parameter tree.

Each outside tensor maps to one slot of a dlm parameter: `path` in the pure parameter dict and,
for per-layer tensors, the layer index into the stacked leading axis. The transforms are reshapes
and transposes only (PyTorch [out, in] → dlm [in, out]; fused or per-projection q/k/v → dlm's
[d, 3, heads, head_dim]), so import and export are exact inverses of each other.
Plain numpy: no JAX, no torch.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from dlm.errors import DataError

FORMATS = ('llada', 'radd')


@dataclasses.dataclass(frozen=True)
class Slot:
  """One outside tensor ↔ part of a dlm parameter."""
  name: str  # outside name
  path: tuple[str, ...]  # dlm parameter path
  index: tuple  # where the slot sits in that parameter (layer; q/k/v third), () = all of it
  outside_shape: tuple[int, ...]
  to_dlm: Callable[[np.ndarray], np.ndarray]  # outside array → the dlm slot's array
  to_outside: Callable[[np.ndarray], np.ndarray]  # the dlm slot's array → outside array


def _t(a):
  return a.T  # a view; works on numpy arrays and on abstract (traced) ones alike


def model_section(fmt: str, config: dict) -> dict:
  """dlm's `model` config section from an outside config.json."""
  if fmt == 'llada':
    kv = config.get('n_kv_heads') or config['n_heads']
    if kv != config['n_heads']:
      raise DataError(f'n_kv_heads={kv} differs from n_heads={config["n_heads"]}: grouped-query '
                      'attention is not supported')
    if config.get('weight_tying'):
      raise DataError('weight_tying=true is not supported (LLaDA-8B unties its output head)')
    return {'family': 'llada', 'num_embeddings': int(config['embedding_size'] or
                                                      config['vocab_size']),
            'mask_id': int(config['mask_token_id']), 'd_model': int(config['d_model']),
            'n_layers': int(config['n_layers']), 'n_heads': int(config['n_heads']),
            'mlp_dim': int(config['mlp_hidden_size']),
            'rope_base': float(config.get('rope_theta', 10000.0)),
            'norm_eps': float(config.get('rms_norm_eps', 1e-5)), 'dropout': 0.0,
            'param_dtype': 'float32', 'dtype': 'auto', 'remat': 'none'}
  m = config['model']
  d = int(m['hidden_size'])
  vocab = int(config['tokens'])
  return {'family': 'radd', 'num_embeddings': vocab + 1, 'mask_id': vocab, 'd_model': d,
          'n_layers': int(m['n_blocks']), 'n_heads': int(m['n_heads']), 'mlp_dim': 4 * d,
          'rope_base': 10000.0, 'norm_eps': 1e-5, 'dropout': float(m.get('dropout', 0.0)),
          'param_dtype': 'float32', 'dtype': 'auto', 'remat': 'none'}


def outside_config(fmt: str, model: dict) -> dict:
  """The outside config.json fields that describe a dlm model (export)."""
  if fmt != 'llada':
    raise DataError(f'export to {fmt!r} is not supported; formats: llada')
  return {'model_type': 'llada', 'architectures': ['LLaDAModelLM'], 'block_type': 'llama',
          'activation_type': 'silu', 'd_model': model['d_model'], 'n_heads': model['n_heads'],
          'n_kv_heads': model['n_heads'], 'n_layers': model['n_layers'],
          'mlp_hidden_size': model['mlp_dim'], 'mlp_ratio': model['mlp_dim'] // model['d_model'],
          'vocab_size': model['num_embeddings'], 'embedding_size': model['num_embeddings'],
          'mask_token_id': model['mask_id'], 'rope_theta': model['rope_base'],
          'rms_norm_eps': model['norm_eps'], 'weight_tying': False, 'include_bias': False,
          'rope': True, 'layer_norm_type': 'rms'}


def slots(fmt: str, model: dict) -> list[Slot]:
  """Every outside tensor of a model with dlm config section `model`."""
  d, n, L = model['d_model'], model['n_heads'], model['n_layers']
  h, f, V = d // n, model['mlp_dim'], model['num_embeddings']
  out: list[Slot] = []

  def add(name, path, layer, shape, to_dlm, to_outside):
    index = () if layer is None else (layer,)
    if path[-1] in (0, 1, 2):  # q/k/v: the j-th third of qkv [layer, d, 3, n, h]
      path, index = path[:-1], (layer, slice(None), path[-1])
    out.append(Slot(name, path, index, tuple(shape), to_dlm, to_outside))

  ident = lambda a: a
  if fmt == 'llada':
    p = 'model.transformer'
    add(f'{p}.wte.weight', ('embed',), None, (V, d), ident, ident)
    for i in range(L):
      b = f'{p}.blocks.{i}'
      add(f'{b}.attn_norm.weight', ('blocks', 'norm1', 'weight'), i, (d,), ident, ident)
      for j, proj in enumerate(('q_proj', 'k_proj', 'v_proj')):
        # [n·h, d] → qkv[:, j] of [d, 3, n, h]
        add(f'{b}.{proj}.weight', ('blocks', 'attn', 'qkv', j), i, (n * h, d),
            lambda a: _t(a).reshape(d, n, h), lambda a: _t(a.reshape(d, n * h)))
      add(f'{b}.attn_out.weight', ('blocks', 'attn', 'out'), i, (d, n * h),
          lambda a: _t(a).reshape(n, h, d), lambda a: _t(a.reshape(n * h, d)))
      add(f'{b}.ff_norm.weight', ('blocks', 'norm2', 'weight'), i, (d,), ident, ident)
      add(f'{b}.ff_proj.weight', ('blocks', 'mlp', 'w_in'), i, (f, d), _t, _t)
      add(f'{b}.up_proj.weight', ('blocks', 'mlp', 'w_up'), i, (f, d), _t, _t)
      add(f'{b}.ff_out.weight', ('blocks', 'mlp', 'w_out'), i, (d, f), _t, _t)
    add(f'{p}.ln_f.weight', ('norm_final', 'weight'), None, (d,), ident, ident)
    add(f'{p}.ff_out.weight', ('head',), None, (V, d), _t, _t)
    return out
  if fmt != 'radd':
    raise DataError(f'unknown checkpoint format {fmt!r}; formats: {FORMATS}')
  add('vocab_embed.embedding', ('embed',), None, (V, d), ident, ident)
  for i in range(L):
    b = f'blocks.{i}'
    for norm in ('norm1', 'norm2'):
      add(f'{b}.{norm}.weight', ('blocks', norm, 'weight'), i, (d,), ident, ident)
      add(f'{b}.{norm}.bias', ('blocks', norm, 'bias'), i, (d,), ident, ident)
    add(f'{b}.attn_qkv.weight', ('blocks', 'attn', 'qkv'), i, (3 * d, d),
        lambda a: _t(a).reshape(d, 3, n, h), lambda a: _t(a.reshape(d, 3 * d)))
    add(f'{b}.attn_out.weight', ('blocks', 'attn', 'out'), i, (d, d),
        lambda a: _t(a).reshape(n, h, d), lambda a: _t(a.reshape(d, d)))
    add(f'{b}.mlp.0.weight', ('blocks', 'mlp', 'w_in'), i, (f, d), _t, _t)
    add(f'{b}.mlp.0.bias', ('blocks', 'mlp', 'b_in'), i, (f,), ident, ident)
    add(f'{b}.mlp.2.weight', ('blocks', 'mlp', 'w_out'), i, (d, f), _t, _t)
    add(f'{b}.mlp.2.bias', ('blocks', 'mlp', 'b_out'), i, (d,), ident, ident)
  add('output_layer.norm_final.weight', ('norm_final', 'weight'), None, (d,), ident, ident)
  add('output_layer.norm_final.bias', ('norm_final', 'bias'), None, (d,), ident, ident)
  add('output_layer.linear.weight', ('head',), None, (V, d), _t, _t)
  add('output_layer.linear.bias', ('head_bias',), None, (V,), ident, ident)
  return out


# Outside tensors that carry no parameters (recomputed buffers).
IGNORED = {'radd': ('rotary_emb.inv_freq',), 'llada': ()}


def detect(config: dict) -> str:
  """The format a config.json describes."""
  if config.get('model_type') == 'llada' or 'mlp_hidden_size' in config:
    return 'llada'
  if isinstance(config.get('model'), dict) and 'hidden_size' in config['model']:
    return 'radd'
  raise DataError('config.json is neither LLaDA (model_type "llada", d_model, n_layers, …) nor '
                  'RADD (model.hidden_size, model.n_blocks, tokens); pass --format=llada|radd')
