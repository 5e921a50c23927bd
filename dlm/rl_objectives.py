"""RL objectives for diffusion LMs (SPEC §5): group advantages, the per-sample ELBO term, and
loss functions for `Trainer.compile_step` — BGPO (default), VRPO-OL and diffu-GRPO.

A rollout batch is a dict of per-response arrays (B = prompts × G responses):
  tokens_BxT    prompt (left-padded) followed by the response
  maskable_BxT  True on response positions (the prompt is never masked by BGPO/VRPO)
  attend_BxT    False on left padding (keys the model must ignore)
  adv_B         advantages
  row_key_Bx2   uint32 key per response: every Monte Carlo mask of a response derives from it,
                so ℓ_old and ℓ_θ of sample j see the same mask whatever the micro-batching
  ell_old_BxN   (off-policy only) ℓ_j under the rollout policy, computed before the first update
"""
import jax
import jax.numpy as jnp

OBJECTIVES = ('bgpo', 'vrpo_ol', 'diffu_grpo')
T_FLOOR = 1e-3  # SPEC §5 choice: t_j ~ U[0, 1] floored, so 1/t_j stays bounded
# Off-policy BGPO: beyond d = D_MAX the A < 0 term e^d·A continues along its tangent line, so
# the weight on ∇ℓ_j never exceeds e^D_MAX·|A| ≈ 2.2e4·|A|. With |A| ≤ √(G−1) and the up to
# 1/T_FLOOR = 1e3 already inside ∇ℓ_j, gradients stay many decades below float32 overflow even
# squared for a global norm; a per-sample ratio e^10 is anyway far outside the region where the
# bound is a useful surrogate (d_j carries the 1/t_j scale, so d ≈ 90 does occur).
D_MAX = 10.0


def group_advantages(rewards_PxG: jax.Array, *, scale: bool = True) -> jax.Array:
  """A = (r − mean_G r)/(std_G r + 1e-6) (sample std, ddof 1: the GRPO/d1 convention);
  scale=False gives diffu-GRPO's r − mean. An all-equal group gets exactly 0."""
  r = jnp.asarray(rewards_PxG, jnp.float32)
  centred = r - r.mean(axis=-1, keepdims=True)
  if not scale:
    return centred
  g = r.shape[-1]
  std = jnp.sqrt((centred ** 2).sum(-1, keepdims=True) / max(g - 1, 1))
  return centred / (std + 1e-6)


def sample_mask(row_key_Bx2: jax.Array, j, maskable_BxT: jax.Array):
  """Monte Carlo sample j of every response: t ~ U[T_FLOOR, 1], each response token masked
  with probability t. Keyed per (response, j), independent of batch layout."""
  def one(row_key, maskable_T):
    k_t, k_m = jax.random.split(jax.random.fold_in(jax.random.wrap_key_data(row_key), j))
    t = jnp.maximum(jax.random.uniform(k_t, ()), T_FLOOR)
    return jax.random.bernoulli(k_m, t, maskable_T.shape) & maskable_T, t
  return jax.vmap(one)(row_key_Bx2, maskable_BxT)


def elbo_term(model, batch, j, mask_id: int) -> jax.Array:
  """ℓ_j = (1/t_j) Σ_{masked response tokens} log p_θ(y_i | y_t, x): one sample of the ELBO."""
  tokens = batch['tokens_BxT']
  mask_BxT, t_B = sample_mask(batch['row_key_Bx2'], j, batch['maskable_BxT'])
  logp_BxT = model.token_logp(jnp.where(mask_BxT, mask_id, tokens), tokens,
                              key_mask_BxL=batch['attend_BxT'])
  return jnp.where(mask_BxT, logp_BxT, 0.0).sum(-1) / t_B


def bgpo_terms(ell_B, ell_old_B, adv_B) -> jax.Array:
  """n_t · g_j of SPEC §5: (1 + d)·A for A ≥ 0 (e^d ≥ 1 + d), e^d·A for A < 0 (Jensen); their
  mean over j is the lower bound R_lb ≤ exp(B̂_θ − B̂_old)·A.

  Finite value and gradient for any finite d (off-policy d can reach ~90 when t_j ≈ T_FLOOR):
  - the exponential only ever sees d on A < 0 rows (0 elsewhere): with a plain where, an
    overflowing unused branch turns the gradient into 0·inf = NaN;
  - for d > D_MAX, e^d is replaced by its tangent line at D_MAX, e^D_MAX·(1 + d − D_MAX):
    continuous, convex and monotone, slope capped at e^D_MAX. The tangent lies below e^d, so
    the A < 0 term is then ≥ e^d·A and R_lb ≤ R̂ is guaranteed only while every d_j ≤ D_MAX.
  Identical to the SPEC formula (bit for bit at d = 0, the on-policy case) for d ≤ D_MAX."""
  d = ell_B - ell_old_B
  neg = adv_B < 0
  d_neg = jnp.where(neg, d, 0.0)
  # e^min(d, c)·(1 + max(d − c, 0)) is e^d below c and the tangent at c above it.
  exp_or_tangent = jnp.exp(jnp.minimum(d_neg, D_MAX)) * (1.0 + jnp.maximum(d_neg - D_MAX, 0.0))
  return jnp.where(neg, exp_or_tangent * adv_B, (1.0 + d) * adv_B)


def bgpo_loss(mask_id: int, off_policy: bool):
  """loss_fn(model, batch, key, j) for Trainer.compile_step(num_samples=n_t): the objective of
  sample j alone, so the trainer's scan accumulates ∇R_lb one sample at a time."""

  def loss_fn(model, batch, key, j):
    del key  # masks come from the per-response keys
    ell = elbo_term(model, batch, j, mask_id)
    ell_old = (jax.lax.dynamic_index_in_dim(batch['ell_old_BxN'], j, axis=1, keepdims=False)
               if off_policy else jax.lax.stop_gradient(ell))
    g = bgpo_terms(ell, ell_old, batch['adv_B'])
    return -g.mean(), {'objective_sum': g.sum(), 'elbo_sum': jax.lax.stop_gradient(ell).sum()}

  return loss_fn


def all_elbo_terms(model, batch, num_samples: int, mask_id: int) -> jax.Array:
  """ℓ_j for all j in ONE graph (vmap): what VRPO-OL needs, and what makes its memory ∝ n_t."""
  return jax.vmap(lambda j: elbo_term(model, batch, j, mask_id), out_axes=1)(
      jnp.arange(num_samples))


def vrpo_ol_loss(mask_id: int, num_samples: int, off_policy: bool):
  """exp(B̂_θ − B̂_old)·A with B̂ = mean_j ℓ_j: non-linear in the samples, so all stay alive."""

  def loss_fn(model, batch, key, j):
    del key, j
    ell_BxN = all_elbo_terms(model, batch, num_samples, mask_id)
    old = batch['ell_old_BxN'] if off_policy else jax.lax.stop_gradient(ell_BxN)
    r = jnp.exp(ell_BxN.mean(1) - old.mean(1)) * batch['adv_B']
    return -r.mean(), {'objective_sum': r.sum(),
                       'elbo_sum': jax.lax.stop_gradient(ell_BxN).mean(1).sum()}

  return loss_fn


def grpo_token_logps(model, batch, iteration, mask_id: int, prompt_mask_prob: float):
  """d1's one-step estimator: log p of every response token from ONE forward with the whole
  response masked and each prompt token masked with prob p (fresh per inner iteration)."""
  tokens, maskable = batch['tokens_BxT'], batch['maskable_BxT']

  def prompt_mask(row_key, prompt_T):
    k = jax.random.fold_in(jax.random.wrap_key_data(row_key), iteration)
    return jax.random.bernoulli(k, prompt_mask_prob, prompt_T.shape) & prompt_T

  prompt = batch['attend_BxT'] & ~maskable
  mask = maskable | jax.vmap(prompt_mask)(batch['row_key_Bx2'], prompt)
  return model.token_logp(jnp.where(mask, mask_id, tokens), tokens,
                          key_mask_BxL=batch['attend_BxT'])


def diffu_grpo_loss(mask_id: int, clip_eps: float, kl_beta: float, prompt_mask_prob: float,
                    off_policy: bool):
  """Token-level clipped ratio (PPO) with optional k3 KL to a reference, averaged per response.
  batch['iteration'] (scalar) picks the inner update's prompt mask; batch['logp_old_BxT'] /
  ['logp_ref_BxT'] come from the rollout policy / reference on that same mask."""

  def loss_fn(model, batch, key, j):
    del key, j
    logp = grpo_token_logps(model, batch, batch['iteration'][0], mask_id, prompt_mask_prob)
    old = batch['logp_old_BxT'] if off_policy else jax.lax.stop_gradient(logp)
    ratio = jnp.exp(logp - old)
    adv = batch['adv_B'][:, None]
    per_token = -jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - clip_eps, 1 + clip_eps) * adv)
    if kl_beta > 0:
      delta = batch['logp_ref_BxT'] - logp
      per_token = per_token + kl_beta * (jnp.exp(delta) - delta - 1.0)
    resp = batch['maskable_BxT']
    per_seq = jnp.where(resp, per_token, 0).sum(-1) / jnp.maximum(resp.sum(-1), 1)
    return per_seq.mean(), {'objective_sum': -per_seq.sum(),
                            'elbo_sum': jnp.zeros(())}

  return loss_fn
