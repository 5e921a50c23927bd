"""Activations are sharded by batch: on every mesh each device computes its own rows.

The rule: a device's share of a step's rows is B / (data · fsdp) (`tensor` splits heads, MLP
columns and the vocabulary, never rows). It is read from the compiled program for 8 forced CPU
devices: the batched attention dots (scores [b, heads, L, L] and friends, batch dims {0, 1})
must have b = B / (data · fsdp), and every token-major 2-D matmul (the projections and the MLP
on [rows · L, ·]) must have rows · L = B · L / (data · fsdp). L is 13, a prime, so no weight
dimension (powers of two here) can pass for a multiple of L. Before activations were
constrained, FSDP (`fsdp=8`) computed attention for all 16 rows on every device.
"""
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import pretrain
from dlm import model as model_lib
from dlm import sampling
from dlm import sharding
from dlm import train
from dlm import trainer as trainer_lib
from dlm.errors import ConfigError

V, B, L = 64, 16, 13
MCFG = model_lib.ModelConfig(num_embeddings=V, mask_id=V - 1, d_model=32, n_layers=2, n_heads=4,
                             mlp_dim=64)
DIFFUSION = ml_collections.ConfigDict(dict(loss='lambda_dce', schedule='loglinear', eps=1e-3))
MESHES = {'fsdp=8': dict(data=1, fsdp=8, tensor=1), 'data=8': dict(data=8, fsdp=1, tensor=1),
          'data=2,fsdp=2,tensor=2': dict(data=2, fsdp=2, tensor=2)}


def make_trainer(mesh_kw, devices=None):
  mesh = sharding.make_mesh(ml_collections.ConfigDict(mesh_kw), devices)
  return trainer_lib.Trainer(MCFG, pretrain.optimizer(ema_max_decay=0.0), mesh,
                             sharding.DEFAULT_RULES, seed=0)


def f32_dots(hlo: str) -> list[tuple[tuple[int, ...], bool]]:
  """(output shape, batched with batch dims {0, 1}) of every float32 dot in compiled HLO."""
  out = []
  for line in hlo.splitlines():
    m = re.search(r'= f32\[([0-9,]+)\]\{[0-9,]*\} dot\(', line)
    if m:
      out.append((tuple(int(d) for d in m.group(1).split(',')),
                  'lhs_batch_dims={0,1}' in line))
  return out


def per_device_rows(hlo: str) -> tuple[set, set]:
  """(batch dims of the attention dots, token-major row counts / L of the 2-D dots)."""
  dots = f32_dots(hlo)
  attention = {s[0] for s, batched in dots if batched and len(s) == 4}
  token_rows = {d // L for s, batched in dots if not batched for d in s if d % L == 0}
  return attention, token_rows


@pytest.mark.parametrize('name', list(MESHES))
def test_train_step_computes_batch_over_data_times_fsdp(name):
  mesh_kw = MESHES[name]
  trainer = make_trainer(mesh_kw)
  shard = {'tokens': sharding.batch_sharding(trainer.mesh, trainer.rules)}
  step = trainer.compile_step(train.diffusion_objective(DIFFUSION, MCFG.mask_id), shard)
  batch = {'tokens': jax.ShapeDtypeStruct((B, L), jnp.int32, sharding=shard['tokens'])}
  hlo = step.lower(trainer.abstract_state, batch).compile().as_text()
  rows = B // (mesh_kw['data'] * mesh_kw['fsdp'])
  attention, token_rows = per_device_rows(hlo)
  assert attention == {rows}, f'{name}: attention batch per device {attention}, want {rows}'
  assert token_rows == {rows}, f'{name}: matmul rows per device {token_rows} × L, want {rows}'


def test_gradients_equal_one_device():
  """Loss and every gradient leaf on each mesh equal the 1-device result."""
  loss_fn = train.diffusion_objective(DIFFUSION, MCFG.mask_id)
  tokens = np.asarray(jax.random.randint(jax.random.key(1), (B, L), 0, V - 1), np.int32)

  def grads(trainer, params):
    shard = {'tokens': sharding.batch_sharding(trainer.mesh, trainer.rules)}
    fn = jax.jit(trainer.accumulated_grads(loss_fn, shard))
    g, obj, sums = fn(jax.device_put(params, trainer.param_shardings),
                      sharding.global_batch({'tokens': tokens}, shard), jax.random.key(2))
    return jax.device_get((g, obj, sums))

  one = make_trainer(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  params = jax.device_get(one.init_state().params)
  # the zero-initialised RADD head would leave most gradients zero: perturb every weight
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  params = jax.tree.unflatten(tree, [np.asarray(x + 0.1 * jax.random.normal(k, x.shape))
                                     for x, k in zip(leaves, keys)])
  g_ref, obj_ref, sums_ref = grads(one, params)
  for name, mesh_kw in MESHES.items():
    g, obj, sums = grads(make_trainer(mesh_kw), params)
    np.testing.assert_allclose(obj, obj_ref, rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(sums['loss_sum'], sums_ref['loss_sum'], rtol=1e-5, err_msg=name)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=name)


def test_sampler_rows_are_data_parallel_and_unchanged():
  trainer = make_trainer(MESHES['fsdp=8'])
  params = trainer.init_state().params
  scfg = sampling.SamplerConfig('semi_ar', gen_length=8, steps=4, block_length=4)
  ids = np.asarray(jax.random.randint(jax.random.key(4), (B, 5), 0, V - 1), np.int32)
  mask = np.ones((B, 5), bool)
  mask[:4, :2] = False  # left padding
  prompts = sharding.put_global((ids, mask), sharding.batch_shardings((ids, mask), trainer.mesh,
                                                                      trainer.rules))
  kw = dict(cfg=scfg, mesh=trainer.mesh, rules=trainer.rules)
  hlo = sampling.sample_params.lower(trainer.graphdef, params, *prompts, jax.random.key(0),
                                     **kw).compile().as_text()
  attention = {s[0] for s, batched in f32_dots(hlo) if batched and len(s) == 4}
  assert attention == {B // 8}
  x, _ = sampling.sample_params(trainer.graphdef, params, *prompts, jax.random.key(0), **kw)
  assert x.sharding.is_fully_replicated  # every process can read the rollout
  host = jax.device_get(params)
  ref, _ = sampling.sample_params(trainer.graphdef, host, ids, mask, jax.random.key(0), cfg=scfg)
  np.testing.assert_array_equal(x, ref)


def test_parameter_a_mesh_axis_does_not_divide_is_an_error():
  mesh = sharding.make_mesh(ml_collections.ConfigDict(MESHES['data=2,fsdp=2,tensor=2']))
  odd = model_lib.ModelConfig(num_embeddings=65, mask_id=64, d_model=32, n_layers=1, n_heads=4,
                              mlp_dim=64)
  with pytest.raises(ConfigError, match=r'parameter (embed|head|head_bias) .*size 65.*tensor=2'):
    trainer_lib.abstract_params(odd, mesh, sharding.DEFAULT_RULES)
  # an activation whose rows the mesh does not divide is replicated instead (one-row sampling)
  with sharding.activation_sharding(mesh):
    assert sharding.logical_to_spec(model_lib.ACT_BxLxD, (3, L, 32), sharding.DEFAULT_RULES,
                                    mesh) == jax.sharding.PartitionSpec(None, None, None)
