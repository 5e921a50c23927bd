"""The time-free bidirectional transformer of RADD / LLaDA (SPEC §2, §7) in Flax NNX.

No time input and no causal mask: the network maps a partially masked sequence to
log q(x_i | unmasked tokens) at every position. Parameter layouts follow the outside checkpoints
(SPEC §7) up to reshapes, so importers map names, not math. Every parameter carries logical axis
names (`out_sharding` metadata) that `dlm.sharding` maps onto the mesh.
"""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from dlm import attention
from dlm import sharding
from dlm.errors import ConfigError

FAMILIES = ('radd', 'llada')
REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}
LORA_TARGETS = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')  # d1's choice: every projection
LORA_PREFIX = 'lora_'  # adapter parameters' names start with it (what trains under LoRA)
# Logical axes of activations (dlm.sharding's rules map them onto the mesh; constraints act
# only inside `sharding.activation_sharding`, i.e. in the jitted steps and samplers).
ACT_BxLxD = ('activation_batch', 'activation_length', 'activation_embed')
ACT_BxLxNxH = ('activation_batch', 'activation_length', 'activation_heads', None)
ACT_BxLxV = ('activation_batch', 'activation_length', 'activation_vocab')
ACT_BxL = ('activation_batch', 'activation_length')

nnx.use_eager_sharding(False)  # shardings are applied explicitly by dlm.sharding


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static model hyperparameters (hashable, so jit can close over them)."""
  num_embeddings: int  # rows of embedding and output head, mask row included
  mask_id: int
  d_model: int
  n_layers: int
  n_heads: int
  mlp_dim: int
  family: str = 'radd'
  rope_base: float = 1e4
  norm_eps: float = 1e-5
  dropout: float = 0.0
  param_dtype: str = 'float32'
  dtype: str = 'float32'
  remat: str = 'none'
  # up to this many layers run unrolled (no stacked residual buffers: a RADD-size step is
  # ~10–25 % faster on XLA:CPU at 4 layers); deeper models run them as one `lax.scan`, whose
  # compile time and program size do not grow with depth
  max_unrolled_layers: int = 8
  # positions per output-head chunk in `token_logp` (0 = all at once): each live copy of a
  # chunk's logits is B·head_chunk·V float32 (B = rows per device)
  head_chunk: int = 128
  attention: str = 'auto'  # 'auto' | 'xla' | 'cudnn' | 'splash' (dlm.attention)
  # LoRA adapters (rank 0 = none): W x + (alpha / rank)·B(A x) on the named projections; with
  # adapters only they train (dlm.trainer), the base stays as loaded (e.g. bfloat16)
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = LORA_TARGETS

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ConfigError(f'model.family={self.family!r}; valid: {FAMILIES}')
    if self.remat not in REMAT_POLICIES:
      raise ConfigError(f'model.remat={self.remat!r}; valid: {tuple(REMAT_POLICIES)}')
    for k in ('param_dtype', 'dtype'):
      if getattr(self, k) not in DTYPES:
        raise ConfigError(f'model.{k}={getattr(self, k)!r}; valid: {tuple(DTYPES)}')
    if self.attention not in attention.IMPLEMENTATIONS:
      raise ConfigError(f'model.attention={self.attention!r}; valid: {attention.IMPLEMENTATIONS}')
    if self.lora_rank < 0 or not set(self.lora_targets) <= set(LORA_TARGETS):
      raise ConfigError(f'model.lora: rank={self.lora_rank} must be ≥ 0 and targets '
                        f'{self.lora_targets} among {LORA_TARGETS}')
    if self.head_chunk < 0:
      raise ConfigError(f'model.head_chunk={self.head_chunk} must be ≥ 0 (0 = no chunking)')
    if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
      raise ConfigError(f'model.d_model={self.d_model} must split into {self.n_heads} heads of '
                       'even size (RoPE rotates half-heads)')
    if not 0 <= self.mask_id < self.num_embeddings:
      raise ConfigError(f'model.mask_id={self.mask_id} outside [0, {self.num_embeddings})')

  @property
  def scan_layers(self) -> bool:
    return self.n_layers > self.max_unrolled_layers

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads


def config_from(model_cfg, num_embeddings: int | None = None) -> ModelConfig:
  """ModelConfig from the `model` section (ConfigDict or saved dict); num_embeddings=0 there is
  filled in by the caller, mask_id=-1 means the last row, dtype='auto' picks by platform."""
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  kw = {k: v for k, v in model_cfg.items() if k in fields}
  if num_embeddings is not None and not kw.get('num_embeddings'):
    kw['num_embeddings'] = num_embeddings
  if kw.get('mask_id', -1) < 0:
    kw['mask_id'] = kw['num_embeddings'] - 1
  if kw.get('dtype') == 'auto':
    kw['dtype'] = auto_dtype()
  lora = model_cfg.get('lora') or {}
  if lora:
    targets = lora.get('targets', LORA_TARGETS)
    kw.update(lora_rank=int(lora.get('rank', 0)), lora_alpha=float(lora.get('alpha', 16.0)),
              lora_targets=tuple(targets.split(',') if isinstance(targets, str) else targets))
  return ModelConfig(**kw)


def auto_dtype() -> str:
  """model.dtype='auto': bfloat16 compute on accelerators (f32 master weights stay), float32 on
  CPU, where bf16 matmuls are slower and tests compare against f32 references."""
  return 'float32' if jax.default_backend() == 'cpu' else 'bfloat16'


def real_log_softmax(logits_BxLxV: jax.Array, mask_id: int) -> jax.Array:
  """Float32 log-probabilities with the mask column removed from the support (SPEC §2).

  The mask row exists for checkpoint compatibility only: it gets log-prob -inf and never
  receives probability mass, so a loss or sampler can never produce the mask token.
  """
  logits = logits_BxLxV.astype(jnp.float32)
  is_mask = jnp.arange(logits.shape[-1]) == mask_id
  logits = jnp.where(is_mask, -jnp.inf, logits)
  return jax.nn.log_softmax(logits, axis=-1)


def _mask_bias(num_embeddings: int, mask_id: int) -> jax.Array:
  """[V] float32: 0, and -inf at the mask column (added, not selected: no [.., V] predicate)."""
  return jnp.where(jnp.arange(num_embeddings) == mask_id, -jnp.inf, 0.0).astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def target_logp(logits_BxCxV: jax.Array, targets_BxC: jax.Array, mask_id: int) -> jax.Array:
  """real_log_softmax(logits)[target], float32 [B, C], with the gradient written as
  g·(onehot(target) − softmax): one pass over the logits backward, where autodiff of the
  log-softmax and the gather adds a scatter and two more (the head is a tenth of a
  RADD-size train step)."""
  return _target_logp_fwd(logits_BxCxV, targets_BxC, mask_id)[0]


def _target_logp_fwd(logits_BxCxV, targets_BxC, mask_id):
  z = logits_BxCxV.astype(jnp.float32) + _mask_bias(logits_BxCxV.shape[-1], mask_id)
  lse_BxC = jax.nn.logsumexp(z, axis=-1)
  zt_BxC = jnp.take_along_axis(z, targets_BxC[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return zt_BxC - lse_BxC, (logits_BxCxV, targets_BxC, lse_BxC)


def _target_logp_bwd(mask_id, res, g_BxC):
  logits_BxCxV, targets_BxC, lse_BxC = res
  V = logits_BxCxV.shape[-1]
  p = jnp.exp(logits_BxCxV.astype(jnp.float32) + _mask_bias(V, mask_id) - lse_BxC[..., None])
  onehot = jnp.arange(V) == targets_BxC[..., None]
  d = g_BxC[..., None] * (onehot.astype(jnp.float32) - p)
  return d.astype(logits_BxCxV.dtype), None


target_logp.defvjp(_target_logp_fwd, _target_logp_bwd)


def _param(rngs, init, shape, names, dtype):
  return nnx.Param(nnx.with_partitioning(init, names)(rngs.params(), shape, dtype))


class Adapter(nnx.Module):
  """A LoRA adapter of a projection [*in, *out]: A [*in, r] (normal, 1/√fan_in) and B [r, *out]
  (zero, so the adapted model starts as the base), float32 whatever the base's dtype."""

  def __init__(self, rngs, rank: int, in_shape, in_names, out_shape, out_names):
    self.a = _param(rngs, nnx.initializers.normal(stddev=math.prod(in_shape) ** -0.5),
                    (*in_shape, rank), (*in_names, None), jnp.float32)
    self.b = _param(rngs, nnx.initializers.zeros, (rank, *out_shape), (None, *out_names),
                    jnp.float32)


def _lora(module, rngs, cfg, name: str, in_shape, in_names, out_shape, out_names):
  """Sets module.lora_<name>: an Adapter when cfg adapts that projection, else None."""
  adapt = cfg.lora_rank > 0 and name in cfg.lora_targets
  setattr(module, f'{LORA_PREFIX}{name}',
          Adapter(rngs, cfg.lora_rank, in_shape, in_names, out_shape, out_names)
          if adapt else None)


def _adapted(module, name: str, x_MxI, dt, in_axes: int = 1):
  """(alpha / r)·B(A x) of adapter `name` for tokens-first inputs; None where there is none."""
  adapter = getattr(module, f'{LORA_PREFIX}{name}', None)
  if adapter is None:
    return None
  cfg = module.cfg
  xa = jnp.tensordot(x_MxI, adapter.a[...].astype(dt), axes=in_axes)
  return (cfg.lora_alpha / cfg.lora_rank) * jnp.tensordot(xa, adapter.b[...].astype(dt), axes=1)


def _plus(y, delta):
  return y if delta is None else y + delta


def _dense_init(fan_in):
  return nnx.initializers.normal(stddev=fan_in ** -0.5)


def rope(x_BxLxNxH: jax.Array, base: float, pos_L: jax.Array | None = None) -> jax.Array:
  """Rotate-half rotary embedding over the whole head (NeoX / LLaDA) at positions pos_L
  (default 0..L-1; a cached window passes its absolute positions)."""
  L, H = x_BxLxNxH.shape[1], x_BxLxNxH.shape[-1]
  pos_L = jnp.arange(L) if pos_L is None else pos_L
  inv_freq = base ** (-jnp.arange(0, H, 2, dtype=jnp.float32) / H)
  ang_LxH2 = pos_L.astype(jnp.float32)[:, None] * inv_freq[None, :]
  cos = jnp.concatenate([jnp.cos(ang_LxH2)] * 2, -1)[None, :, None, :]
  sin = jnp.concatenate([jnp.sin(ang_LxH2)] * 2, -1)[None, :, None, :]
  x = x_BxLxNxH.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x * cos + rotated * sin).astype(x_BxLxNxH.dtype)


def _tokens_first(f, x_BxLx___):
  """Apply a per-token map on [B·L, ...]: XLA:CPU runs 2-D matmuls and their element-wise
  backward about twice as fast as the same ops on [B, L, D]."""
  B, L = x_BxLx___.shape[:2]
  y = f(x_BxLx___.reshape(B * L, *x_BxLx___.shape[2:]))
  return y.reshape(B, L, *y.shape[1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x_MxD: jax.Array, w_D: jax.Array, b_D: jax.Array, eps: float) -> jax.Array:
  """Non-affine LayerNorm then x·w + b over the last axis (RADD), float32, with the standard
  closed-form backward: two fused passes where autodiff makes four (≈ 3 % of a RADD-size train
  step on XLA:CPU)."""
  return _layer_norm_fwd(x_MxD, w_D, b_D, eps)[0]


def _layer_norm_fwd(x, w, b, eps):
  mu = jnp.mean(x, -1, keepdims=True)
  r = jax.lax.rsqrt(jnp.mean(jnp.square(x - mu), -1, keepdims=True) + eps)
  return (x - mu) * r * w + b, (x, w, mu, r)


def _layer_norm_bwd(eps, res, dy):
  del eps
  x, w, mu, r = res
  xhat = (x - mu) * r
  g = dy * w
  dx = r * (g - jnp.mean(g, -1, keepdims=True) - xhat * jnp.mean(g * xhat, -1, keepdims=True))
  rows = tuple(range(dy.ndim - 1))
  return dx, jnp.sum(dy * xhat, rows), jnp.sum(dy, rows)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class Norm(nnx.Module):
  """RADD: non-affine LayerNorm then x·w + b; LLaDA: RMSNorm with weight."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, bias_init=nnx.initializers.zeros):
    pd = DTYPES[cfg.param_dtype]
    self.cfg = cfg
    self.weight = _param(rngs, nnx.initializers.ones, (cfg.d_model,), ('norm',), pd)
    self.bias = (_param(rngs, bias_init, (cfg.d_model,), ('norm',), pd)
                 if cfg.family == 'radd' else None)

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    if self.bias is None:
      y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + self.cfg.norm_eps)
      y = y * self.weight[...]
    else:
      y = layer_norm(x32, self.weight[...], self.bias[...], self.cfg.norm_eps)
    return y.astype(DTYPES[self.cfg.dtype])


class Attention(nnx.Module):
  """Bidirectional multi-head attention with RoPE on q and k (v unrotated), no biases."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    pd, d, n, h = DTYPES[cfg.param_dtype], cfg.d_model, cfg.n_heads, cfg.head_dim
    self.cfg = cfg
    # RADD attn_qkv [3d, d] (rows q|k|v, head, head-dim) and LLaDA q/k/v_proj both map here.
    self.qkv = _param(rngs, _dense_init(d), (d, 3, n, h), ('embed', None, 'heads', None), pd)
    self.out = _param(rngs, _dense_init(d), (n, h, d), ('heads', None, 'embed'), pd)
    for name in 'qkv':
      _lora(self, rngs, cfg, name, (d,), ('embed',), (n, h), ('heads', None))
    _lora(self, rngs, cfg, 'o', (n, h), ('heads', None), (d,), ('embed',))

  def __call__(self, x_BxWxD, key_mask_BxL, start=0, kv=None):
    """Attention of the window [start, start+W) of an L-token sequence. Keys and values outside
    the window come from `kv` (the cache: [B, L, N, H] each); kv=None means W is the whole
    sequence. Returns (output, the window's fresh (k, v))."""
    dt = DTYPES[self.cfg.dtype]
    q, k, v = (_tokens_first(lambda x, j=j: self._proj(x, j, dt), x_BxWxD) for j in range(3))
    pos_W = start + jnp.arange(x_BxWxD.shape[1])
    q, k = (rope(a, self.cfg.rope_base, pos_W) for a in (q, k))
    k_all, v_all = k, v
    if kv is not None:
      k_all = jax.lax.dynamic_update_slice_in_dim(kv[0], k.astype(kv[0].dtype), start, axis=1)
      v_all = jax.lax.dynamic_update_slice_in_dim(kv[1], v.astype(kv[1].dtype), start, axis=1)
    impl = attention.resolve(self.cfg.attention, dt, self.cfg.head_dim)
    o_BxWxNxH = attention.attend(q, k_all.astype(q.dtype), v_all.astype(q.dtype), key_mask_BxL,
                                 impl)
    out = _tokens_first(lambda o: _plus(jnp.einsum('mnh,nhd->md', o, self.out[...].astype(dt)),
                                        _adapted(self, 'o', o, dt, in_axes=2)), o_BxWxNxH)
    return out, (k, v)

  def _proj(self, x_MxD, j: int, dt):
    """q, k or v (j = 0, 1, 2) [M, N, H]: three projections, not one [M, 3, N, H] sliced
    three ways, whose backward pads and adds the three gradients (≈ 3 % of a RADD-size train
    step on XLA:CPU)."""
    y = jnp.einsum('md,dnh->mnh', x_MxD, self.qkv[...][:, j].astype(dt))
    return _plus(y, _adapted(self, 'qkv'[j], x_MxD, dt))


class Mlp(nnx.Module):
  """RADD: Linear(+b) → GELU-tanh → Linear(+b); LLaDA: SwiGLU (silu(gate)·up → down)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    pd, d, f = DTYPES[cfg.param_dtype], cfg.d_model, cfg.mlp_dim
    self.cfg = cfg
    self.w_in = _param(rngs, _dense_init(d), (d, f), ('embed', 'mlp'), pd)
    self.w_out = _param(rngs, _dense_init(f), (f, d), ('mlp', 'embed'), pd)
    if cfg.family == 'radd':
      self.b_in = _param(rngs, nnx.initializers.zeros, (f,), ('mlp',), pd)
      self.b_out = _param(rngs, nnx.initializers.zeros, (d,), ('norm',), pd)
      self.w_up = None
    else:
      self.w_up = _param(rngs, _dense_init(d), (d, f), ('embed', 'mlp'), pd)
    for name in ('gate', 'up') if self.w_up is not None else ('gate',):  # RADD has no 'up'
      _lora(self, rngs, cfg, name, (d,), ('embed',), (f,), ('mlp',))
    _lora(self, rngs, cfg, 'down', (f,), ('mlp',), (d,), ('embed',))

  def __call__(self, x_BxLxD):
    return _tokens_first(self._per_token, x_BxLxD)

  def _per_token(self, x_MxD):
    dt = DTYPES[self.cfg.dtype]
    h = _plus(x_MxD @ self.w_in[...].astype(dt), _adapted(self, 'gate', x_MxD, dt))
    if self.w_up is None:
      h = jax.nn.gelu(h + self.b_in[...].astype(dt), approximate=True)
      return (_plus(h @ self.w_out[...].astype(dt), _adapted(self, 'down', h, dt)) +
              self.b_out[...].astype(dt))
    h = jax.nn.silu(h) * _plus(x_MxD @ self.w_up[...].astype(dt), _adapted(self, 'up', x_MxD, dt))
    return _plus(h @ self.w_out[...].astype(dt), _adapted(self, 'down', h, dt))


class Block(nnx.Module):
  """Pre-norm residual block; dropout on both residual branches (RADD: 0.02)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    # The released RADD recipe initialises the LayerNorm bias to ones (SPEC §2.1).
    bias_init = nnx.initializers.ones if cfg.family == 'radd' else nnx.initializers.zeros
    self.cfg = cfg
    self.norm1 = Norm(cfg, rngs, bias_init)
    self.attn = Attention(cfg, rngs)
    self.norm2 = Norm(cfg, rngs, bias_init)
    self.mlp = Mlp(cfg, rngs)

  def __call__(self, x_BxWxD, key_mask_BxL, dropout_key, start=0, kv=None):
    """(output, fresh (k, v)) of the window [start, start+W); see Attention."""
    k1, k2 = (None, None) if dropout_key is None else jax.random.split(dropout_key)
    a, new_kv = self.attn(self.norm1(x_BxWxD), key_mask_BxL, start, kv)
    x_BxWxD = x_BxWxD + self._drop(a, k1)
    return x_BxWxD + self._drop(self.mlp(self.norm2(x_BxWxD)), k2), new_kv

  def _drop(self, y, key):
    p = self.cfg.dropout
    if p == 0.0 or key is None:
      return y
    keep = jax.random.bernoulli(key, 1.0 - p, y.shape)
    return jnp.where(keep, y / (1.0 - p), 0).astype(y.dtype)


class Transformer(nnx.Module):
  """tokens [B, L] → log-probs [B, L, num_embeddings] (mask column = -inf). No time input.

  `logits` gives the raw float32 scores over every row (mask and padding rows included), for
  code that must follow an outside convention (LLaDA's `generate` normalises over all columns)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    pd, d, V = DTYPES[cfg.param_dtype], cfg.d_model, cfg.num_embeddings
    self.cfg = cfg
    self.embed = _param(rngs, nnx.initializers.normal(stddev=d ** -0.5), (V, d),
                        ('vocab', 'embed'), pd)

    @nnx.split_rngs(splits=cfg.n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
    def make_blocks(rngs):
      return Block(cfg, rngs)

    self.blocks = make_blocks(rngs)
    self.norm_final = Norm(cfg, rngs)
    # RADD zero-initialises the output layer: at init every real token has prob 1/V.
    head_init = nnx.initializers.zeros if cfg.family == 'radd' else _dense_init(d)
    self.head = _param(rngs, head_init, (d, V), ('embed', 'vocab'), pd)
    self.head_bias = (_param(rngs, nnx.initializers.zeros, (V,), ('vocab',), pd)
                      if cfg.family == 'radd' else None)

  def __call__(self, tokens_BxL, *, key_mask_BxL=None, dropout_key=None):
    """key_mask_BxL: False on padding keys (e.g. left-padded prompts); None = attend to all."""
    return real_log_softmax(self.logits(tokens_BxL, key_mask_BxL=key_mask_BxL,
                                        dropout_key=dropout_key), self.cfg.mask_id)

  def logits(self, tokens_BxL, *, key_mask_BxL=None, dropout_key=None):
    """Raw float32 logits [B, L, num_embeddings]: the mask and padding rows are not removed."""
    return self.forward(tokens_BxL, key_mask_BxL=key_mask_BxL, dropout_key=dropout_key)[0]

  def forward(self, tokens_BxW, *, key_mask_BxL=None, dropout_key=None, start=0, kv=None,
              return_kv=False):
    """(float32 logits of the window [start, start+W), per-layer (k, v) of the window or None).

    The one forward path: training and plain sampling see the whole sequence (start 0, no kv);
    cached samplers (Fast-dLLM) pass the other positions' keys/values as kv, stacked
    [n_layers, B, L, N, H]."""
    h_BxWxD, new_kv = self.hidden(tokens_BxW, key_mask_BxL=key_mask_BxL, dropout_key=dropout_key,
                                  start=start, kv=kv, return_kv=return_kv)
    return self.project(h_BxWxD), new_kv

  def hidden(self, tokens_BxW, *, key_mask_BxL=None, dropout_key=None, start=0, kv=None,
             return_kv=False):
    """(final-normed hidden states [B, W, d_model], per-layer (k, v) or None): `forward`
    before the output head."""
    cfg, dt = self.cfg, DTYPES[self.cfg.dtype]
    # The lookup reads the table gathered over fsdp, still split over the vocabulary.
    table = sharding.constrain(self.embed[...].astype(dt),
                               ('activation_vocab', 'activation_embed'))
    x = sharding.constrain(table[tokens_BxW], ACT_BxLxD)
    train = dropout_key is not None and cfg.dropout > 0
    keys = (jax.random.split(dropout_key, cfg.n_layers) if train
            else jnp.zeros((cfg.n_layers, 2), jnp.uint32))
    gdef, layers = nnx.split(self.blocks)

    def layer(x, inputs):
      params, key, kv_l = inputs
      x = sharding.constrain(x, ACT_BxLxD)
      x, new_kv = nnx.merge(gdef, params)(x, key_mask_BxL, key if train else None, start, kv_l)
      x = sharding.constrain(x, ACT_BxLxD)
      if not return_kv:
        return x, None
      return x, tuple(sharding.constrain(a, ACT_BxLxNxH) for a in new_kv)

    if cfg.remat != 'none':  # unrolled layers need prevent_cse (a scan body does not) so XLA
      # cannot merge the recomputation back into the forward pass
      layer = jax.checkpoint(layer, policy=REMAT_POLICIES[cfg.remat],
                             prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      x, new_kv = jax.lax.scan(layer, x, (layers, keys, kv))
    else:
      x, new_kv = _unrolled(layer, x, (layers, keys, kv), cfg.n_layers)
    return self.norm_final(x), new_kv

  def project(self, h_BxCxD):
    """The output head: float32 logits [B, C, num_embeddings] of final hidden states."""
    bias = None if self.head_bias is None else self.head_bias[...]
    return _project(self.head[...], bias, h_BxCxD, DTYPES[self.cfg.dtype])

  def token_logp(self, tokens_BxL, targets_BxL, *, key_mask_BxL=None, dropout_key=None):
    """log q(targets_BxL | tokens_BxL), float32 [B, L], over the real vocabulary: all that the
    losses and RL objectives read. The head runs over chunks of `cfg.head_chunk` positions, each
    under remat, so at most one chunk's [B, C, V] logits exist at a time, forward or backward
    (the full [B, L, V] tensor is the largest activation of a big-vocabulary model);
    head_chunk=0 projects every position at once."""
    cfg, dt = self.cfg, DTYPES[self.cfg.dtype]
    h_BxLxD, _ = self.hidden(tokens_BxL, key_mask_BxL=key_mask_BxL, dropout_key=dropout_key)
    head, bias = self.head[...], None if self.head_bias is None else self.head_bias[...]

    def chunk_logp(h_BxCxD, t_BxC):
      return target_logp(_project(head, bias, h_BxCxD, dt), t_BxC, cfg.mask_id)

    B, L, D = h_BxLxD.shape
    C = cfg.head_chunk
    if not C or C >= L:
      return chunk_logp(h_BxLxD, targets_BxL)
    n = -(-L // C)
    pad = lambda a: jnp.pad(a, [(0, 0), (0, n * C - L)] + [(0, 0)] * (a.ndim - 2))
    h_NxBxCxD = pad(h_BxLxD).reshape(B, n, C, D).swapaxes(0, 1)
    t_NxBxC = pad(targets_BxL).reshape(B, n, C).swapaxes(0, 1)
    logp_NxBxC = jax.lax.map(lambda a: jax.checkpoint(chunk_logp)(*a), (h_NxBxCxD, t_NxBxC))
    return sharding.constrain(logp_NxBxC.swapaxes(0, 1).reshape(B, n * C)[:, :L], ACT_BxL)


def _unrolled(layer, x, xs, n: int):
  """`lax.scan(layer, x, xs)` as n inlined calls: no loop, so no stacked residual buffers (zeroed,
  then written slice by slice) and XLA fuses across layer boundaries. Each leaf of xs is split
  once (jnp.split: its transpose is one concatenate, so the stacked gradient is written once)."""
  parts = jax.tree.map(lambda a: jnp.split(a, n), xs)
  ys = []
  for i in range(n):
    x, y = layer(x, jax.tree.map(lambda p: p[i][0], parts, is_leaf=lambda p: isinstance(p, list)))
    ys.append(y)
  return x, (None if ys[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *ys))


def _project(head_DxV, bias_V, h_BxCxD, dt):
  """h·head (+ bias) in float32: the matmul takes `dt` inputs and accumulates in float32
  (logits rounded to bf16 would quantise every NLL by ~0.1 nats)."""
  logits = _tokens_first(lambda h: jnp.matmul(h.astype(dt), head_DxV.astype(dt),
                                              preferred_element_type=jnp.float32), h_BxCxD)
  logits = sharding.constrain(logits, ACT_BxLxV)
  return logits if bias_V is None else logits + bias_V.astype(jnp.float32)


def merge_lora(params: dict, cfg: ModelConfig) -> dict:
  """The base parameters with every LoRA adapter folded in (W + (alpha/r)·A·B), adapters
  removed: the same function as the adapted model, for export or for a model without them."""
  if not has_lora(params):
    return params
  scale = cfg.lora_alpha / cfg.lora_rank
  attn, mlp = dict(params['blocks']['attn']), dict(params['blocks']['mlp'])

  def delta(ab):  # per layer: A [L, *in, r] · B [L, r, *out] → [L, *in, *out]
    a, b = ab['a'], ab['b']
    L, r = a.shape[0], a.shape[-1]
    ab_LxIxO = jnp.einsum('lir,lro->lio', a.reshape(L, -1, r).astype(jnp.float32),
                          b.reshape(L, r, -1).astype(jnp.float32))
    return scale * ab_LxIxO.reshape(*a.shape[:-1], *b.shape[2:])

  for j, name in enumerate('qkv'):
    ab = attn.pop(f'{LORA_PREFIX}{name}', None)
    if ab is not None:
      w = attn['qkv']
      attn['qkv'] = w.at[:, :, j].add(delta(ab).astype(w.dtype))
  targets = (('o', attn, 'out'), ('gate', mlp, 'w_in'), ('up', mlp, 'w_up'),
             ('down', mlp, 'w_out'))
  for name, group, weight in targets:
    ab = group.pop(f'{LORA_PREFIX}{name}', None)
    if ab is not None:
      group[weight] = group[weight] + delta(ab).astype(group[weight].dtype)
  return {**params, 'blocks': {**params['blocks'], 'attn': attn, 'mlp': mlp}}


def is_adapter(path) -> bool:
  """Whether a parameter path (keys from the root) lies in a LoRA adapter."""
  return any(str(k).startswith(LORA_PREFIX) for k in path)


def has_lora(params: dict) -> bool:
  return any(is_adapter(path) for path in _paths(params))


def _paths(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _paths(v, prefix + (k,))
    else:
      yield prefix + (k,)


def count_params(cfg: ModelConfig) -> int:
  """Parameter count from shapes alone (jax.eval_shape: nothing is allocated)."""
  abstract = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


# ------------------------------------------------------------------------------------------------
# KV cache for samplers (Fast-dLLM prefix / dual cache): thin names over Transformer.forward.


def encode_kv(model: Transformer, tokens_BxL, *, key_mask_BxL=None):
  """Full forward that also returns every layer's k and v: (logits_BxLxV, (k, v)), k/v shaped
  [n_layers, B, L, n_heads, head_dim]. The same computation as `model.logits(tokens_BxL)`."""
  return model.forward(tokens_BxL, key_mask_BxL=key_mask_BxL, return_kv=True)


def decode_window(model: Transformer, kv, tokens_BxW, start, *, key_mask_BxL=None):
  """Logits of the window [start, start+W) only: its queries attend to fresh k/v inside the
  window and to the cached `kv` (from `encode_kv`) everywhere else. Exact when the tokens outside
  the window are those `kv` was computed on and the window's own tokens did not change; an
  approximation (Fast-dLLM) when they did. `start` may be traced; W and L are static."""
  return model.forward(tokens_BxW, key_mask_BxL=key_mask_BxL, start=start, kv=kv)[0]
