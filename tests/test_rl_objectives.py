"""BGPO / VRPO-OL / diffu-GRPO objectives: SPEC §5 identities, bound, scan = one-shot gradient."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from dlm import model as model_lib
from dlm import rl_objectives as rlo
from dlm import sharding
from dlm import trainer as trainer_lib

MASK = 16
N_T = 4


def tiny_model(seed=0):
  cfg = model_lib.ModelConfig(num_embeddings=17, mask_id=MASK, d_model=16, n_layers=1,
                              n_heads=2, mlp_dim=32)
  m = model_lib.Transformer(cfg, nnx.Rngs(seed))
  state = nnx.state(m, nnx.Param)
  leaves, tree = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
  nnx.update(m, jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, x.shape)
                                          for k, x in zip(keys, leaves)]))
  return cfg, m


def make_batch(adv, B=4, P=3, R=5):
  k1, k2 = jax.random.split(jax.random.key(7))
  tokens = jax.random.randint(k1, (B, P + R), 0, MASK)
  maskable = jnp.broadcast_to(jnp.arange(P + R) >= P, (B, P + R))
  attend = jnp.ones((B, P + R), bool).at[0, 0].set(False)  # row 0 has one left-pad token
  return {'tokens_BxT': tokens, 'maskable_BxT': maskable, 'attend_BxT': attend,
          'adv_B': jnp.asarray(adv, jnp.float32),
          'row_key_Bx2': jax.random.key_data(jax.random.split(k2, B))}


def perturbed(m, scale=0.05, seed=3):
  gdef, params = nnx.split(m)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return nnx.merge(gdef, jax.tree.unflatten(
      tree, [x + scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]))


def test_group_advantages():
  a = rlo.group_advantages(jnp.array([[1.0, 0.0, 0.0, 1.0], [0.1, 0.1, 0.1, 0.1]]))
  np.testing.assert_allclose(a[0], np.array([1, -1, -1, 1]) * 0.5 / np.sqrt(1 / 3), rtol=1e-5)
  np.testing.assert_array_equal(a[1], 0.0)
  np.testing.assert_allclose(rlo.group_advantages(jnp.array([[1.0, 0.0]]), scale=False),
                             [[0.5, -0.5]])


def test_masks_touch_only_the_response_and_depend_on_row_keys_only():
  b = make_batch([1.0] * 4)
  mask, t = rlo.sample_mask(b['row_key_Bx2'], 2, b['maskable_BxT'])
  assert not np.any(mask & ~b['maskable_BxT']) and np.all(t >= rlo.T_FLOOR)
  mask_sub, _ = rlo.sample_mask(b['row_key_Bx2'][2:], 2, b['maskable_BxT'][2:])
  np.testing.assert_array_equal(mask[2:], mask_sub)


def test_elbo_samples_average_to_the_exact_elbo():
  """E_j[ℓ_j] = Σ_S f(S) / (|S|·C(n,|S|)) over non-empty masks S of the n response tokens,
  f(S) = Σ_{i∈S} log p(y_i | y with S masked) (∫ t^(k−1)(1−t)^(n−k) dt = 1/(k·C(n,k))):
  enumerated exactly for n = 3 and compared with 20 000 samples (the T_FLOOR bias is ~1e-3·n)."""
  import itertools
  import math
  _, m = tiny_model()
  b = make_batch([1.0] * 4, R=3)
  P, n = 3, 3
  exact = np.zeros(4)
  for k in range(1, n + 1):
    for S in itertools.combinations(range(P, P + n), k):
      mask = np.zeros(b['tokens_BxT'].shape, bool)
      mask[:, list(S)] = True
      logp = m(jnp.where(mask, MASK, b['tokens_BxT']), key_mask_BxL=b['attend_BxT'])
      f = np.take_along_axis(np.asarray(logp), np.asarray(b['tokens_BxT'])[..., None], -1)[..., 0]
      exact += (f * mask).sum(-1) / (k * math.comb(n, k))
  ell_NxB = np.asarray(jax.jit(jax.vmap(lambda j: rlo.elbo_term(m, b, j, MASK)))(
      jnp.arange(20000)))
  se = ell_NxB.std(0) / np.sqrt(len(ell_NxB))
  assert np.all(np.abs(ell_NxB.mean(0) - exact) < 5 * se + 1e-2), (ell_NxB.mean(0), exact, se)


@pytest.mark.parametrize('adv', [[1.3, 0.4, 2.0, 0.0], [-1.3, -0.4, -2.0, -0.1],
                                 [1.3, -0.4, 2.0, -1.0]])
def test_on_policy_bgpo_equals_a_and_matches_vrpo_ol_gradient(adv):
  _, m = tiny_model()
  gdef, params = nnx.split(m)
  batch = make_batch(adv)
  bgpo = rlo.bgpo_loss(MASK, off_policy=False)
  vrpo = rlo.vrpo_ol_loss(MASK, N_T, off_policy=False)

  def bgpo_total(p):  # −(1/B) Σ_i R_lb,i = mean over j of the per-sample objectives
    return sum(bgpo(nnx.merge(gdef, p), batch, None, j)[0] for j in range(N_T)) / N_T

  value, g_bgpo = jax.jit(jax.value_and_grad(bgpo_total))(params)
  np.testing.assert_allclose(value, -np.mean(adv), rtol=1e-6, atol=1e-7)  # R_lb = A exactly
  g_vrpo = jax.jit(jax.grad(lambda p: vrpo(nnx.merge(gdef, p), batch, None, 0)[0]))(params)
  for a, b in zip(jax.tree.leaves(g_bgpo), jax.tree.leaves(g_vrpo)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g_bgpo)) > 1e-3


def old_terms(m_old, batch):
  return rlo.all_elbo_terms(m_old, batch, N_T, MASK)


def test_off_policy_bound_holds_on_perturbed_parameters():
  _, m = tiny_model()
  batch = make_batch([1.5, -0.5, 0.7, -2.0])
  ell_old = old_terms(m, batch)
  ell_new = old_terms(perturbed(m, 0.2), batch)
  assert float(jnp.abs(ell_new - ell_old).max()) > 0.05  # the perturbation matters
  r_lb = rlo.bgpo_terms(ell_new, ell_old, batch['adv_B'][:, None]).mean(1)
  r_hat = jnp.exp(ell_new.mean(1) - ell_old.mean(1)) * batch['adv_B']
  assert np.all(np.asarray(r_lb) <= np.asarray(r_hat) + 1e-6)
  assert np.any(np.asarray(r_lb) < np.asarray(r_hat) - 1e-4)  # and it is not trivially tight


def test_scan_accumulated_gradient_equals_one_shot_gradient():
  mcfg, m = tiny_model()
  batch = make_batch([1.5, -0.5, 0.7, -2.0])
  batch['ell_old_BxN'] = old_terms(perturbed(m, 0.1), batch)  # off-policy: d_j ≠ 0
  mesh = sharding.make_mesh(ml_collections.ConfigDict({'data': 1, 'fsdp': -1, 'tensor': 1}),
                            jax.devices()[:1])
  tc = ml_collections.ConfigDict(dict(lr=1e-3, warmup_steps=1, b1=0.9, b2=0.999, eps=1e-8,
                                      weight_decay=0.0, clip_norm=0.0, ema_max_decay=0.0,
                                      microbatches=2))
  trainer = trainer_lib.Trainer(mcfg, tc, mesh, (('batch', ('data', 'fsdp')),), seed=0)
  params = nnx.to_pure_dict(nnx.state(m))
  shard = sharding.batch_shardings(batch, mesh, (('batch', ('data', 'fsdp')),))
  grads_fn = jax.jit(trainer.accumulated_grads(rlo.bgpo_loss(MASK, off_policy=True), shard,
                                               num_samples=N_T))
  g_scan, obj, sums = grads_fn(params, batch, jax.random.key(0))

  def one_shot(p):
    model = trainer.model(p)
    ell = rlo.all_elbo_terms(model, batch, N_T, MASK)
    return -rlo.bgpo_terms(ell, batch['ell_old_BxN'], batch['adv_B'][:, None]).mean()

  value, g_ref = jax.value_and_grad(one_shot)(params)
  np.testing.assert_allclose(obj, value, rtol=1e-5)
  np.testing.assert_allclose(sums['objective_sum'] / (4 * N_T), -value, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_scan), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_diffu_grpo_on_policy_gradient_is_advantage_weighted_logprob_gradient():
  _, m = tiny_model()
  gdef, params = nnx.split(m)
  batch = make_batch([1.0, -0.5, 0.25, 0.0])
  batch['iteration'] = jnp.zeros((4,), jnp.int32)
  loss = rlo.diffu_grpo_loss(MASK, clip_eps=0.2, kl_beta=0.0, prompt_mask_prob=0.15,
                             off_policy=False)
  g = jax.grad(lambda p: loss(nnx.merge(gdef, p), batch, None, 0)[0])(params)

  def ref(p):  # ratio = 1 at θ_old: ∇ = −mean_b A_b · mean_{resp} ∇log p
    lp = rlo.grpo_token_logps(nnx.merge(gdef, p), batch, 0, MASK, 0.15)
    resp = batch['maskable_BxT']
    per_seq = jnp.where(resp, lp, 0).sum(-1) / resp.sum(-1)
    return -(batch['adv_B'] * per_seq).mean()

  g_ref = jax.grad(ref)(params)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


D_GRID = np.unique(np.concatenate([
    np.linspace(-200.0, 200.0, 801), [0.0, -1e-3, 1e-3, 88.0, 88.5, 88.72, 89.0, 89.5, 90.0],
    rlo.D_MAX + np.array([-1.0, -1e-2, -1e-4, 0.0, 1e-4, 1e-2, 1.0])])).astype(np.float32)


@pytest.mark.parametrize('a', [1.7, 0.3, 0.0, -0.3, -1.7, -2.6])
def test_bgpo_terms_are_finite_and_exact_up_to_d_max(a):
  """Value and ∂/∂d finite on d ∈ [−200, 200]; the SPEC formula (float64 reference) up to D_MAX,
  e^D_MAX's tangent line beyond it, which for A < 0 lies above e^d·A (the bound loosens)."""
  d = jnp.asarray(D_GRID)
  adv = jnp.full_like(d, a)
  value = np.asarray(jax.jit(rlo.bgpo_terms)(d, jnp.zeros_like(d), adv))
  grad = np.asarray(jax.jit(jax.grad(lambda d: rlo.bgpo_terms(d, 0.0 * d, adv).sum()))(d))
  assert np.all(np.isfinite(value)) and np.all(np.isfinite(grad))
  d64, c = D_GRID.astype(np.float64), rlo.D_MAX
  if a >= 0:  # linear everywhere: the clamp never touches A ≥ 0 rows
    np.testing.assert_allclose(value, (1 + d64) * a, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(grad, np.float32(a))
    return
  inside = d64 <= c
  np.testing.assert_allclose(value[inside], np.exp(d64[inside]) * a, rtol=1e-5, atol=1e-30)
  np.testing.assert_allclose(grad[inside], np.exp(d64[inside]) * a, rtol=1e-5, atol=1e-30)
  tangent = np.exp(c) * (1 + d64[~inside] - c) * a
  np.testing.assert_allclose(value[~inside], tangent, rtol=1e-5)
  np.testing.assert_allclose(grad[~inside], np.exp(c) * a, rtol=1e-5)
  assert np.all(value[~inside] >= np.exp(d64[~inside]) * a)  # float64 e^d: no overflow to −inf
  past = d64 >= c + 1  # strictly looser once the curvature gap is first order
  assert np.all(value[past] > np.exp(d64[past]) * a * (1 - 1e-3))
  assert np.all(np.diff(value) <= 0) and np.all(np.diff(grad) <= 0)  # monotone, concave in d


def test_bgpo_terms_on_policy_is_bit_exact_spec_formula():
  """d = 0 (on-policy): same value and gradient bits as the unclamped SPEC expression."""
  ell = jnp.linspace(-300.0, -1.0, 7)
  adv = jnp.array([1.3, -0.4, 0.0, -2.0, 0.7, -1e-3, 2.5])

  def spec(ell):
    d = ell - jax.lax.stop_gradient(ell)
    return jnp.where(adv >= 0, (1.0 + d) * adv, jnp.exp(d) * adv)

  def ours(ell):
    return rlo.bgpo_terms(ell, jax.lax.stop_gradient(ell), adv)

  np.testing.assert_array_equal(ours(ell), spec(ell))
  w = jnp.arange(1.0, 8.0)
  np.testing.assert_array_equal(jax.grad(lambda e: (w * ours(e)).sum())(ell),
                                jax.grad(lambda e: (w * spec(e)).sum())(ell))
  np.testing.assert_array_equal(jax.grad(lambda e: (w * ours(e)).sum())(ell), w * adv)


def test_off_policy_bgpo_loss_is_finite_far_from_theta_old():
  """θ far from θ_old, for mixed / all-positive / all-negative advantages: (a) ℓ_old shifted by
  −150, so every d_j = 150 (past exp's float32 overflow at ~88.7): ∇ must be exactly that of the
  linear surrogate with weights A (A ≥ 0) and e^D_MAX·A (A < 0); (b) θ_old and θ differ by large
  parameter noise, in both directions, so d_j spreads over ± hundreds."""
  _, m = tiny_model()
  gdef, params = nnx.split(m)
  far = nnx.split(perturbed(m, scale=3.0, seed=11))[1]
  loss = rlo.bgpo_loss(MASK, off_policy=True)
  all_terms = jax.jit(lambda p, b: old_terms(nnx.merge(gdef, p), b))

  @jax.jit
  def value_and_grad(p, b):
    return jax.value_and_grad(
        lambda p: sum(loss(nnx.merge(gdef, p), b, None, j)[0] for j in range(N_T)) / N_T)(p)

  surrogate_grad = jax.jit(jax.grad(lambda p, b, w: -(w * all_terms(p, b)).mean()))

  def check(value, grads):
    assert np.isfinite(float(value))
    leaves = jax.tree.leaves(grads)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in leaves)
    assert max(float(jnp.abs(g).max()) for g in leaves) > 1e-3

  for adv in ([1.5, -0.5, 0.7, -2.0], [1.5, 0.5, 0.7, 2.0], [-1.5, -0.5, -0.7, -2.0]):
    batch = make_batch(adv)
    ell_old, ell_far = all_terms(params, batch), all_terms(far, batch)

    value, grads = value_and_grad(params, dict(batch, ell_old_BxN=ell_old - 150.0))
    check(value, grads)
    a = batch['adv_B'][:, None]
    w = jnp.where(a < 0, np.exp(rlo.D_MAX) * a, a)
    expected = -jnp.mean(jnp.where(a < 0, w * (1 + 150.0 - rlo.D_MAX), (1 + 150.0) * a))
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    g_ref = surrogate_grad(params, batch, jnp.broadcast_to(w, ell_old.shape))
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(g_ref)):
      np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4 * float(jnp.abs(r).max()) + 1e-7)

    assert float((ell_far - ell_old).min()) < -89.0  # θ_old → θ_far: d ≪ 0 (e^d underflows)
    assert float((ell_old - ell_far).max()) > 89.0  # θ_far → θ_old: the old formula overflowed
    check(*value_and_grad(far, dict(batch, ell_old_BxN=ell_old)))
    check(*value_and_grad(params, dict(batch, ell_old_BxN=ell_far)))
