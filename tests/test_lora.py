"""LoRA adapters (model.lora): the adapted model equals its base at initialisation and the merged
model after training; only the adapters train; RL starts LoRA from an imported base model."""
import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from dlm import model as model_lib
from dlm import trainer as trainer_lib
from dlm import sharding
from configs import pretrain

TARGETS = model_lib.LORA_TARGETS


def cfg(family, rank=4, **kw):
  return model_lib.ModelConfig(num_embeddings=40, mask_id=39, d_model=16, n_layers=2, n_heads=2,
                               mlp_dim=32, family=family, lora_rank=rank, lora_alpha=8.0, **kw)


def randomize(params, seed):
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, x.shape, x.dtype)
                                   for k, x in zip(keys, leaves)])


@pytest.mark.parametrize('family', ['radd', 'llada'])
def test_adapters_equal_their_merged_weights(family):
  """W x + (α/r)·B(A x) on every target equals the base model with W + (α/r)·A·B folded in, and
  zero-initialised B leaves the base model unchanged."""
  x = jax.random.randint(jax.random.key(0), (2, 9), 0, 39)
  lora = model_lib.Transformer(cfg(family), nnx.Rngs(0))
  g, p = nnx.split(lora)
  p = nnx.to_pure_dict(p)
  base_cfg = dataclasses.replace(cfg(family), lora_rank=0)
  base_g, _ = nnx.split(model_lib.Transformer(base_cfg, nnx.Rngs(0)))
  base = model_lib.merge_lora(p, cfg(family))
  assert not model_lib.has_lora(base) and model_lib.has_lora(p)
  np.testing.assert_allclose(nnx.merge(g, p)(x), nnx.merge(base_g, base)(x), atol=1e-6)  # B = 0
  p = randomize(p, 1)  # non-zero adapters
  merged = model_lib.merge_lora(p, cfg(family))
  got, want = nnx.merge(g, p).logits(x), nnx.merge(base_g, merged).logits(x)
  np.testing.assert_allclose(got, want, atol=1e-4)
  assert not np.allclose(want, nnx.merge(base_g, base).logits(x), atol=1e-2)  # adapters matter


def test_only_the_adapters_train_and_the_optimizer_holds_only_theirs():
  c = pretrain.get_config('tiny')
  mcfg = dataclasses.replace(cfg('llada'), param_dtype='bfloat16')
  mesh = sharding.make_mesh({'data': 1, 'fsdp': -1, 'tensor': 1})
  trainer = trainer_lib.Trainer(mcfg, c.train, mesh, sharding.DEFAULT_RULES, seed=0)
  base_cfg = dataclasses.replace(mcfg, lora_rank=0)
  base_params = nnx.to_pure_dict(nnx.state(model_lib.Transformer(base_cfg, nnx.Rngs(3))))
  state = trainer.state_from_params(base_params)  # an imported base: adapters start fresh
  adam_leaves = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
  n_adapter = sum(x.size for k, x in _flat(state.params) if 'lora_' in k)
  assert sum(x.size for x in adam_leaves) == 2 * n_adapter  # two moments, adapters only

  def loss_fn(model, batch, key, j):
    del key, j
    logp = model.token_logp(batch['tokens'], batch['tokens'])
    return -logp.mean(), {}

  tokens = jax.random.randint(jax.random.key(1), (8, 12), 0, 39)
  shard = {'tokens': sharding.batch_sharding(mesh, sharding.DEFAULT_RULES)}
  step = trainer.compile_step(loss_fn, shard)
  before = jax.tree.map(np.asarray, state.params)
  state, m = step(state, {'tokens': tokens})
  state, m = step(state, {'tokens': tokens})
  for k, a in _flat(jax.tree.map(np.asarray, state.params)):
    b = dict(_flat(before))[k]
    if 'lora_' in k:
      assert a.dtype == np.float32 and ('.b' not in k or not np.array_equal(a, b)), k
    else:
      assert np.array_equal(a, b), f'base parameter {k} changed'
  assert m['grad_norm'] > 0


def _flat(tree, prefix=''):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _flat(v, f'{prefix}{k}.')
    else:
      yield f'{prefix}{k}', v


def test_lora_config_section_and_errors():
  c = pretrain.get_config('tiny').model.to_dict()
  c.update(num_embeddings=40, lora={'rank': 8, 'alpha': 16.0, 'targets': 'q,v'})
  m = model_lib.config_from(c)
  assert (m.lora_rank, m.lora_targets) == (8, ('q', 'v'))
  params = nnx.state(nnx.eval_shape(lambda: model_lib.Transformer(m, nnx.Rngs(0))))
  names = {k for k, _ in _flat(nnx.to_pure_dict(params)) if 'lora_' in k}
  assert names == {f'blocks.attn.lora_{t}.{ab}' for t in 'qv' for ab in 'ab'}
  with pytest.raises(ValueError, match='targets'):
    model_lib.config_from({**c, 'lora': {'rank': 8, 'targets': 'q,w_qkv'}})
