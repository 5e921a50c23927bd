"""Model: parameter counts, init loss, bidirectionality, padding, RoPE, remat, dtypes, axis names."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import pretrain
from dlm import diffusion
from dlm import model as model_lib


def tiny_cfg(**kw):
  base = dict(num_embeddings=33, mask_id=32, d_model=32, n_layers=2, n_heads=4, mlp_dim=64)
  base.update(kw)
  return model_lib.ModelConfig(**base)


def randomize(m, seed=0):
  """Give every parameter (incl. the zero-initialised head) random values."""
  state = nnx.state(m, nnx.Param)
  leaves, tree = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  new = [0.3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
  nnx.update(m, jax.tree.unflatten(tree, new))
  return m


@pytest.mark.parametrize('preset,expected', [('radd_small', 162_265_682),
                                             ('radd_medium', 405_191_762)])
def test_radd_parameter_counts(preset, expected):
  mcfg = model_lib.config_from(pretrain.get_config(preset).model)
  assert model_lib.count_params(mcfg) == expected


def test_init_loss_is_log_v_per_token():
  mcfg = tiny_cfg()
  m = model_lib.Transformer(mcfg, nnx.Rngs(0))
  V = mcfg.num_embeddings - 1
  x0 = jax.random.randint(jax.random.key(1), (4, 16), 0, V)
  logp = m(x0)
  np.testing.assert_allclose(logp[..., :V], -math.log(V), rtol=1e-6)
  assert np.all(np.isneginf(np.asarray(logp[..., mcfg.mask_id])))
  loss_B, ntok_B = diffusion.diffusion_loss(m.token_logp, x0, jax.random.key(2), loss='k_dce',
                                            mask_id=mcfg.mask_id)
  np.testing.assert_allclose(loss_B / ntok_B, math.log(V), rtol=1e-6)


def test_bidirectional_and_time_free():
  m = randomize(model_lib.Transformer(tiny_cfg(), nnx.Rngs(0)))
  x = jnp.arange(12)[None] % 30
  y = x.at[0, 10].set(5)
  a, b = m(x), m(y)
  assert not np.allclose(a[0, 2], b[0, 2]), 'a later token must influence an earlier position'


@pytest.mark.parametrize('family', ['radd', 'llada'])
def test_padded_keys_are_ignored(family):
  m = randomize(model_lib.Transformer(tiny_cfg(family=family), nnx.Rngs(0)))
  x = jnp.array([[1, 2, 3, 4, 5, 6, 7, 8]])
  keep = jnp.array([[False, False, True, True, True, True, True, True]])
  y = x.at[0, :2].set(jnp.array([20, 21]))
  a = m(x, key_mask_BxL=keep)
  b = m(y, key_mask_BxL=keep)
  np.testing.assert_allclose(a[0, 2:], b[0, 2:], atol=1e-5)
  assert not np.allclose(m(x)[0, 2:], m(y)[0, 2:], atol=1e-5)


def test_rope_depends_only_on_relative_position():
  q = jax.random.normal(jax.random.key(0), (1, 1, 1, 8))
  k = jax.random.normal(jax.random.key(1), (1, 1, 1, 8))
  L = 10
  qs = model_lib.rope(jnp.broadcast_to(q, (1, L, 1, 8)), 1e4)[0, :, 0]
  ks = model_lib.rope(jnp.broadcast_to(k, (1, L, 1, 8)), 1e4)[0, :, 0]
  dots = qs @ ks.T
  np.testing.assert_allclose(dots[3, 1], dots[7, 5], rtol=1e-5)
  np.testing.assert_allclose(dots[0, 0], jnp.vdot(q, k), rtol=1e-5)  # offset 0: no rotation
  assert not np.isclose(dots[3, 1], dots[3, 2])


@pytest.mark.parametrize('remat', ['full', 'dots', 'dots_no_batch'])
def test_remat_policies_match_no_remat(remat):
  x = jax.random.randint(jax.random.key(0), (2, 8), 0, 32)

  def loss_and_grad(cfg):
    m = randomize(model_lib.Transformer(cfg, nnx.Rngs(0)))
    gdef, params = nnx.split(m)
    f = lambda p: -nnx.merge(gdef, p)(x)[..., :32].mean()
    return jax.value_and_grad(f)(params)

  v0, g0 = loss_and_grad(tiny_cfg())
  v1, g1 = loss_and_grad(tiny_cfg(remat=remat))
  np.testing.assert_allclose(v0, v1, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bf16_compute_keeps_f32_params_and_tracks_f32():
  m32 = randomize(model_lib.Transformer(tiny_cfg(), nnx.Rngs(0)))
  m16 = randomize(model_lib.Transformer(tiny_cfg(dtype='bfloat16'), nnx.Rngs(0)))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(m16)))
  x = jax.random.randint(jax.random.key(0), (2, 8), 0, 32)
  a, b = m32(x), m16(x)
  assert b.dtype == jnp.float32
  np.testing.assert_allclose(jnp.exp(a[..., :32]), jnp.exp(b[..., :32]), atol=0.05)


def test_dropout_only_with_a_key():
  m = randomize(model_lib.Transformer(tiny_cfg(dropout=0.5), nnx.Rngs(0)))
  x = jnp.arange(8)[None]
  np.testing.assert_array_equal(m(x), m(x))
  assert not np.allclose(m(x), m(x, dropout_key=jax.random.key(0)))


def test_every_parameter_has_logical_axis_names():
  abstract = nnx.eval_shape(lambda: model_lib.Transformer(tiny_cfg(family='llada'), nnx.Rngs(0)))
  for path, v in jax.tree.leaves_with_path(nnx.state(abstract),
                                           is_leaf=lambda x: isinstance(x, nnx.Variable)):
    names = v.get_metadata().get('out_sharding')
    assert names is not None and len(names) == v.ndim, (path, names)
    if 'blocks' in jax.tree_util.keystr(path):
      assert names[0] == 'layers'


def test_bad_model_config_is_a_clear_error():
  with pytest.raises(ValueError, match='family'):
    tiny_cfg(family='gpt')
  with pytest.raises(ValueError, match='heads'):
    tiny_cfg(d_model=30)


@pytest.mark.parametrize('family', ['radd', 'llada'])
def test_chunked_head_equals_the_full_log_softmax(family):
  """token_logp projects chunks of head_chunk positions under remat (7 does not divide 20: the
  last chunk is padded); values and gradients equal gathering the full log-softmax."""
  x = jax.random.randint(jax.random.key(1), (3, 20), 0, 33)
  km = jnp.arange(20)[None] >= jnp.asarray([0, 3, 9])[:, None]
  targets = jax.random.randint(jax.random.key(2), (3, 20), 0, 32)

  def loss(chunk):
    m = randomize(model_lib.Transformer(tiny_cfg(family=family, head_chunk=chunk), nnx.Rngs(0)))
    g, p = nnx.split(m)
    return jax.value_and_grad(
        lambda p: nnx.merge(g, p).token_logp(x, targets, key_mask_BxL=km).sum())(p), m

  (full, g_full), m = loss(0)
  want = jnp.take_along_axis(m(x, key_mask_BxL=km), targets[..., None], -1)[..., 0].sum()
  np.testing.assert_allclose(full, want, rtol=1e-6)
  (chunked, g_chunked), _ = loss(7)
  np.testing.assert_allclose(chunked, full, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), g_chunked, g_full)


@pytest.mark.parametrize('dtype,tol', [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_target_logp_equals_autodiff_of_the_log_softmax(dtype, tol):
  """target_logp's hand-written backward g·(onehot − softmax) equals autodiff of gathering
  real_log_softmax; the mask column gets no probability and no gradient."""
  V, mask_id = 11, 4
  logits = (3 * jax.random.normal(jax.random.key(0), (3, 5, V))).astype(dtype)
  t = jax.random.randint(jax.random.key(1), (3, 5), 0, V - 1)
  t = jnp.where(t >= mask_id, t + 1, t)  # never the mask row, as in every caller
  w = jax.random.normal(jax.random.key(2), (3, 5))
  mine = lambda z: model_lib.target_logp(z, t, mask_id)
  ref = lambda z: jnp.take_along_axis(model_lib.real_log_softmax(z, mask_id), t[..., None],
                                      -1)[..., 0]
  np.testing.assert_allclose(mine(logits), ref(logits), rtol=tol, atol=tol)
  g_mine = jax.grad(lambda z: (mine(z) * w).sum())(logits)
  g_ref = jax.grad(lambda z: (ref(z) * w).sum())(logits)
  assert g_mine.dtype == dtype
  np.testing.assert_allclose(np.float32(g_mine), np.float32(g_ref), rtol=tol, atol=tol)
  assert float(jnp.abs(g_mine[..., mask_id]).max()) == 0.0
  assert float(jnp.abs(g_mine).max()) > 0.1


def test_layer_norm_equals_autodiff():
  """RADD's LayerNorm with its closed-form backward equals autodiff of the formula, on
  [B, L, D] inputs (weight and bias gradients summed over both leading axes)."""
  ks = jax.random.split(jax.random.key(0), 4)
  x = 2 + 3 * jax.random.normal(ks[0], (2, 7, 16))
  w, b = 1 + jax.random.normal(ks[1], (16,)), jax.random.normal(ks[2], (16,))
  cot = jax.random.normal(ks[3], x.shape)

  def ref(x, w, b):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / jnp.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * w + b

  mine = lambda x, w, b: model_lib.layer_norm(x, w, b, 1e-5)
  np.testing.assert_allclose(mine(x, w, b), ref(x, w, b), rtol=1e-5, atol=1e-5)
  for a, r in zip(jax.grad(lambda *a: (mine(*a) * cot).sum(), (0, 1, 2))(x, w, b),
                  jax.grad(lambda *a: (ref(*a) * cot).sum(), (0, 1, 2))(x, w, b)):
    np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-5)
