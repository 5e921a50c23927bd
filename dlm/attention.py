"""Bidirectional attention with key-padding masks, by platform (`model.attention`).

  xla     plain einsums and a float32 softmax (the math of `jax.nn.dot_product_attention`'s
          XLA path): everywhere; materialises the [B, heads, T, S] scores.
  cudnn   cuDNN fused (flash) attention on NVIDIA GPUs, through the same JAX call: bf16/fp16
          inputs, head_dim ≤ 128 and a multiple of 8.
  splash  Pallas splash attention on TPU (`jax.experimental.pallas.ops.tpu.splash_attention`):
          a full (bidirectional) mask, key padding as segment ids, lengths padded to its blocks.
          Runs in Pallas interpret mode off TPU (tests only: slow).
  auto    the fused kernel of the platform when its constraints hold, else xla; the first
          fallback of each kind is logged with its reason.

Every implementation computes softmax(q·kᵀ/√h + mask)·v with the key mask broadcast over queries,
so they agree within float tolerance (tests/test_attention.py).
"""
import contextlib
import contextvars
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from dlm import sharding
from dlm.errors import ConfigError

IMPLEMENTATIONS = ('auto', 'xla', 'cudnn', 'splash')
_SPLASH_BLOCK = 128  # splash's tiles: lengths are padded up to a multiple of this
_logger = logging.getLogger(__name__)
_logged: set[str] = set()
# The platform the program is compiled for, where it is not this process's backend (the dry run
# compiles for TPU on any machine): see `compiling_for`.
_target = contextvars.ContextVar('dlm_attention_target_platform', default=None)


@contextlib.contextmanager
def compiling_for(platform: str):
  """Within the context, `resolve` picks implementations for `platform` ('tpu', 'gpu', 'cpu')."""
  token = _target.set(platform)
  try:
    yield
  finally:
    _target.reset(token)


def constraints(impl: str, dtype, head_dim: int, platform: str) -> str | None:
  """Why `impl` cannot run here ('' / None: it can)."""
  if impl == 'cudnn':
    if platform != 'gpu':
      return f'cuDNN attention needs an NVIDIA GPU (platform is {platform})'
    if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
      return f'cuDNN attention needs bfloat16/float16 inputs, not {jnp.dtype(dtype).name}'
    if head_dim > 128 or head_dim % 8:
      return f'cuDNN attention needs head_dim ≤ 128 and a multiple of 8, not {head_dim}'
  if impl == 'splash' and platform != 'tpu':
    return f'splash attention is a TPU kernel (platform is {platform}; interpret mode is for tests)'
  return None


def resolve(impl: str, dtype, head_dim: int, platform: str | None = None) -> str:
  """The implementation to run: `impl` itself (an error if it cannot run here), or for 'auto'
  the platform's fused kernel when its constraints hold, else 'xla' (logged once per reason)."""
  if impl not in IMPLEMENTATIONS:
    raise ConfigError(f'model.attention={impl!r}; valid: {IMPLEMENTATIONS}')
  platform = platform or _target.get() or jax.default_backend()
  if impl == 'xla':
    return impl
  if impl != 'auto':
    why = constraints(impl, dtype, head_dim, platform)
    if why:
      raise ConfigError(f'model.attention={impl!r}: {why}; use auto or xla')
    return impl
  fused = {'gpu': 'cudnn', 'tpu': 'splash'}.get(platform)
  if fused is None:
    return 'xla'
  why = constraints(fused, dtype, head_dim, platform)
  if why:
    if why not in _logged:
      _logged.add(why)
      _logger.warning('model.attention=auto: using xla attention: %s', why)
    return 'xla'
  return fused


def attend(q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, key_mask_BxS, impl: str,
           interpret: bool = False):
  """Attention output [B, T, N, H] of queries at T positions over S keys; key_mask_BxS False on
  padding keys (None: attend to all). `impl` is a resolved implementation (see `resolve`)."""
  if impl == 'splash':
    return _splash(q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, key_mask_BxS, interpret)
  if impl == 'xla':
    return _xla(q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, key_mask_BxS)
  mask = None if key_mask_BxS is None else key_mask_BxS[:, None, None, :]
  return jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, mask=mask,
                                      implementation=impl)


def _xla(q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, key_mask_BxS):
  """`jax.nn.dot_product_attention(implementation='xla')`'s math (float32 scores and softmax)
  as einsums with a hand-written backward (`_xla_attention`)."""
  bias_BxS = (None if key_mask_BxS is None else
              jnp.where(key_mask_BxS, 0.0, jnp.finfo(jnp.float32).min))
  return _xla_attention(q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, bias_BxS)


def _heads_first(x):
  """[B, T, N, H] ↔ [B, N, T, H]: heads-first operands make the score and value products plain
  batched matmuls over (B, N): on XLA:CPU one layer's attention forward + backward took ≈ 20 %
  less time than with einsums over the token-major layout, transposes included (BENCHMARKS.md)."""
  return jnp.swapaxes(x, 1, 2)


def _probs(q_BxNxTxH, k_BxNxSxH, bias_BxS):
  """Float32 softmax(q·kᵀ/√h + bias) [B, N, T, S]."""
  s_BxNxTxS = jnp.einsum('bnth,bnsh->bnts', q_BxNxTxH, k_BxNxSxH,
                         preferred_element_type=jnp.float32) * (q_BxNxTxH.shape[-1] ** -0.5)
  if bias_BxS is not None:
    s_BxNxTxS = s_BxNxTxS + bias_BxS[:, None, None, :]
  return jax.nn.softmax(s_BxNxTxS, axis=-1)


@jax.custom_vjp
def _xla_attention(q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, bias_BxS):
  return _xla_attention_fwd(q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, bias_BxS)[0]


def _xla_attention_fwd(q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, bias):
  q, k, v = map(_heads_first, (q_BxTxNxH, k_BxSxNxH, v_BxSxNxH))
  p_BxNxTxS = _probs(q, k, bias)
  o_BxNxTxH = jnp.einsum('bnts,bnsh->bnth', p_BxNxTxS.astype(v.dtype), v)
  return _heads_first(o_BxNxTxH), (q, k, v, bias, p_BxNxTxS, o_BxNxTxH)


def _xla_attention_bwd(res, do_BxTxNxH):
  """The softmax backward as dS = P·(dP − rowsum(dO·O)) (the flash-attention identity): one
  pass over the [B, N, T, S] tensors instead of autodiff's reductions and broadcasts of P·dP
  (≈ 5 % of a RADD-size train step on XLA:CPU)."""
  q, k, v, bias, p_BxNxTxS, o = res
  do = _heads_first(do_BxTxNxH)
  dp_BxNxTxS = jnp.einsum('bnth,bnsh->bnts', do, v, preferred_element_type=jnp.float32)
  rowsum_BxNxT = jnp.einsum('bnth,bnth->bnt', do.astype(jnp.float32), o.astype(jnp.float32))
  ds = (p_BxNxTxS * (dp_BxNxTxS - rowsum_BxNxT[..., None]) *
        (q.shape[-1] ** -0.5)).astype(q.dtype)
  dq = jnp.einsum('bnts,bnsh->bnth', ds, k)
  dk = jnp.einsum('bnts,bnth->bnsh', ds, q)
  dv = jnp.einsum('bnts,bnth->bnsh', p_BxNxTxS.astype(do.dtype), do)
  return (*map(_heads_first, (dq, dk, dv)), None if bias is None else jnp.zeros_like(bias))


_xla_attention.defvjp(_xla_attention_fwd, _xla_attention_bwd)


def _pad_to(x, axis: int, multiple: int, value=0):
  n = x.shape[axis]
  extra = -n % multiple
  if not extra:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def _splash_kernel(heads: int, T: int, S: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=g-import-not-at-top
      splash_attention_kernel as sk, splash_attention_mask as sm)
  mask = sm.MultiHeadMask([sm.FullMask((T, S))] * heads)
  b = min(_SPLASH_BLOCK, T, S)
  sizes = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                        block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
  return sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                            interpret=interpret)


def _splash(q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, key_mask_BxS, interpret: bool):
  """Splash attention; under an activation-sharding context (`dlm.sharding`) it runs per shard
  (`jax.shard_map`: rows over the data-parallel axes, heads over `tensor`), since XLA cannot
  partition the Pallas kernel itself."""
  B, S = k_BxSxNxH.shape[:2]
  if key_mask_BxS is None:
    key_mask_BxS = jnp.ones((B, S), bool)
  names = ('activation_batch', None, 'activation_heads', None)
  active = sharding.active_spec(names, q_BxTxNxH.shape)
  if active is None:
    return _splash_local(q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, key_mask_BxS, interpret)
  mesh, spec = active
  mask_spec = P(spec[0], None)
  return jax.shard_map(functools.partial(_splash_local, interpret=interpret), mesh=mesh,
                       in_specs=(spec, spec, spec, mask_spec), out_specs=spec,
                       check_vma=False)(q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, key_mask_BxS)


def _splash_local(q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, key_mask_BxS, interpret: bool):
  """Splash attention per example (vmapped): queries scaled by 1/√h (the kernel does not scale),
  padding keys (and the keys added to reach its tiles) in segment 0, every query in segment 1."""
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=g-import-not-at-top
      splash_attention_kernel as sk)
  B, T, N, H = q_BxTxNxH.shape
  scale = 1.0 / np.sqrt(H)
  to_heads = lambda x: _pad_to(jnp.swapaxes(x, 1, 2), 2, _SPLASH_BLOCK)  # [B, N, L', H]
  q = to_heads(q_BxTxNxH * jnp.asarray(scale, q_BxTxNxH.dtype))
  k, v = to_heads(k_BxSxNxH), to_heads(v_BxSxNxH)
  kv_seg = _pad_to(key_mask_BxS.astype(jnp.int32), 1, _SPLASH_BLOCK)
  q_seg = jnp.ones((B, q.shape[2]), jnp.int32)
  kernel = _splash_kernel(N, q.shape[2], k.shape[2], interpret)
  out = jax.vmap(lambda q, k, v, qs, ks: kernel(q, k, v, segment_ids=sk.SegmentIds(qs, ks)))(
      q, k, v, q_seg, kv_seg)
  return jnp.swapaxes(out[:, :, :T], 1, 2).astype(q_BxTxNxH.dtype)
