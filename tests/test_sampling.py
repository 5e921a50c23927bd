"""Samplers: fixed tokens, cached = uncached RADD, reveal-step law, call counts, LLaDA counts,
threshold decoding, mixed-length batches, exact categorical, KV cache, no recompilation."""
import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import sample as sample_configs
from dlm import model as model_lib
from dlm import sampling as S

V, MASK = 32, 32  # real tokens 0..31, mask id 32


def tiny_model(seed=0, scale=0.5):
  """~12k params; every weight random (the RADD head is zero-initialised, which would make all
  confidences tie)."""
  cfg = model_lib.ModelConfig(num_embeddings=V + 1, mask_id=MASK, d_model=32, n_layers=2,
                              n_heads=4, mlp_dim=64)
  m = model_lib.Transformer(cfg, nnx.Rngs(seed))
  leaves, tree = jax.tree.flatten(nnx.state(m, nnx.Param))
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  nnx.update(m, jax.tree.unflatten(
      tree, [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]))
  return m


@pytest.fixture(scope='module')
def model():
  return tiny_model()


def table_net(record=None):
  """A cheap bidirectional stand-in: logits from each token, its position and the row's mean."""
  W = jax.random.normal(jax.random.key(7), (V + 1, V + 1))
  pos = jax.random.normal(jax.random.key(8), (64, V + 1))

  def apply(x_BxL, key_mask_BxL):
    if record is not None:
      jax.debug.callback(lambda a: record.append(np.asarray(a)), x_BxL, ordered=True)
    logits = W[x_BxL] + W[x_BxL].mean(1, keepdims=True) + pos[:x_BxL.shape[1]]
    return model_lib.real_log_softmax(logits, MASK)

  return S.Net(MASK, apply)


def prompts(lengths, P, seed=0):
  """Left-padded random prompts of the given lengths: (ids_BxP, mask_BxP)."""
  ids = np.asarray(jax.random.randint(jax.random.key(seed), (len(lengths), P), 0, V))
  mask = np.arange(P)[None] >= (P - np.asarray(lengths))[:, None]
  return jnp.asarray(np.where(mask, ids, 0)), jnp.asarray(mask)


def run(model, cfg, ids, mask, seed=0):
  g, p = nnx.split(model)
  x, st = S.sample_params(g, p, ids, mask, jax.random.key(seed), cfg=cfg)
  return np.asarray(x), jax.tree.map(np.asarray, st)


# ------------------------------------------------------------------------------------------------
# radd


@pytest.mark.parametrize('strategy', ['radd', 'semi_ar', 'threshold'])
def test_fixed_and_revealed_tokens_never_change_and_nothing_is_left_masked(strategy):
  seen = []  # every input the network sees, in order
  x0 = np.full((3, 24), MASK)
  x0[:, :8] = 3  # prefix (semi_ar / threshold generate the last gen_length = 16)
  if strategy == 'radd':  # infilling: a suffix and a fixed token in the middle
    x0[:, :5], x0[:, -4:], x0[1, 10] = MASK, 4, 9
  cfg = S.SamplerConfig(strategy, gen_length=16, block_length=8, steps=16, threshold=0.2)
  out, st = jax.jit(lambda x, k: S.SAMPLERS[strategy](table_net(seen), x, k, cfg))(
      jnp.asarray(x0), jax.random.key(0))
  out = np.asarray(out)
  fixed = x0 != MASK
  assert (out[fixed] == x0[fixed]).all() and (out != MASK).all()
  assert len(seen) == int(st['iterations'])
  for prev, cur in zip([x0] + seen, seen + [out]):
    shown = prev != MASK
    assert (cur[shown] == prev[shown]).all(), 'a fixed or revealed token changed'
  for b in range(3):  # every call of a row reveals something: no wasted calls
    r = st['reveal_step_BxL'][b][~fixed[b]]
    assert set(r.tolist()) == set(range(int(st["calls_B"][b])))


@pytest.mark.parametrize('categorical', ['exact', 'gumbel32'])
def test_radd_cached_equals_uncached(model, categorical):
  ids, mask = prompts([4, 7], 8)
  cfgs = [S.SamplerConfig('radd', gen_length=24, steps=48, categorical=categorical,
                          radd_cached=c) for c in (True, False)]
  (xc, sc), (xu, su) = (run(model, c, ids, mask, seed=3) for c in cfgs)
  np.testing.assert_array_equal(xc, xu)
  assert (su['calls_B'] == 48).all() and (sc['calls_B'] < 48).all()
  np.testing.assert_array_equal(sc['grid_step_BxL'], su['grid_step_BxL'])


def test_reveal_step_uniform_chi2():
  # 8192 tokens over n = 16 steps; χ²(15 dof) 99.9% quantile = 37.7. Under the log-linear schedule
  # the law is (1 − t_min)/n per step, the last step also taking the t_min = 1e-5 left at t_min:
  # far below what 8192 draws can see.
  n = 16
  cfg = S.SamplerConfig('radd', steps=n)
  want = np.full(n, (1 - cfg.t_min) / n)
  want[-1] += cfg.t_min
  np.testing.assert_allclose(S.reveal_step_probs(cfg), want, rtol=1e-5)
  x0 = jnp.full((128, 64), MASK)
  _, st = jax.jit(lambda x, k: S.radd(table_net(), x, k, cfg))(x0, jax.random.key(1))
  counts = np.bincount(np.asarray(st['grid_step_BxL']).ravel(), minlength=n)
  expected = counts.sum() / n
  assert ((counts - expected) ** 2 / expected).sum() < 37.7


@pytest.mark.parametrize('n,l', [(64, 64), (256, 64)])
def test_radd_calls_match_occupancy_formula(n, l):
  # Calls of a row = distinct reveal steps of l tokens uniform over n steps. Exact moments of that
  # occupancy count: mean n(1 − (1 − 1/n)^l), variance below; the mean over B = 256 rows must lie
  # within 4 standard errors (a false alarm once in ~16 000 runs).
  B = 256
  cfg = S.SamplerConfig('radd', steps=n)
  _, st = jax.jit(lambda x, k: S.radd(table_net(), x, k, cfg))(jnp.full((B, l), MASK),
                                                                jax.random.key(2))
  q1, q2 = (1 - 1 / n) ** l, (1 - 2 / n) ** l
  mean = S.expected_calls(n, l)
  var = n * q1 + n * (n - 1) * q2 - (n * q1) ** 2
  assert abs(mean - n * (1 - q1)) < 1e-9
  assert abs(st['calls_B'].mean() - mean) < 4 * math.sqrt(var / B)


def test_exact_categorical_matches_distribution_and_reaches_tiny_tokens():
  logp = jnp.log(jnp.asarray([[0.5, 0.25, 0.125, 0.0625, 0.0625, 0.0]]))
  bits = jax.random.bits(jax.random.key(0), (20000, S._EXACT_TRIES, 2), jnp.uint32)
  draws = np.asarray(jax.jit(jax.vmap(lambda b: S.categorical_exact(logp, b[None])[0]))(bits))
  counts = np.bincount(draws, minlength=6)
  p = np.asarray([0.5, 0.25, 0.125, 0.0625, 0.0625, 0.0])
  assert counts[5] == 0
  assert (((counts[:5] - 20000 * p[:5]) ** 2) / (20000 * p[:5])).sum() < 18.5  # χ²(4) 99.9%
  # A token with probability e^-40 ≈ 4e-18 owns a non-empty interval of the integer CDF: a
  # uniform landing at its start selects it (float32 Gumbel or cumsum could never return it).
  logp = jax.nn.log_softmax(jnp.asarray([[0.0, -40.0, 1.0, -jnp.inf]]))
  hi, lo = (np.asarray(a)[0] for a in S.exact_cdf(logp))
  assert (hi[1], lo[1]) != (hi[0], lo[0])
  u = np.zeros((1, S._EXACT_TRIES, 2), np.uint32)
  u[..., 0], u[..., 1] = hi[0] << 2, lo[0]
  assert int(S.categorical_exact(logp, jnp.asarray(u))[0]) == 1


# ------------------------------------------------------------------------------------------------
# semi_ar / threshold


@pytest.mark.parametrize('steps,remasking,cfg_scale',
                         [(16, 'low_confidence', 0.0), (6, 'low_confidence', 0.0),
                          (10, 'random', 0.0), (8, 'low_confidence', 1.5)])
def test_semi_ar_counts_blocks_and_fixed_prompt(model, steps, remasking, cfg_scale):
  G, K = 16, 8
  cfg = S.SamplerConfig('semi_ar', gen_length=G, block_length=K, steps=steps,
                        remasking=remasking, cfg_scale=cfg_scale, temperature=0.7)
  ids, mask = prompts([3, 6, 0], 6)
  x, st = run(model, cfg, ids, mask)
  P = 6
  assert (x[:, :P][np.asarray(mask)] == np.asarray(ids)[np.asarray(mask)]).all()
  assert (x[:, P:] != MASK).all() and (st['reveal_step_BxL'][:, P:] >= 0).sum() == 3 * G
  S_blk = steps // (G // K)
  want = np.asarray(S.reveal_counts(jnp.asarray([K]), S_blk))[0]
  for b in range(3):
    r = st['reveal_step_BxL'][b, P:]
    for blk in range(G // K):
      got = np.bincount(r[blk * K:(blk + 1) * K] - blk * S_blk, minlength=S_blk)
      np.testing.assert_array_equal(got, want)  # SPEC §4.2 per-step counts, block by block
    assert r[:K].max() < r[K:].min()  # block order
  assert (st['calls_B'] == steps).all()


def test_semi_ar_greedy_is_deterministic(model):
  cfg = S.SamplerConfig('semi_ar', gen_length=16, block_length=8, steps=16)
  ids, mask = prompts([5, 2], 6)
  np.testing.assert_array_equal(run(model, cfg, ids, mask, seed=0)[0],
                                run(model, cfg, ids, mask, seed=1)[0])


@pytest.mark.parametrize('cache', ['none', 'prefix', 'dual'])
def test_threshold_reveals_at_least_one_per_step(cache):
  m = tiny_model(seed=3, scale=1.0)  # peaked enough for some steps to reveal several tokens
  cfg = S.SamplerConfig('threshold', gen_length=24, block_length=8, threshold=0.3, cache=cache)
  ids, mask = prompts([4, 1, 6], 6)
  x, st = run(m, cfg, ids, mask)
  assert (x != MASK).all()
  assert (st['calls_B'] < 24).any(), 'the test should see parallel steps'
  for b in range(3):
    r = st['reveal_step_BxL'][b, 6:]
    assert set(r.tolist()) == set(range(int(st["calls_B"][b]))), 'a step revealed nothing'
    assert max(r[:8]) < min(r[8:16]) and max(r[8:16]) < min(r[16:])


def test_threshold_one_equals_semi_ar_one_token_per_step(model):
  ids, mask = prompts([4, 6], 6)
  xs, ss = run(model, S.SamplerConfig('semi_ar', gen_length=16, block_length=8, steps=16),
               ids, mask)
  xt, st = run(model, S.SamplerConfig('threshold', gen_length=16, block_length=8,
                                      threshold=1.0), ids, mask)
  np.testing.assert_array_equal(xs, xt)
  np.testing.assert_array_equal(ss['reveal_step_BxL'], st['reveal_step_BxL'])


@pytest.mark.parametrize('strategy', ['semi_ar', 'threshold'])
def test_cache_plumbing_is_exact_with_an_exact_cache(strategy):
  # A "cache" that stores the block-start tokens and rebuilds the full input around the window:
  # exact, because tokens outside the current block do not change within a block. So every cache
  # mode must reproduce cache='none' exactly: this checks the block/window offsets.
  net = table_net()

  def window(kv_BxL, x_BxW, start, km):
    full = jax.lax.dynamic_update_slice_in_dim(kv_BxL, x_BxW, start, axis=1)
    return jax.lax.dynamic_slice_in_dim(net.apply(full, km), start, x_BxW.shape[1], axis=1)

  exact = S.Net(MASK, net.apply, lambda x, km: (net.apply(x, km), x), window)
  ids, mask = prompts([2, 5], 5)
  out = {}
  for cache in S.CACHES:
    cfg = S.SamplerConfig(strategy, gen_length=24, block_length=8, steps=12, threshold=0.5,
                          cache=cache)
    out[cache] = jax.tree.map(np.asarray, jax.jit(
        lambda i, m: S.sample(exact, i, m, jax.random.key(0), cfg))(ids, mask))
  for cache in ('prefix', 'dual'):
    np.testing.assert_array_equal(out[cache][0], out['none'][0])
    np.testing.assert_array_equal(out[cache][1]['reveal_step_BxL'],
                                  out['none'][1]['reveal_step_BxL'])


@pytest.mark.parametrize('strategy,cache', [('semi_ar', 'none'), ('threshold', 'none'),
                                            ('threshold', 'prefix')])
def test_mixed_length_batch_equals_one_at_a_time(model, strategy, cache):
  cfg = S.SamplerConfig(strategy, gen_length=16, block_length=8, steps=16, threshold=0.5,
                        cache=cache)
  lengths, P = [3, 7], 7
  ids, mask = prompts(lengths, P)
  batch, _ = run(model, cfg, ids, mask)
  for b, n in enumerate(lengths):
    one, _ = run(model, cfg, ids[b:b + 1, P - n:], mask[b:b + 1, P - n:])
    np.testing.assert_array_equal(batch[b, P:], one[0, n:])


# ------------------------------------------------------------------------------------------------
# plumbing


def test_kv_cache_window_matches_full_forward(model):
  x = jax.random.randint(jax.random.key(0), (2, 20), 0, V + 1)
  km = jnp.arange(20)[None] >= jnp.asarray([0, 5])[:, None]
  finite = lambda a: np.where(np.isinf(a), 0, a)
  ref = jax.jit(lambda x: model.logits(x, key_mask_BxL=km))(x)
  logits, kv = jax.jit(lambda x: model_lib.encode_kv(model, x, key_mask_BxL=km))(x)
  np.testing.assert_allclose(logits, ref, atol=1e-5)
  np.testing.assert_allclose(finite(model_lib.real_log_softmax(ref, model.cfg.mask_id)),
                             finite(model(x, key_mask_BxL=km)), atol=1e-5)
  window = jax.jit(lambda kv, t, s: model_lib.decode_window(model, kv, t, s, key_mask_BxL=km))
  for start, w in ((8, 12), (12, 4), (3, 4)):
    win = window(kv, x[:, start:start + w], start)
    np.testing.assert_allclose(win, ref[:, start:start + w], atol=1e-5)


def test_sampling_compiles_once_per_shape(model):
  cfg = S.SamplerConfig('threshold', gen_length=8, block_length=4, cache='dual')
  g, p = nnx.split(model)
  f = S.sample_params
  before = f._cache_size()
  for seed in range(3):
    ids, mask = prompts([seed + 1, 3], 4, seed=seed)
    jax.block_until_ready(f(g, p, ids, mask, jax.random.key(seed), cfg=cfg))
  assert f._cache_size() == before + 1


def test_config_errors_and_sample_config_mirrors_sampler():
  with pytest.raises(ValueError, match='strategy'):
    S.SamplerConfig('beam')
  with pytest.raises(ValueError, match='multiple of sampler.block_length'):
    S.SamplerConfig('semi_ar', gen_length=20, block_length=8)
  with pytest.raises(ValueError, match='multiple of the number of blocks'):
    S.SamplerConfig('semi_ar', gen_length=16, block_length=8, steps=5)
  for preset in sample_configs.PRESETS:
    c = sample_configs.get_config(preset)
    assert c.mode == 'sample'
    S.SamplerConfig(**c.sampler.to_dict())  # every key known, every value valid
  with pytest.raises(AttributeError):
    c.sampler.treshold = 0.5  # locked: a typo is an error


def test_sample_mode_writes_jsonl(tmp_path):
  """`generate.run` rebuilds model and tokenizer from a workdir's checkpoint alone."""
  from configs import pretrain
  from dlm import data, generate, train
  c = pretrain.get_config('tiny')
  c.data.update(builtin_documents=300, vocab_size=96, seq_len=32, batch_size=8, eval_batches=1)
  c, _, d, trainer, ckpt, _ = train.setup(c, str(tmp_path))  # a checkpoint without training
  ckpt.save(7, trainer.to_items(trainer.init_state()), data.all_iterator_states(d.iterator),
            c.to_dict())
  ckpt.wait()
  ckpt.close()
  s = sample_configs.get_config('fast')
  s.sampler.update(gen_length=16, block_length=8)
  s.prompts, s.num_samples, s.batch_size = ('alice has', ''), 3, 4  # 6 rows: a padded 2nd batch
  generate.run(s, str(tmp_path))
  rows = [json.loads(l) for l in (tmp_path / 'samples.jsonl').read_text().splitlines()]
  assert len(rows) == 6 and [r['prompt'] for r in rows] == ['alice has'] * 3 + [''] * 3
  assert all(len(r['tokens']) == 16 and r['step'] == 7 and 1 <= r['calls'] <= 16 for r in rows)
  assert all(set(r) >= {'text', 'tokens', 'calls', 'seconds'} for r in rows)


def test_full_softmax_follows_llada_generate_over_every_column():
  """LLaDA's generate takes argmax and confidence over every column, mask included: a Net with
  full_softmax picks the mask column where it scores highest (the position stays masked) and its
  confidences are softmaxes over all V + 1 columns; the default never picks the mask."""
  W = jax.random.normal(jax.random.key(3), (V + 1, V + 1))
  boost = jnp.zeros(V + 1).at[MASK].set(4.0)  # the mask column wins at masked positions

  def apply(x_BxL, key_mask_BxL):
    return W[x_BxL] + jnp.where((x_BxL == MASK)[..., None], boost, 0.0)

  ids, mask = prompts([3, 3], 3)
  cfg = S.SamplerConfig('semi_ar', gen_length=8, block_length=8, steps=8)
  full, _ = S.sample(S.Net(MASK, apply, full_softmax=True), ids, mask, jax.random.key(0), cfg)
  real, _ = S.sample(S.Net(MASK, apply), ids, mask, jax.random.key(0), cfg)
  assert (np.asarray(full)[:, 3:] == MASK).all()
  assert not (np.asarray(real)[:, 3:] == MASK).any()
  # confidences: the full softmax ranks by p over V + 1 columns; the real one renormalises
  logits = jax.random.normal(jax.random.key(4), (1, 1, V + 1))
  np.testing.assert_allclose(np.exp(S.log_probs(logits, MASK, True)).sum(-1), 1, rtol=1e-6)
  real_p = np.exp(S.log_probs(logits, MASK, False))
  assert real_p[..., MASK] == 0 and np.isclose(real_p.sum(), 1, rtol=1e-6)


def test_llada_models_sample_with_the_full_softmax(model):
  assert not S.as_net(model).full_softmax  # radd family
  llada = model_lib.Transformer(dataclasses.replace(model.cfg, family='llada'), nnx.Rngs(0))
  assert S.as_net(llada).full_softmax
