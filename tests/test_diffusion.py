"""Tests for dlm.diffusion: SPEC §3 golden values, the exact ELBO identities, masking, schedules."""
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlm import diffusion
from dlm.model import real_log_softmax

# SPEC §3 golden example: V = 5 real tokens, mask id 5 (its logit column must be ignored).
GOLD_LOGITS = np.array([[0.1, 1.2, -0.3, 0.5, 0.0, 9.0],
                        [2.0, 0.0, 0.0, 0.3, -1.0, 9.0],
                        [-0.5, 0.4, 1.1, 0.0, 0.2, 9.0],
                        [0.0, 0.0, 0.0, 0.0, 0.0, 9.0]], np.float32)
GOLD_X0 = np.array([1, 3, 0, 2])
GOLD_MASK = np.array([True, False, True, False])
GOLD_NLL = np.array([0.856023, 2.107557, 2.491146, 1.609438])


def _gold_nll():
  logp = real_log_softmax(jnp.asarray(GOLD_LOGITS)[None], 5)
  return diffusion.per_token_nll(logp, jnp.asarray(GOLD_X0)[None])


def test_golden_values():
  nll = _gold_nll()
  np.testing.assert_allclose(nll[0], GOLD_NLL, atol=1e-5)
  mask, maskable = jnp.asarray(GOLD_MASK)[None], jnp.ones((1, 4), bool)
  for loss, noise, want in [('lambda_dce', 0.5, 6.694338276), ('k_dce', 2.0, 6.694338276),
                            ('t_dse', 0.5, 6.694338276), ('t_dce', 0.5, 6.686338274)]:
    got = diffusion.sequence_loss(loss, nll, mask, jnp.array([noise]), maskable)
    np.testing.assert_allclose(got, [want], rtol=1e-6, err_msg=loss)


def test_k_dce_scales_by_maskable_count():
  # With positions 1 and 3 as prompt, n_b = 2 response tokens: k = 1 of them weighs 2/1.
  nll = _gold_nll()
  maskable = jnp.array([[True, False, True, False]])
  mask = jnp.array([[False, False, True, False]])
  got = diffusion.sequence_loss('k_dce', nll, mask, jnp.array([1.0]), maskable)
  np.testing.assert_allclose(got, [2 * GOLD_NLL[2]], rtol=1e-6)


def test_invalid_names_raise():
  with pytest.raises(ValueError, match='lambda_dce'):
    diffusion.sequence_loss('dce', jnp.zeros((1, 2)), jnp.zeros((1, 2), bool), jnp.ones(1),
                            jnp.ones((1, 2), bool))
  with pytest.raises(ValueError, match='loglinear'):
    diffusion.alpha('sqrt', 0.5)
  with pytest.raises(ValueError, match='cosine'):
    diffusion.diffusion_loss(lambda x: x, jnp.zeros((1, 2), jnp.int32), jax.random.key(0),
                             schedule='geometric', mask_id=3)


# ---- exact identities with a lookup-table model -------------------------------------------------
# The "model" is a table of random log-probs indexed by the whole input x_t, so it depends only on
# the unmasked tokens (their values and positions), exactly the model class of the RADD theorem.
V, L, MASK_ID = 3, 4, 3
X0 = np.array([2, 0, 1, 2])


def _table():
  logits = 1.5 * jax.random.normal(jax.random.key(42), ((V + 1) ** L, L, V))
  return np.asarray(jax.nn.log_softmax(logits, -1), np.float64)


def _code(xt):
  return sum(int(xt[j]) * (V + 1) ** j for j in range(L))


def _table_apply_fn(table):
  table_j = jnp.asarray(table, jnp.float32)
  powers = jnp.asarray([(V + 1) ** j for j in range(L)])
  return lambda xt_BxL: table_j[(xt_BxL * powers).sum(-1)]


def _nll_for_mask(table, mask):
  xt = np.where(mask, MASK_ID, X0)
  return -table[_code(xt)][np.arange(L), X0]


def _any_order_ar_nll(table):
  """Expected NLL of generating X0 in a uniformly random order, by enumerating all L! orders."""
  total = 0.0
  for order in itertools.permutations(range(L)):
    for step, pos in enumerate(order):
      mask = np.ones(L, bool)
      mask[list(order[:step])] = False  # revealed so far
      total += _nll_for_mask(table, mask)[pos]
  return total / math.factorial(L)


def _all_masks():
  return [np.array(bits, bool) for bits in itertools.product([False, True], repeat=L)]


def _k_dce_expectation(table):
  masks = [m for m in _all_masks() if m.any()]
  nll = jnp.asarray(np.stack([_nll_for_mask(table, m) for m in masks]), jnp.float32)
  k = np.array([m.sum() for m in masks])
  losses = diffusion.sequence_loss('k_dce', nll, jnp.asarray(np.stack(masks)),
                                   jnp.asarray(k, jnp.float32), jnp.ones((len(masks), L), bool))
  prob = 1.0 / (L * np.array([math.comb(L, kk) for kk in k]))  # k ~ U{1..L}, then a uniform subset
  return float(np.sum(prob * np.asarray(losses, np.float64)))


def _gauss_legendre_01(n, lo=0.0, hi=1.0):
  nodes, weights = np.polynomial.legendre.leggauss(n)
  return lo + (hi - lo) * (nodes + 1) / 2, (hi - lo) * weights / 2


def _iid_expectation(table, loss, lo, hi, mask_prob, density):
  """∫ density(s) Σ_M P_s(M) sequence_loss(M, s) ds over s ∈ [lo, hi] with Gauss–Legendre.

  For a nonempty M the integrand is a polynomial in s of degree ≤ L − 1 (the 1/λ or 1/t weight
  cancels one factor of the mask probability; the empty mask scores 0), so 8 nodes are exact.
  """
  s, w = _gauss_legendre_01(8, lo, hi)
  masks = _all_masks()
  rows_nll, rows_mask, rows_noise, rows_prob = [], [], [], []
  for m in masks:
    p = mask_prob(s)
    for si, pi in zip(s, p):
      rows_nll.append(_nll_for_mask(table, m))
      rows_mask.append(m)
      rows_noise.append(si)
      rows_prob.append(pi ** m.sum() * (1 - pi) ** (L - m.sum()))
  losses = diffusion.sequence_loss(
      loss, jnp.asarray(np.stack(rows_nll), jnp.float32), jnp.asarray(np.stack(rows_mask)),
      jnp.asarray(rows_noise, jnp.float32), jnp.ones((len(rows_nll), L), bool))
  losses = np.where(np.stack(rows_mask).any(-1), np.asarray(losses, np.float64), 0.0)
  weights = np.tile(w * density(s), len(masks)) * np.array(rows_prob)
  return float(np.sum(weights * losses))


def _lambda_dce_expectation(table):
  return _iid_expectation(table, 'lambda_dce', 0.0, 1.0, lambda lam: lam, np.ones_like)


def _t_dse_expectation(table, eps):
  # t = (1 − eps) u + eps, u ~ U(0,1): density 1/(1 − eps) on [eps, 1]; mask prob 1 − α_t.
  return _iid_expectation(table, 't_dse', eps, 1.0, lambda t: (1 - eps) * t,
                          lambda t: np.full_like(t, 1 / (1 - eps)))


def test_exact_enumeration_identity():
  table = _table()
  ao_ar = _any_order_ar_nll(table)
  np.testing.assert_allclose(_k_dce_expectation(table), ao_ar, atol=1e-5)
  np.testing.assert_allclose(_lambda_dce_expectation(table), ao_ar, atol=1e-5)
  # Guard against a vacuous identity (e.g. everything zero): a random table is far from 0.
  assert ao_ar > 1.0


def _truncation_bound(table, eps):
  """|E[t_dse with t ∈ [eps, 1]] − ELBO| ≤ 3·eps·L·ℓ_max.

  With λ = (1 − eps)t the truncated expectation is (1/(1 − eps)) ∫_{eps(1−eps)}^{1−eps} h(λ) dλ
  where h(λ) = E_{M~λ}[Σ_M ℓ]/λ and the ELBO is ∫_0^1 h. Since 0 ≤ h ≤ L·ℓ_max, the rescaling
  costs ≤ eps/(1−eps)·L·ℓ_max and the two cut ends ≤ (eps(1−eps) + eps)·L·ℓ_max.
  """
  return 3.01 * eps * L * float(-table.min())


@pytest.mark.parametrize('loss', ['lambda_dce', 'k_dce', 't_dse'])
def test_monte_carlo_pipeline_is_unbiased(loss):
  table = _table()
  eps = 1e-3
  exact = _any_order_ar_nll(table)
  if loss == 't_dse':
    # Sampling t ≥ eps makes t-DSE estimate a slightly truncated ELBO; compare with that exact
    # truncated value, and check separately that it is within the analytic truncation bound.
    truncated = _t_dse_expectation(table, eps)
    assert abs(truncated - exact) <= _truncation_bound(table, eps)
    exact = truncated
  B, n_batches = 4096, 32
  x0 = jnp.broadcast_to(jnp.asarray(X0), (B, L))
  fn = jax.jit(functools.partial(diffusion.diffusion_loss, diffusion.gather_targets(_table_apply_fn(table)), loss=loss,
                                 eps=eps, mask_id=MASK_ID))
  samples = np.concatenate([np.asarray(fn(x0, jax.random.key(100 + i))[0], np.float64)
                            for i in range(n_batches)])
  # Stratified λ/t makes the batch mean *less* variable than iid samples, so the iid standard
  # error is a conservative yardstick.
  stderr = samples.std(ddof=1) / np.sqrt(samples.size)
  assert abs(samples.mean() - exact) < 4 * stderr, (samples.mean(), exact, stderr)


# ---- unmasked outputs never matter ----------------------------------------------------------------


@pytest.mark.parametrize('loss', diffusion.LOSSES)
def test_outputs_at_unmasked_positions_are_ignored(loss):
  nll = _gold_nll()
  mask, maskable = jnp.asarray(GOLD_MASK)[None], jnp.ones((1, 4), bool)
  noise = jnp.array([2.0 if loss == 'k_dce' else 0.5])
  want = diffusion.sequence_loss(loss, nll, mask, noise, maskable)
  for junk in [jnp.nan, jnp.inf, -jnp.inf, 1e30]:
    logits = jnp.asarray(GOLD_LOGITS).at[~GOLD_MASK].set(junk)[None]
    bad_nll = diffusion.per_token_nll(real_log_softmax(logits, 5), jnp.asarray(GOLD_X0)[None])
    assert not np.isfinite(bad_nll).all() or junk == 1e30
    got = diffusion.sequence_loss(loss, bad_nll, mask, noise, maskable)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize('loss', diffusion.LOSSES)
def test_pipeline_ignores_nan_at_unmasked_positions(loss):
  table = _table()
  clean_fn = _table_apply_fn(table)
  nan_fn = lambda xt: jnp.where((xt == MASK_ID)[..., None], clean_fn(xt), jnp.nan)
  x0 = jnp.broadcast_to(jnp.asarray(X0), (64, L))
  key = jax.random.key(7)
  want, _ = diffusion.diffusion_loss(diffusion.gather_targets(clean_fn), x0, key, loss=loss, mask_id=MASK_ID)
  got, _ = diffusion.diffusion_loss(diffusion.gather_targets(nan_fn), x0, key, loss=loss, mask_id=MASK_ID)
  assert np.isfinite(got).all()
  np.testing.assert_array_equal(got, want)


# ---- schedules ------------------------------------------------------------------------------------


def test_loglinear_weight_is_exactly_one_over_t():
  t = np.linspace(1e-3, 1.0, 997, dtype=np.float32)
  np.testing.assert_array_equal(diffusion.weight('loglinear', t), np.float32(1) / t)


@pytest.mark.parametrize('schedule', diffusion.SCHEDULES)
def test_schedule_weight_and_offset_match_definitions(schedule):
  eps = 1e-3
  t = np.linspace(0.02, 0.98, 49, dtype=np.float32)
  a_fn = lambda s: diffusion.alpha(schedule, s, eps)
  a = np.asarray(a_fn(t), np.float64)
  d_alpha = np.asarray(jax.vmap(jax.grad(a_fn))(jnp.asarray(t)), np.float64)
  np.testing.assert_allclose(diffusion.weight(schedule, t, eps), -d_alpha / (1 - a), rtol=1e-4)
  np.testing.assert_allclose(diffusion.dce_offset(schedule, t, eps), np.log((1 - a) / a),
                             rtol=1e-4, atol=1e-5)
  # Boundary behaviour of the SPEC §1 formulas, written independently here.
  t64 = t.astype(np.float64)
  ref = {'loglinear': 1 - (1 - eps) * t64, 'linear': 1 - t64,
         'cosine': 1 - np.cos(np.pi / 2 * (1 - t64))}[schedule]
  np.testing.assert_allclose(a, ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(a_fn(0.0), 1.0, atol=1e-6)


# ---- masking --------------------------------------------------------------------------------------


def test_stratified_uniform_one_per_stratum():
  for seed, n in [(0, 1), (1, 7), (2, 64), (3, 1000)]:
    v = np.asarray(diffusion.stratified_uniform(jax.random.key(seed), n))
    assert v.dtype == np.float32 and v.shape == (n,)
    i = np.arange(n, dtype=np.float32)
    assert np.all(v >= i / np.float32(n)) and np.all(v < (i + 1) / np.float32(n))


def test_mask_exact_k_counts_and_respects_maskable():
  B, Lm = 256, 33
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  maskable = jax.random.bernoulli(k1, 0.7, (B, Lm))
  n = np.asarray(maskable.sum(-1))
  k = np.floor(np.asarray(jax.random.uniform(k2, (B,))) * (n + 1)).astype(np.int32)  # 0..n
  mask = np.asarray(diffusion.mask_exact_k(k3, jnp.asarray(k), maskable))
  np.testing.assert_array_equal(mask.sum(-1), k)
  assert not np.any(mask & ~np.asarray(maskable))


def test_mask_exact_k_is_uniform_over_subsets():
  # 5 maskable positions out of 6, k = 2: each of the C(5, 2) = 10 subsets has probability 0.1.
  B = 20000
  maskable = jnp.broadcast_to(jnp.array([True, True, False, True, True, True]), (B, 6))
  mask = np.asarray(diffusion.mask_exact_k(jax.random.key(1), jnp.full((B,), 2), maskable))
  codes = mask.astype(int) @ (2 ** np.arange(6))
  subsets = [sum(2 ** p for p in c) for c in itertools.combinations([0, 1, 3, 4, 5], 2)]
  freq = np.array([(codes == c).mean() for c in subsets])
  assert np.isin(codes, subsets).all()
  np.testing.assert_allclose(freq, 0.1, atol=5 * np.sqrt(0.1 * 0.9 / B))


def test_mask_iid_rate_and_maskable():
  B, Lm = 64, 512
  k1, k2 = jax.random.split(jax.random.key(3))
  maskable = jax.random.bernoulli(k1, 0.8, (B, Lm))
  p = jnp.linspace(0.0, 1.0, B)
  mask = np.asarray(diffusion.mask_iid(k2, p, maskable))
  maskable_np, p_np = np.asarray(maskable), np.asarray(p, np.float64)
  assert not np.any(mask & ~maskable_np)
  n = maskable_np.sum(-1)
  assert mask[0].sum() == 0 and mask[-1].sum() == n[-1]  # p = 0 and p = 1 are exact
  count, mean = mask.sum(-1), n * p_np
  sd = np.sqrt(n * p_np * (1 - p_np))
  assert np.all(np.abs(count - mean) <= 5 * sd + 1e-9)
  assert abs(count.sum() - mean.sum()) <= 4 * np.sqrt((sd ** 2).sum())


@pytest.mark.parametrize('loss', diffusion.LOSSES)
def test_prompt_is_never_masked(loss):
  B = 128
  prompt_len = np.array([0, 1, 2, 3] * (B // 4))
  maskable = jnp.asarray(np.arange(L)[None] >= prompt_len[:, None])
  table = _table()
  seen = []

  def apply_fn(xt):
    xt = np.asarray(xt)
    assert not np.any((xt == MASK_ID) & ~np.asarray(maskable)), 'a prompt token was masked'
    seen.append(xt == MASK_ID)
    # Garbage at prompt positions must not reach the loss either.
    return jnp.where(maskable[..., None], _table_apply_fn(table)(jnp.asarray(xt)), jnp.nan)

  x0 = jnp.broadcast_to(jnp.asarray(X0), (B, L))
  loss_B, num_B = diffusion.diffusion_loss(diffusion.gather_targets(apply_fn), x0, jax.random.key(5), loss=loss,
                                           mask_id=MASK_ID, maskable_BxL=maskable)
  np.testing.assert_array_equal(num_B, L - prompt_len)
  assert np.isfinite(loss_B).all()
  masked = seen[0]
  assert masked[:, 3].any()  # response positions do get masked
  if loss == 'k_dce':  # k ≥ 1: every row with a response masks at least one token
    assert masked.any(-1).all()


# ---- jit and determinism --------------------------------------------------------------------------


@pytest.mark.parametrize('loss,schedule', [('lambda_dce', 'loglinear'), ('t_dce', 'cosine'),
                                           ('t_dse', 'linear'), ('k_dce', 'loglinear')])
def test_diffusion_loss_jits_and_is_deterministic(loss, schedule):
  logp_fn = diffusion.gather_targets(_table_apply_fn(_table()))
  fn = jax.jit(diffusion.diffusion_loss,
               static_argnames=('logp_fn', 'loss', 'schedule', 'eps', 'mask_id'))
  x0 = jnp.broadcast_to(jnp.asarray(X0), (32, L))
  kw = dict(logp_fn=logp_fn, loss=loss, schedule=schedule, mask_id=MASK_ID)
  a, n = fn(x0_BxL=x0, key=jax.random.key(0), **kw)
  b, _ = fn(x0_BxL=x0, key=jax.random.key(0), **kw)
  c, _ = fn(x0_BxL=x0, key=jax.random.key(1), **kw)
  eager, _ = diffusion.diffusion_loss(key=jax.random.key(0), x0_BxL=x0, **kw)
  assert a.shape == (32,) and a.dtype == jnp.float32 and np.isfinite(a).all()
  np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(a, eager, rtol=1e-5, atol=1e-5)  # fusion may move an ulp
  assert not np.array_equal(a, c)
  np.testing.assert_array_equal(n, np.full(32, L))
