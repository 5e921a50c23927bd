"""Attention implementations agree with the XLA path (splash in Pallas interpret mode here; cuDNN
needs a GPU), and `auto` picks each platform's fused kernel only where its constraints hold."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlm import attention
from dlm.errors import ConfigError


def qkv(B=2, T=40, S=40, N=2, H=16, seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(k[0], (B, T, N, H)), jax.random.normal(k[1], (B, S, N, H)),
          jax.random.normal(k[2], (B, S, N, H)))


@pytest.mark.parametrize('T,S', [(40, 40), (8, 40)])  # whole sequence; a cached window
def test_splash_equals_xla_with_key_padding(T, S):
  q, k, v = qkv(T=T, S=S)
  km = jnp.arange(S)[None] >= jnp.asarray([0, 7])[:, None]  # row 1: 7 left-padding keys
  splash = lambda q, k, v: attention.attend(q, k, v, km, 'splash', interpret=True)
  xla = lambda q, k, v: attention.attend(q, k, v, km, 'xla')
  np.testing.assert_allclose(jax.jit(splash)(q, k, v), xla(q, k, v), atol=1e-5)
  loss = lambda f: lambda *a: (f(*a) ** 2).sum()
  for g_s, g_x in zip(jax.grad(loss(splash), (0, 1, 2))(q, k, v),
                      jax.grad(loss(xla), (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(g_s, g_x, atol=1e-4)
  # the mask is live: without it the padded row differs
  assert not np.allclose(attention.attend(q, k, v, None, 'xla')[1], xla(q, k, v)[1], atol=1e-3)


def reference_attention(q, k, v, key_mask):
  """softmax(q·kᵀ/√h, masked keys excluded)·v as plain jnp: what autodiff differentiates."""
  s = jnp.einsum('btnh,bsnh->bnts', q.astype(jnp.float32), k.astype(jnp.float32))
  s = jnp.where(key_mask[:, None, None, :], s / np.sqrt(q.shape[-1]), -jnp.inf)
  return jnp.einsum('bnts,bsnh->btnh', jax.nn.softmax(s, -1), v.astype(jnp.float32))


@pytest.mark.parametrize('dtype,tol', [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
@pytest.mark.parametrize('T,S', [(40, 40), (8, 40)])
def test_xla_backward_equals_autodiff(T, S, dtype, tol):
  """The xla path's hand-written backward (dS = P·(dP − rowsum(dO·O))) gives autodiff's
  gradients, padded keys included; a random cotangent so no gradient is trivially zero."""
  q, k, v = (a.astype(dtype) for a in qkv(T=T, S=S, seed=3))
  km = jnp.arange(S)[None] >= jnp.asarray([0, 11])[:, None]
  w = jax.random.normal(jax.random.key(9), (2, T, 2, 16))
  loss = lambda f: lambda *a: (f(*a).astype(jnp.float32) * w).sum()
  mine = lambda q, k, v: attention.attend(q, k, v, km, 'xla')
  ref = lambda q, k, v: reference_attention(q, k, v, km)
  np.testing.assert_allclose(np.float32(mine(q, k, v)), ref(q, k, v), atol=tol, rtol=tol)
  for name, a, b in zip('qkv', jax.grad(loss(mine), (0, 1, 2))(q, k, v),
                        jax.grad(loss(ref), (0, 1, 2))(q, k, v)):
    assert a.dtype == dtype, name
    np.testing.assert_allclose(np.float32(a), np.float32(b), atol=tol * 4, rtol=tol, err_msg=name)
  dk = jax.grad(loss(mine), 1)(q, k, v)
  assert float(jnp.abs(dk[1, :11]).max()) == 0.0  # padded keys get no gradient
  assert float(jnp.abs(dk[1, 11:]).max()) > 1e-3


def test_auto_picks_the_fused_kernel_only_where_it_can_run(caplog):
  bf16, f32 = jnp.bfloat16, jnp.float32
  assert attention.resolve('auto', f32, 64, 'cpu') == 'xla'
  assert attention.resolve('auto', bf16, 64, 'gpu') == 'cudnn'
  assert attention.resolve('auto', bf16, 64, 'tpu') == 'splash'
  with caplog.at_level('WARNING'):
    assert attention.resolve('auto', f32, 64, 'gpu') == 'xla'
    assert attention.resolve('auto', bf16, 160, 'gpu') == 'xla'
  assert 'bfloat16/float16' in caplog.text and 'head_dim ≤ 128' in caplog.text
  with pytest.raises(ConfigError, match='cuDNN attention needs an NVIDIA GPU'):
    attention.resolve('cudnn', bf16, 64, 'cpu')
  with pytest.raises(ConfigError, match='valid'):
    attention.resolve('flash', bf16, 64, 'cpu')


def test_compiling_for_another_platform():
  """The dry run compiles for TPU on a CPU machine: resolve follows the target platform."""
  with attention.compiling_for('tpu'):
    assert attention.resolve('auto', jnp.bfloat16, 128) == 'splash'
  assert attention.resolve('auto', jnp.bfloat16, 128) == 'xla'  # this process: CPU


def test_splash_runs_per_shard_under_activation_sharding():
  """On a mesh the Pallas kernel runs inside shard_map (rows over data × fsdp, heads over
  tensor) and still equals XLA attention."""
  from dlm import sharding
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  q, k, v = qkv(B=4, T=24, S=24)
  km = jnp.arange(24)[None] >= jnp.asarray([0, 5, 0, 11])[:, None]

  @jax.jit
  def splash(q, k, v, km):
    with sharding.activation_sharding(mesh):
      return attention.attend(q, k, v, km, 'splash', interpret=True)

  lowered = splash.lower(q, k, v, km).as_text()
  assert 'shard_map' in lowered or 'manual' in lowered.lower()
  np.testing.assert_allclose(splash(q, k, v, km), attention.attend(q, k, v, km, 'xla'),
                             atol=1e-5)
