"""Samplers for the time-free masked diffusion LM (SPEC §4): pure functions with static shapes.

Strategies are siblings chosen by `SamplerConfig.strategy`:
  radd       the ancestral sampler of SPEC §4.1. Each token's reveal step is drawn up front
             (exactly the per-step reveal law of the schedule); the reference mode calls the
             network at every one of the n steps, the cached mode only at the steps where the row
             changes: the network has no time input, so an unchanged row has an unchanged output.
  semi_ar    LLaDA's block-wise low-confidence / random remasking with the exact per-step reveal
             counts (SPEC §4.2).
  threshold  Fast-dLLM: inside the current block reveal every masked token whose confidence
             exceeds a threshold, at least one per step; optional approximate KV cache of the
             prompt and finished blocks (`prefix`) or of everything outside the block (`dual`),
             refreshed once per block (SPEC §4.3).

Every sampler works on a canvas `x_BxL`: the mask id where a token is to be generated, anything
else is fixed and never changes (prompt, infilling suffix, left padding). `key_mask_BxL` is False
on padding keys. semi_ar / threshold generate in the last `gen_length` positions, block by block.
Each returns `(tokens_BxL, stats)`, stats = {'calls_B': network calls per row, 'reveal_step_BxL':
index of the row's call whose output revealed the token (-1 for fixed tokens), 'iterations':
batched forward passes run}. Everything is jittable, so an RL loop can roll out inside its jit.
"""
import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dlm import diffusion
from dlm import model as model_lib
from dlm import sharding
from dlm.errors import ConfigError

STRATEGIES = ('radd', 'semi_ar', 'threshold')
CATEGORICAL = ('exact', 'gumbel32')
REMASKING = ('low_confidence', 'random')
CACHES = ('none', 'prefix', 'dual')


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """Static sampler settings: hashable, so jit specialises on them and never on array values."""
  strategy: str = 'semi_ar'
  gen_length: int = 64  # tokens generated after the prompt
  steps: int = 64  # radd: grid steps n; semi_ar: total steps, split evenly over the blocks
  # radd (SPEC §4.1)
  radd_cached: bool = True
  schedule: str = 'loglinear'
  eps: float = 1e-3
  t_min: float = 1e-5  # the grid is linspace(1, t_min, steps + 1)
  categorical: str = 'exact'  # 'exact': 62-bit inverse CDF; 'gumbel32': float32 Gumbel-max
  # semi_ar / threshold (SPEC §4.2, §4.3)
  block_length: int = 16
  temperature: float = 0.0  # 0 = greedy
  cfg_scale: float = 0.0  # classifier-free guidance s: un + (s+1)(cond − un)
  remasking: str = 'low_confidence'
  threshold: float = 0.9  # reveal tokens with confidence > threshold (strict)
  cache: str = 'none'  # 'none' | 'prefix' | 'dual' (approximate KV cache, per block)

  def __post_init__(self):
    for name, valid in (('strategy', STRATEGIES), ('categorical', CATEGORICAL),
                        ('remasking', REMASKING), ('cache', CACHES),
                        ('schedule', diffusion.SCHEDULES)):
      if getattr(self, name) not in valid:
        raise ConfigError(f'sampler.{name}={getattr(self, name)!r}; valid: {valid}')
    if self.gen_length < 1 or self.steps < 1:
      raise ConfigError(f'sampler.gen_length={self.gen_length} and sampler.steps={self.steps} '
                       'must be ≥ 1')
    if self.temperature < 0 or self.cfg_scale < 0:
      raise ConfigError('sampler.temperature and sampler.cfg_scale must be ≥ 0')
    if not 0 < self.t_min < 1:
      raise ConfigError(f'sampler.t_min={self.t_min} must be in (0, 1)')
    if self.strategy == 'radd':
      return
    if self.block_length < 1 or self.gen_length % self.block_length:
      raise ConfigError(f'sampler.gen_length={self.gen_length} must be a multiple of '
                       f'sampler.block_length={self.block_length}')
    if self.strategy == 'semi_ar' and self.steps % self.num_blocks:
      raise ConfigError(f'sampler.steps={self.steps} must be a multiple of the number of blocks '
                       f'({self.num_blocks} = gen_length / block_length)')
    if self.strategy == 'threshold' and self.remasking != 'low_confidence':
      raise ConfigError("strategy='threshold' reveals by confidence: set "
                       "sampler.remasking='low_confidence'")

  @property
  def num_blocks(self) -> int:
    return self.gen_length // self.block_length


class Net(NamedTuple):
  """What a sampler needs of the network: float scores over every row (logits, or log-probs with
  the mask column -inf), normalised by the sampler (`log_probs`).

  apply(tokens_BxL, key_mask_BxL) -> scores_BxLxV; for cache != 'none' also
  encode(tokens_BxL, key_mask_BxL) -> (scores_BxLxV, kv) and
  window(kv, tokens_BxW, start, key_mask_BxL) -> scores_BxWxV (see model.encode_kv/decode_window).
  full_softmax: semi_ar / threshold rank and pick over every column, mask and padding rows
  included, as LLaDA's `generate` does (its confidences are a softmax over all 126 464 columns);
  False: over the real vocabulary only (SPEC §2). `radd` always excludes the mask column.
  """
  mask_id: int
  apply: Callable[..., jax.Array]
  encode: Callable[..., Any] | None = None
  window: Callable[..., jax.Array] | None = None
  full_softmax: bool = False
  # rows(tokens_BxL, key_mask_BxL, start, K) -> scores_BxKxV of positions [start, start+K) only
  # (the output head runs on those rows alone); None: slices `apply`'s output
  rows: Callable[..., jax.Array] | None = None


def as_net(model) -> Net:
  """A model.Transformer as a Net: LLaDA-family models follow LLaDA's `generate` (full_softmax),
  so greedy semi_ar reproduces it token for token."""
  if isinstance(model, Net):
    return model
  if isinstance(model, model_lib.Transformer):
    return Net(model.cfg.mask_id,
               lambda t, km: model.logits(t, key_mask_BxL=km),
               lambda t, km: model_lib.encode_kv(model, t, key_mask_BxL=km),
               lambda kv, t, s, km: model_lib.decode_window(model, kv, t, s, key_mask_BxL=km),
               full_softmax=model.cfg.family == 'llada',
               rows=lambda t, km, s, k: model.project(jax.lax.dynamic_slice_in_dim(
                   model.hidden(t, key_mask_BxL=km)[0], s, k, axis=1)))
  raise TypeError(f'expected a model.Transformer or a sampling.Net, got {type(model).__name__}')


def log_probs(scores_BxLxV: jax.Array, mask_id: int, full_softmax: bool = False) -> jax.Array:
  """float32 log-probs of network scores: over every column (full_softmax) or the real ones."""
  if full_softmax:
    return jax.nn.log_softmax(scores_BxLxV.astype(jnp.float32), axis=-1)
  return model_lib.real_log_softmax(scores_BxLxV, mask_id)


# ------------------------------------------------------------------------------------------------
# Categorical draws


def _add64(a, b):
  """(hi, lo) uint32 pairs as 64-bit integers: a + b with carry (associative, for scans)."""
  lo = a[1] + b[1]
  return a[0] + b[0] + (lo < a[1]).astype(jnp.uint32), lo


def _le64(a, b):
  return (a[0] < b[0]) | ((a[0] == b[0]) & (a[1] <= b[1]))


def exact_cdf(logp_NxV: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Inclusive CDF of the float32 probabilities as 62-bit fixed-point integers (hi, lo).

  Each probability keeps its float32 relative precision; the sum is exact integer arithmetic, so
  no token loses its mass to rounding (float32 cumsums and Gumbels truncate small probabilities).
  The total lies in [2^61, 2^62).
  """
  p = jnp.exp(logp_NxV - logp_NxV.max(-1, keepdims=True))  # the -inf mask column gets 0
  x = jnp.floor(p * (2.0 ** 61.5 / p.sum(-1, keepdims=True)))
  hi = jnp.floor(x * 2.0 ** -32)
  lo = x - hi * 2.0 ** 32  # exact (Sterbenz): hi·2^32 is within a factor 2 of x
  return jax.lax.associative_scan(_add64, (hi.astype(jnp.uint32), lo.astype(jnp.uint32)),
                                  axis=-1)


_EXACT_TRIES = 24


def categorical_exact(logp_NxV: jax.Array, bits_NxTx2: jax.Array) -> jax.Array:
  """Inverse-CDF draw, exact in 62-bit integers: u uniform below the total by rejection.

  Each of the T tries of 62 random bits lands below the total (≈ 2^61.5) with probability ≈ 0.71,
  so T = 24 tries all fail with probability ≈ 1e-13; then the last try is halved (still a token).
  """
  cdf_hi, cdf_lo = exact_cdf(logp_NxV)
  total = (cdf_hi[:, -1:], cdf_lo[:, -1:])
  u = (bits_NxTx2[..., 0] >> 2, bits_NxTx2[..., 1])
  ok_NxT = ~_le64(total, u)
  ok_NxT = ok_NxT.at[:, -1].set(True)
  first_N = jnp.argmax(ok_NxT, axis=-1)[:, None]
  u_hi = jnp.take_along_axis(u[0], first_N, -1)
  u_lo = jnp.take_along_axis(u[1], first_N, -1)
  u_hi = jnp.where(_le64(total, (u_hi, u_lo)), u_hi >> 1, u_hi)
  idx_N = _le64((cdf_hi, cdf_lo), (u_hi, u_lo)).sum(-1)  # first i with CDF_i > u
  return jnp.minimum(idx_N, logp_NxV.shape[-1] - 1).astype(jnp.int32)


def gumbel(key: jax.Array, shape) -> jax.Array:
  """Gumbel noise from 64 random bits per draw: the top tail reaches ~44 instead of float32's
  ~16, so low-temperature sampling does not silently drop unlikely tokens (LLaDA uses float64)."""
  bits = jax.random.bits(key, (*shape, 2), jnp.uint32)
  u = bits[..., 0].astype(jnp.float32) * 2.0 ** -32 + bits[..., 1].astype(jnp.float32) * 2.0 ** -64
  e = jnp.maximum(-jnp.log1p(-u), 2.0 ** -66)  # Exp(1), precise near 0
  return -jnp.log(e)


def _token_draw(cfg: SamplerConfig, key: jax.Array, B: int, L: int):
  """f(logp_BxLxV) -> tokens_BxL whose randomness is fixed per position, so a token drawn at any
  step with the same inputs gets the same value (cached and uncached samplers agree exactly)."""
  if cfg.categorical == 'gumbel32':
    return lambda logp: jax.random.categorical(key, logp, axis=-1).astype(jnp.int32)
  bits = jax.random.bits(key, (B * L, _EXACT_TRIES, 2), jnp.uint32)
  return lambda logp: categorical_exact(logp.reshape(B * L, -1), bits).reshape(B, L)


# ------------------------------------------------------------------------------------------------
# radd: the ancestral sampler with caching (SPEC §4.1)


def reveal_step_probs(cfg: SamplerConfig) -> np.ndarray:
  """P(a masked token is revealed at step k), k = 0..n-1, on the grid t_k = linspace(1, t_min).

  A token still masked at t is revealed by s < t with prob (α_s − α_t)/(1 − α_t), so it is still
  masked after step k with prob (1 − α_{t_{k+1}})/(1 − α_{t_0}); the last step reveals the rest.
  Log-linear: (1 − t_min)/n at every step, the last one also taking the t_min left over.
  """
  t = np.linspace(1.0, cfg.t_min, cfg.steps + 1)
  with jax.ensure_compile_time_eval():  # a constant of the config, also when traced under jit
    still = 1.0 - np.asarray(diffusion.alpha(cfg.schedule, t, cfg.eps), np.float64)
  still = np.clip(still / still[0], 0.0, 1.0)
  still[-1] = 0.0
  return -np.diff(np.minimum.accumulate(still))


def draw_reveal_steps(key: jax.Array, shape, cfg: SamplerConfig) -> jax.Array:
  """Each token's reveal step, iid from `reveal_step_probs` by inverse CDF: int32 in [0, n)."""
  cdf = jnp.asarray(np.cumsum(reveal_step_probs(cfg))[:-1], jnp.float32)
  u = jax.random.uniform(key, shape, jnp.float32)
  return jnp.searchsorted(cdf, u, side='right').astype(jnp.int32)


def expected_calls(n: int, l: int) -> float:
  """E[#distinct reveal steps] of l tokens uniform over n steps = calls of the cached sampler."""
  return n * (1.0 - (1.0 - 1.0 / n) ** l)


def radd(net, x_BxL: jax.Array, key: jax.Array, cfg: SamplerConfig,
         key_mask_BxL: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """SPEC §4.1 on a canvas: every mask position is generated, every other token stays fixed."""
  net = as_net(net)
  B, L = x_BxL.shape
  n = cfg.steps
  gen_BxL = x_BxL == net.mask_id
  k_step, k_val = jax.random.split(key)
  step_BxL = jnp.where(gen_BxL, draw_reveal_steps(k_step, (B, L), cfg), -1)
  draw = _token_draw(cfg, k_val, B, L)

  def reveal(x, sel_BxL):
    return jnp.where(sel_BxL, draw(log_probs(net.apply(x, key_mask_BxL), net.mask_id)), x)

  if cfg.radd_cached:
    # Each row's distinct reveal steps in increasing order, padded with n: the loop visits the
    # i-th one of every row at once and calls the network only max_b(#steps of row b) times.
    s_BxL = jnp.sort(jnp.where(gen_BxL, step_BxL, n), axis=-1)
    new_BxL = (s_BxL < n) & (s_BxL != jnp.pad(s_BxL, ((0, 0), (1, 0)), constant_values=-1)[:, :-1])
    events_BxL = jnp.sort(jnp.where(new_BxL, s_BxL, n), axis=-1)
    calls_B = new_BxL.sum(-1).astype(jnp.int32)
    iters = calls_B.max()

    def body(carry):
      i, x = carry
      ev_B = jax.lax.dynamic_index_in_dim(events_BxL, i, axis=1, keepdims=False)
      return i + 1, reveal(x, step_BxL == ev_B[:, None])

    _, x = jax.lax.while_loop(lambda c: c[0] < iters, body, (jnp.int32(0), x_BxL))
  else:
    x = jax.lax.fori_loop(0, n, lambda k, x: reveal(x, step_BxL == k), x_BxL)
    calls_B = jnp.full((B,), n, jnp.int32)
    iters = jnp.int32(n)
  # reveal_step = index of the row's call that revealed the token: the rank of its grid step
  # among the row's non-empty steps (cached) or the grid step itself (uncached: a call per step).
  call_BxL = step_BxL
  if cfg.radd_cached:
    call_BxL = jax.vmap(jnp.searchsorted)(events_BxL, step_BxL).astype(jnp.int32)
  return x, {'calls_B': calls_B, 'iterations': iters, 'grid_step_BxL': step_BxL,
             'reveal_step_BxL': jnp.where(gen_BxL, call_BxL, -1)}


# ------------------------------------------------------------------------------------------------
# semi_ar and threshold: block-wise remasking (SPEC §4.2, §4.3)


def reveal_counts(n_masked_B: jax.Array, steps: int) -> jax.Array:
  """LLaDA's per-step reveal counts: a block's masks spread as evenly as possible over its steps,
  the first (#masks mod steps) steps taking one extra. int32[B, steps]."""
  base_B, rem_B = n_masked_B // steps, n_masked_B % steps
  return (base_B[:, None] + (jnp.arange(steps)[None] < rem_B[:, None])).astype(jnp.int32)


def _propose(logp_BxKxV, masked_BxK, key, cfg: SamplerConfig):
  """Candidate tokens (argmax of logp/τ + Gumbel; τ = 0: argmax) and their confidence (the
  candidate's probability, or uniform noise for random remasking); -inf where not masked."""
  k_noise, k_conf = jax.random.split(key)
  scores = logp_BxKxV
  if cfg.temperature > 0:
    scores = logp_BxKxV / cfg.temperature + gumbel(k_noise, logp_BxKxV.shape)
  cand_BxK = jnp.argmax(scores, axis=-1).astype(jnp.int32)
  if cfg.remasking == 'random':
    conf_BxK = jax.random.uniform(k_conf, masked_BxK.shape)
  else:
    conf_BxK = jnp.exp(jnp.take_along_axis(logp_BxKxV, cand_BxK[..., None], -1)[..., 0])
  return cand_BxK, jnp.where(masked_BxK, conf_BxK, -jnp.inf)


def _guided(net: Net, cfg: SamplerConfig, prompt_BxL, key_mask_BxL):
  """(full, encode, window, block) network calls returning log-probs (normalised as `net.full_softmax`
  says), with classifier-free guidance folded in: the batch is doubled with an unconditional copy
  (prompt tokens → mask) and the scores recombined as LLaDA does, un + (s+1)(cond − un)."""
  s, mid, K = cfg.cfg_scale, net.mask_id, cfg.block_length
  norm = lambda scores: log_probs(scores, mid, net.full_softmax)
  rows = net.rows or (lambda x, km, start, k: jax.lax.dynamic_slice_in_dim(
      net.apply(x, km), start, k, axis=1))
  if s == 0:
    return (lambda x: norm(net.apply(x, key_mask_BxL)),
            lambda x: _map0(norm, net.encode(x, key_mask_BxL)),
            lambda kv, x_BxW, start: norm(net.window(kv, x_BxW, start, key_mask_BxL)),
            lambda x, start: norm(rows(x, key_mask_BxL, start, K)))
  km2 = jnp.concatenate([key_mask_BxL] * 2)

  def dup(x_BxW, start):
    prompt = jax.lax.dynamic_slice_in_dim(prompt_BxL, start, x_BxW.shape[1], axis=1)
    return jnp.concatenate([x_BxW, jnp.where(prompt, mid, x_BxW)])

  def guide(scores):
    cond, uncond = jnp.split(scores.astype(jnp.float32), 2)
    # A -inf mask column gives NaN here; without full_softmax `norm` drops that column anyway.
    return norm(uncond + (s + 1) * (cond - uncond))

  return (lambda x: guide(net.apply(dup(x, 0), km2)),
          lambda x: _map0(guide, net.encode(dup(x, 0), km2)),
          lambda kv, x_BxW, start: guide(net.window(kv, dup(x_BxW, start), start, km2)),
          lambda x, start: guide(rows(dup(x, 0), km2, start, K)))


def _map0(f, pair):
  return f(pair[0]), pair[1]


def _blockwise(net, x_BxL, key, cfg: SamplerConfig, key_mask_BxL):
  net = as_net(net)
  mid, (B, L), K = net.mask_id, x_BxL.shape, cfg.block_length
  if cfg.gen_length > L:
    raise ConfigError(f'gen_length={cfg.gen_length} exceeds the canvas length {L}')
  if cfg.cache != 'none' and net.encode is None:
    raise ConfigError(f"sampler.cache={cfg.cache!r} needs a network with encode/window "
                     '(a model.Transformer)')
  if key_mask_BxL is None:
    key_mask_BxL = jnp.ones((B, L), bool)
  full, encode, window, block = _guided(net, cfg, (x_BxL != mid) & key_mask_BxL, key_mask_BxL)
  semi_ar = cfg.strategy == 'semi_ar'
  max_steps = cfg.steps // cfg.num_blocks if semi_ar else K  # threshold: ≥ 1 token per step
  gen0 = L - cfg.gen_length
  # LLaDA's generate ranks every still-masked position before the block's end, not only the
  # block's: a position whose argmax was the mask token itself (full softmax) stays a candidate
  # in later blocks. Followed for LLaDA-family nets without a cache; otherwise (and in Fast-dLLM's
  # cached decoding) a step sees the current block only.
  whole = semi_ar and net.full_softmax and cfg.cache == 'none'
  R = L if whole else K  # the region a step ranks: [r0, r0 + R), r0 = 0 (whole) or the block

  def run_block(carry, start, static_start):
    x = carry[0]
    n_masked_B = (jax.lax.dynamic_slice_in_dim(x, start, K, axis=1) == mid).sum(-1)
    counts_BxS = reveal_counts(n_masked_B, max_steps)
    r0 = 0 if whole else start

    def step(carry, logp_BxRxV):
      x, i, it, reveal_BxL, calls_B = carry
      xr = jax.lax.dynamic_slice_in_dim(x, r0, R, axis=1)
      masked = (xr == mid) & (r0 + jnp.arange(R) < start + K)[None]
      cand, conf = _propose(logp_BxRxV, masked, jax.random.fold_in(key, it), cfg)
      if semi_ar:
        rank_BxR = jnp.argsort(jnp.argsort(-conf, axis=-1, stable=True), axis=-1, stable=True)
        k_B = jax.lax.dynamic_index_in_dim(counts_BxS, i, axis=1, keepdims=False)
        sel = masked & (rank_BxR < k_B[:, None])
      else:
        top1 = jnp.arange(R)[None] == jnp.argmax(conf, axis=-1)[:, None]
        sel = masked & ((conf > cfg.threshold) | top1)
      rr = jax.lax.dynamic_slice_in_dim(reveal_BxL, r0, R, axis=1)
      rr = jnp.where(sel, calls_B[:, None], rr)
      x = jax.lax.dynamic_update_slice_in_dim(x, jnp.where(sel, cand, xr), r0, axis=1)
      reveal_BxL = jax.lax.dynamic_update_slice_in_dim(reveal_BxL, rr, r0, axis=1)
      calls_B = calls_B + masked.any(-1)
      return x, i + 1, it + 1, reveal_BxL, calls_B

    def block_logp(logp, offset=0):  # the block's rows of a full (offset=start) or window output
      return jax.lax.dynamic_slice_in_dim(logp, offset, K, axis=1)

    def unfinished(carry):
      xb = jax.lax.dynamic_slice_in_dim(carry[0], start, K, axis=1)
      return (carry[1] < max_steps) & (xb == mid).any()

    carry = (x, jnp.int32(0), *carry[1:])
    if whole:
      body = lambda c: step(c, full(c[0]))
    elif cfg.cache == 'none':  # the head runs on the block's rows only
      body = lambda c: step(c, block(c[0], start))
    else:  # refresh the cache once per block; its first step uses the full forward's output
      logp, kv = encode(x)
      carry = step(carry, block_logp(logp, start))
      if cfg.cache == 'prefix':  # window = the block and everything after it (static length)
        body = lambda c: step(c, block_logp(window(kv, c[0][:, static_start:], static_start)))
      else:  # dual: window = the block only; the suffix's k/v are cached too
        body = lambda c: step(c, block_logp(window(
            kv, jax.lax.dynamic_slice_in_dim(c[0], start, K, axis=1), start)))
    carry = jax.lax.while_loop(unfinished, body, carry)
    return (carry[0], *carry[2:])

  carry = (x_BxL, jnp.int32(0), jnp.full((B, L), -1, jnp.int32), jnp.zeros((B,), jnp.int32))
  if cfg.cache == 'prefix':  # window lengths differ per block: unrolled over blocks
    for b in range(cfg.num_blocks):
      carry = run_block(carry, gen0 + b * K, gen0 + b * K)
  else:
    carry = jax.lax.fori_loop(0, cfg.num_blocks,
                              lambda b, c: run_block(c, gen0 + b * K, None), carry)
  x, iters, reveal_BxL, calls_B = carry
  return x, {'calls_B': calls_B, 'reveal_step_BxL': reveal_BxL, 'iterations': iters}


def semi_ar(net, x_BxL, key, cfg: SamplerConfig, key_mask_BxL=None):
  """LLaDA `generate` (SPEC §4.2) on a canvas whose last cfg.gen_length positions are generated."""
  return _blockwise(net, x_BxL, key, dataclasses.replace(cfg, strategy='semi_ar'), key_mask_BxL)


def threshold(net, x_BxL, key, cfg: SamplerConfig, key_mask_BxL=None):
  """Fast-dLLM confidence-threshold parallel decoding (SPEC §4.3), optional KV cache."""
  return _blockwise(net, x_BxL, key, dataclasses.replace(cfg, strategy='threshold'), key_mask_BxL)


SAMPLERS = {'radd': radd, 'semi_ar': semi_ar, 'threshold': threshold}


def canvas(prompt_BxP, prompt_mask_BxP, gen_length: int, mask_id: int):
  """Left-padded prompts followed by gen_length masks: (x_BxL, key_mask_BxL). Padding gets a
  non-mask id (it is fixed, and hidden from attention by the key mask)."""
  B = prompt_BxP.shape[0]
  pad_id = 1 if mask_id == 0 else 0
  prompt = jnp.where(prompt_mask_BxP, prompt_BxP, pad_id).astype(jnp.int32)
  x = jnp.concatenate([prompt, jnp.full((B, gen_length), mask_id, jnp.int32)], axis=1)
  km = jnp.concatenate([prompt_mask_BxP.astype(bool), jnp.ones((B, gen_length), bool)], axis=1)
  return x, km


def sample(net, prompt_BxP, prompt_mask_BxP, key, cfg: SamplerConfig):
  """The one entry point: (tokens_BxL, stats) for left-padded prompts (mask False on padding),
  generating cfg.gen_length tokens after them with cfg.strategy. Pure; static shapes."""
  net = as_net(net)
  x, km = canvas(prompt_BxP, prompt_mask_BxP, cfg.gen_length, net.mask_id)
  return SAMPLERS[cfg.strategy](net, x, key, cfg, km)


@functools.partial(jax.jit, static_argnames=('graphdef', 'cfg', 'mesh', 'rules'))
def sample_params(graphdef, params, prompt_BxP, prompt_mask_BxP, key, *, cfg: SamplerConfig,
                  mesh=None, rules=sharding.DEFAULT_RULES):
  """`sample` for a split model (graphdef, params): compiled once per (shapes, cfg, graphdef,
  mesh). With a mesh (the parameters' own, `sharding.mesh_of(params)`) the rows are
  data-parallel: prompts and every activation are sharded by batch over the rules'
  data-parallel axes (`rules`: a hashable tuple of (name, axes) pairs) and the outputs come
  back replicated, so every process can read them."""
  with sharding.activation_sharding(mesh, rules):
    rows = lambda a: sharding.constrain(a, ('activation_batch',) + (None,) * (a.ndim - 1))
    out = sample(nnx.merge(graphdef, params), rows(prompt_BxP), rows(prompt_mask_BxP), key, cfg)
    return jax.tree.map(lambda a: sharding.constrain(a, ()), out)  # replicated


def data_parallel(params, prompt_BxP, prompt_mask_BxP, rules=sharding.DEFAULT_RULES,
                  local: bool = False):
  """(prompts, mask, mesh, rules) for `sample_params` on the parameters' own mesh: the prompts
  placed as global arrays sharded by batch when the data-parallel axes divide the rows (each
  device then samples its own rows), mesh None on one device. `local`: the prompts are only
  this process's rows (`sharding.process_rows`) of the global batch, assembled across processes
  (RL rollouts: each process samples and scores its own prompts)."""
  mesh, rules = sharding.mesh_of(params), sharding.hashable_rules(rules)
  if mesh is None or mesh.size == 1:
    return prompt_BxP, prompt_mask_BxP, None, rules
  prompts = (prompt_BxP, prompt_mask_BxP)
  shardings = sharding.batch_shardings(prompts, mesh, rules)
  if local:
    prompts = sharding.global_batch(prompts, shardings)
  elif len(prompt_BxP) % sharding.data_parallel_size(mesh, rules) == 0:
    prompts = sharding.put_global(prompts, shardings)
  elif jax.process_count() > 1:  # replicated: a global array, as jit needs across processes
    prompts = sharding.put_global(prompts, (sharding.replicated(mesh),) * 2)
  return (*prompts, mesh, rules)
