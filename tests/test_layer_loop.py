"""Layers unrolled (n_layers ≤ max_unrolled_layers) and scanned compute the same function, the
same gradients and the same KV cache; the unrolled program has no loop over layers; the RADD
export of the vs_torch bench reads back through dlm's importer unchanged."""
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dlm import convert
from dlm import metrics
from dlm import model as model_lib
from dlm.bench import vs_torch


def cfg(**kw):
  base = dict(num_embeddings=41, mask_id=40, d_model=32, n_layers=3, n_heads=4, mlp_dim=64,
              head_chunk=8)
  base.update(kw)
  return model_lib.ModelConfig(**base)


def models(**kw):
  """(unrolled, scanned) models with the same random parameters (head included)."""
  unrolled = model_lib.Transformer(cfg(**kw), nnx.Rngs(0))
  graphdef, params = nnx.split(unrolled)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, x.shape, x.dtype)
                                     for k, x in zip(keys, leaves)])
  unrolled = nnx.merge(graphdef, params)
  scanned = model_lib.Transformer(cfg(max_unrolled_layers=0, **kw), nnx.Rngs(0))
  nnx.update(scanned, nnx.state(unrolled))
  assert not unrolled.cfg.scan_layers and scanned.cfg.scan_layers
  return unrolled, scanned


@pytest.mark.parametrize('family,remat', [('radd', 'none'), ('llada', 'full')])
def test_unrolled_equals_scanned(family, remat):
  unrolled, scanned = models(family=family, remat=remat)
  x = jax.random.randint(jax.random.key(2), (2, 20), 0, 41)
  t = jax.random.randint(jax.random.key(3), (2, 20), 0, 40)

  def loss(m):
    return -m.token_logp(x, t).sum()

  lu, gu = nnx.value_and_grad(loss)(unrolled)
  ls, gs = nnx.value_and_grad(loss)(scanned)
  np.testing.assert_allclose(lu, ls, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(gu), jax.tree.leaves(gs)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # the KV cache of the samplers: per layer, stacked the same way
  (lo_u, kv_u), (lo_s, kv_s) = (model_lib.encode_kv(m, x) for m in (unrolled, scanned))
  np.testing.assert_allclose(lo_u, lo_s, rtol=1e-5, atol=1e-5)
  assert kv_u[0].shape == kv_s[0].shape == (3, 2, 20, 4, 8)
  np.testing.assert_allclose(kv_u[1], kv_s[1], rtol=1e-5, atol=1e-6)


def test_unrolled_program_has_no_layer_loop():
  def hlo(m):
    graphdef, params = nnx.split(m)
    x = jnp.zeros((2, 16), jnp.int32)
    f = jax.jit(jax.grad(lambda p: nnx.merge(graphdef, p).logits(x).sum()))
    return f.lower(params).compile().as_text()

  unrolled, scanned = models(head_chunk=0)
  assert ' while(' in hlo(scanned)
  assert ' while(' not in hlo(unrolled)


def test_bench_radd_export_reads_back(tmp_path):
  """vs_torch.write_radd writes dlm parameters in RADD's layout: dlm's own RADD importer
  (the inverse map) must give back every parameter exactly."""
  z = dict(vocab=40, seq=16)
  mcfg = cfg(mlp_dim=128)  # RADD's MLP is 4·d
  params = nnx.to_pure_dict(nnx.state(models(mlp_dim=128)[0]))
  vs_torch.write_radd(jax.device_get(params), mcfg, z, str(tmp_path))
  config = json.loads((tmp_path / 'config.json').read_text())
  assert config['tokens'] == 40 and config['model']['n_blocks'] == 3
  model, _, back, fmt = convert.read_params(str(tmp_path), dtype='float32')
  assert fmt == 'radd' and model['num_embeddings'] == 41 and model['d_model'] == 32
  flat = lambda p: {jax.tree_util.keystr(k): v for k, v in
                    jax.tree_util.tree_flatten_with_path(p)[0]}
  a, b = flat(params), flat(back)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def test_bench_needs_reference_paths():
  """Without --torch_python/--radd_ref/--llada_ref the bench stops, naming the three flags."""
  r = subprocess.run([sys.executable, '-m', 'dlm.bench.vs_torch'], capture_output=True,
                     text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
  assert r.returncode != 0
  assert 'dlm.bench.vs_torch needs --torch_python, --radd_ref, --llada_ref' in r.stderr


@pytest.mark.parametrize('family', ['radd', 'llada'])
def test_bench_floor_times_the_models_arithmetic(family):
  """The products whose lone times make the bench's matmul floor are the model's arithmetic:
  their FLOPs (× 3 with the backward) equal the model FLOPs of the MFU figures, up to the
  biases and norm weights that count there as matmul parameters (< 1 % at the bench's size)."""
  z = vs_torch.SIZES
  mcfg = model_lib.ModelConfig(family=family, num_embeddings=z['vocab'] + 1, mask_id=z['vocab'],
                               d_model=z['d'], n_heads=z['heads'], n_layers=z['layers'],
                               mlp_dim=4 * z['d'])
  products = vs_torch.pass_products(z, z['batch'], z['seq'], mcfg.num_embeddings,
                                    gated=family == 'llada')
  flops = 3 * sum(vs_torch.product_flops(spec, shapes) * n for spec, shapes, n, _ in products)
  model = metrics.model_flops_per_token(mcfg, z['seq']) * z['batch'] * z['seq']
  assert flops <= model and flops == pytest.approx(model, rel=0.01)
  assert vs_torch.product_flops('bnts,bsnh->btnh', ((2, 3, 5, 7), (2, 7, 3, 11))) == 2 * 2310
