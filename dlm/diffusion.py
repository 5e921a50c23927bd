"""Absorbing (masking) diffusion: schedules, masking and the per-sequence pretraining losses.

Everything here is a pure function of arrays with static shapes, so it runs under jit and inside
`lax.scan`. Formulas follow SPEC §1 and §3. The network is time-free (SPEC §2): a loss only ever
reads the model's log-probs at masked positions, and it reads them through `jnp.where` so
whatever the model puts at unmasked positions (even inf/NaN) cannot reach the value.
"""
import jax
import jax.numpy as jnp

from dlm.errors import ConfigError

SCHEDULES = ('loglinear', 'linear', 'cosine')
LOSSES = ('lambda_dce', 't_dce', 't_dse', 'k_dce')

# λ = 0 can come out of stratified sampling (u = 0, row 0); the λ-DCE weight 1/λ must stay finite.
_MIN_LAMBDA = 1e-6


def _check(name: str, value: str, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ConfigError(f'Unknown {name} {value!r}; valid choices: {", ".join(choices)}.')


def _alpha_and_complement(schedule: str, t, eps: float):
  """(α_t, 1 − α_t), each in its own closed form so neither loses digits to cancellation."""
  _check('schedule', schedule, SCHEDULES)
  t = jnp.asarray(t, jnp.float32)
  if schedule == 'loglinear':
    one_minus = (1.0 - eps) * t
    return 1.0 - one_minus, one_minus
  if schedule == 'linear':
    return 1.0 - t, t
  # cosine: 1 − cos(θ) = 2 sin²(θ/2) with θ = π/2 · (1 − t).
  theta = 0.5 * jnp.pi * (1.0 - t)
  return 2.0 * jnp.sin(0.5 * theta) ** 2, jnp.cos(theta)


def alpha(schedule: str, t, eps: float = 1e-3) -> jax.Array:
  """α_t: the probability that a token is still clean at time t (1 at t = 0, ≈ 0 at t = 1)."""
  return _alpha_and_complement(schedule, t, eps)[0]


def weight(schedule: str, t, eps: float = 1e-3) -> jax.Array:
  """−α'_t / (1 − α_t): the continuous-time ELBO weight on each masked token's −log q.

  Closed form per schedule (no autodiff, no cancellation): log-linear gives exactly 1/t, which is
  what makes t-DSE and λ-DCE agree on the same mask.
  """
  _check('schedule', schedule, SCHEDULES)
  t = jnp.asarray(t, jnp.float32)
  if schedule in ('loglinear', 'linear'):
    return 1.0 / t
  theta = 0.5 * jnp.pi * (1.0 - t)
  return 0.5 * jnp.pi * jnp.tan(theta)


def dce_offset(schedule: str, t, eps: float = 1e-3) -> jax.Array:
  """log(e^σ̄ − 1) = log((1 − α_t)/α_t), the per-token constant that turns DSE into t-DCE."""
  a, one_minus = _alpha_and_complement(schedule, t, eps)
  return jnp.log(one_minus) - jnp.log(a)


def stratified_uniform(key: jax.Array, n: int) -> jax.Array:
  """(u + i)/n, i = 0..n−1, with one shared u ~ U(0,1): one draw per stratum, lower variance.

  Clamped below (i+1)/n: float32 rounding of u + i could otherwise land on the next stratum
  (and give exactly 1.0 in the last one).
  """
  u = jax.random.uniform(key, (), jnp.float32)
  i = jnp.arange(n, dtype=jnp.float32)
  return jnp.minimum((u + i) / n, jnp.nextafter((i + 1) / n, 0.0))


def mask_iid(key: jax.Array, p_B: jax.Array, maskable_BxL: jax.Array) -> jax.Array:
  """Mask each maskable position independently with its row's probability p_B[b]."""
  u_BxL = jax.random.uniform(key, maskable_BxL.shape, jnp.float32)
  return (u_BxL < jnp.asarray(p_B, jnp.float32)[:, None]) & maskable_BxL


def mask_exact_k(key: jax.Array, k_B: jax.Array, maskable_BxL: jax.Array) -> jax.Array:
  """Mask exactly k_B[b] maskable positions of row b, every such subset equally likely.

  Ranks of iid uniform scores are a uniform random permutation; non-maskable positions get a
  score above every maskable one so they rank last and are never chosen.
  """
  scores_BxL = jax.random.uniform(key, maskable_BxL.shape, jnp.float32)
  scores_BxL = jnp.where(maskable_BxL, scores_BxL, 2.0)
  rank_BxL = jnp.argsort(jnp.argsort(scores_BxL, axis=-1), axis=-1)
  k_B = jnp.asarray(k_B).astype(jnp.int32)
  return (rank_BxL < k_B[:, None]) & maskable_BxL


def corrupt(x0_BxL: jax.Array, mask_BxL: jax.Array, mask_id: int) -> jax.Array:
  """x_t: the clean tokens with masked positions replaced by the mask token."""
  return jnp.where(mask_BxL, jnp.asarray(mask_id, x0_BxL.dtype), x0_BxL)


def per_token_nll(logp_BxLxV: jax.Array, x0_BxL: jax.Array) -> jax.Array:
  """ℓ = −log q(x0 | x_t) at every position, float32 (only masked ones are used later)."""
  logp_BxL = jnp.take_along_axis(logp_BxLxV, x0_BxL[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return -logp_BxL.astype(jnp.float32)


def draw_noise(key: jax.Array, loss: str, maskable_BxL: jax.Array, schedule: str = 'loglinear',
               eps: float = 1e-3) -> tuple[jax.Array, jax.Array]:
  """Draw each row's noise level and its mask: returns (mask_BxL, noise_B).

  noise_B is λ for lambda_dce, t for t_dce/t_dse and k (as float) for k_dce; `sequence_loss`
  needs it to weight the row.
  """
  _check('loss', loss, LOSSES)
  _check('schedule', schedule, SCHEDULES)
  key_noise, key_mask = jax.random.split(key)
  B = maskable_BxL.shape[0]
  if loss == 'lambda_dce':
    lam_B = jnp.maximum(stratified_uniform(key_noise, B), _MIN_LAMBDA)
    return mask_iid(key_mask, lam_B, maskable_BxL), lam_B
  if loss in ('t_dce', 't_dse'):
    # t < 1 strictly, so α_t > 0 and the t-DCE offset stays finite for linear/cosine too.
    t_B = jnp.minimum((1.0 - eps) * stratified_uniform(key_noise, B) + eps,
                      jnp.nextafter(jnp.float32(1), jnp.float32(0)))
    p_B = _alpha_and_complement(schedule, t_B, eps)[1]
    return mask_iid(key_mask, p_B, maskable_BxL), t_B
  n_B = maskable_BxL.sum(-1).astype(jnp.int32)
  # k ~ U{1..n_b}; a row with nothing maskable gets k = 1 and an empty mask (loss 0).
  k_B = jax.random.randint(key_noise, (B,), 1, jnp.maximum(n_B, 1) + 1)
  return mask_exact_k(key_mask, k_B, maskable_BxL), k_B.astype(jnp.float32)


def sequence_loss(loss: str, nll_BxL: jax.Array, mask_BxL: jax.Array, noise_B: jax.Array,
                  maskable_BxL: jax.Array, schedule: str = 'loglinear',
                  eps: float = 1e-3) -> jax.Array:
  """Per-sequence loss of SPEC §3 (a sum over masked tokens, not a mean): float32[B].

  Each is an unbiased estimate of the same bound (the expected any-order autoregressive NLL for a
  time-free model). Only masked positions enter, selected with `jnp.where`.
  """
  _check('loss', loss, LOSSES)
  _check('schedule', schedule, SCHEDULES)
  mask_BxL = mask_BxL & maskable_BxL
  noise_B = jnp.asarray(noise_B, jnp.float32)
  masked_sum_B = jnp.where(mask_BxL, nll_BxL, 0.0).sum(-1)
  if loss == 'lambda_dce':
    return masked_sum_B / noise_B
  if loss == 't_dse':
    return weight(schedule, noise_B, eps) * masked_sum_B
  if loss == 't_dce':
    shifted_BxL = nll_BxL + dce_offset(schedule, noise_B, eps)[:, None]
    return weight(schedule, noise_B, eps) * jnp.where(mask_BxL, shifted_BxL, 0.0).sum(-1)
  n_B = maskable_BxL.sum(-1).astype(jnp.float32)
  return n_B / jnp.maximum(noise_B, 1.0) * masked_sum_B


def gather_targets(apply_fn):
  """A `logp_fn` for `diffusion_loss` from apply_fn(xt_BxL) -> float32 log-probs [B, L, V]."""
  return lambda xt_BxL, x0_BxL: -per_token_nll(apply_fn(xt_BxL), x0_BxL)


def diffusion_loss(logp_fn, x0_BxL: jax.Array, key: jax.Array, *, loss: str = 'lambda_dce',
                   schedule: str = 'loglinear', eps: float = 1e-3, mask_id: int,
                   maskable_BxL: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """One Monte Carlo draw of the per-sequence loss: returns (loss_B, num_tokens_B).

  logp_fn(xt_BxL, x0_BxL) -> float32 [B, L]: log q(x0 | x_t) at every position (a model's
  `token_logp`, which never builds the full [B, L, V] log-probs; `gather_targets` adapts a
  function that does).
  maskable_BxL=None masks anywhere (pretraining); SFT passes False on prompt positions, which are
  then never masked and never scored. num_tokens_B counts maskable positions, so
  sum(loss_B) / sum(num_tokens_B) is nats per token.
  """
  _check('loss', loss, LOSSES)
  _check('schedule', schedule, SCHEDULES)
  if maskable_BxL is None:
    maskable_BxL = jnp.ones(x0_BxL.shape, bool)
  mask_BxL, noise_B = draw_noise(key, loss, maskable_BxL, schedule, eps)
  nll_BxL = -logp_fn(corrupt(x0_BxL, mask_BxL, mask_id), x0_BxL).astype(jnp.float32)
  loss_B = sequence_loss(loss, nll_BxL, mask_BxL, noise_B, maskable_BxL, schedule, eps)
  return loss_B, maskable_BxL.sum(-1).astype(jnp.float32)
