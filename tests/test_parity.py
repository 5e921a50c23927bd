"""Parity with the reference PyTorch code (LLaDA's remote code and `generate`, RADD's model), through
fixtures made once by tests/data/parity/make_fixtures.py (README.md there). No torch here.

Tolerance: 1e-4, max abs over log-probs. Column conventions:
  LLaDA  the fixtures hold log_softmax over EVERY column of the reference logits (448: mask 400
         and padding rows 413..447 included). `Transformer.logits` is compared after the same
         log_softmax (a per-row shift of the raw logits, so this checks them up to that shift);
         the model's own output (mask column -inf) is compared over the other columns with the
         reference renormalised without the mask column.
  RADD   the fixtures hold RADD's own output: columns 0..319 log-softmaxed among themselves,
         column 320 (mask) raw; compared as such (`model(x)` for the first, `.logits` for the
         mask column).
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlm import convert
from dlm import sampling

DATA = os.path.join(os.path.dirname(__file__), 'data')
TOL = 1e-4


def _fixture(name):
  with np.load(os.path.join(DATA, 'parity', name)) as f:
    return {k: f[k] for k in f.files}


@pytest.fixture(scope='module')
def llada():
  model = convert.load_model(os.path.join(DATA, 'llada_tiny'), dtype='float32')  # as the fixtures
  return model, _fixture('llada_expected.npz')


@pytest.fixture(scope='module')
def radd():
  model = convert.load_model(os.path.join(DATA, 'radd_tiny'), dtype='float32')  # as the fixtures
  return model, _fixture('radd_expected.npz')


def _drop_column(logp, col):
  """Log-probs renormalised without column `col` (that column becomes -inf)."""
  logp = np.array(logp, np.float64)
  logp[..., col] = -np.inf
  return logp - np.logaddexp.reduce(logp, axis=-1, keepdims=True)


def test_llada_config_maps(llada):
  model, _ = llada
  c = model.cfg
  assert (c.family, c.num_embeddings, c.mask_id, c.d_model, c.n_layers, c.n_heads, c.mlp_dim,
          c.rope_base, c.norm_eps) == ('llada', 448, 400, 32, 2, 4, 64, 500000.0, 1e-5)


def test_llada_logits(llada):
  model, fx = llada
  got = jax.nn.log_softmax(model.logits(jnp.asarray(fx['tokens'])), axis=-1)
  np.testing.assert_allclose(np.asarray(got), fx['logp'], atol=TOL, rtol=0)


def test_llada_log_probs_real_columns(llada):
  model, fx = llada
  got = np.asarray(model(jnp.asarray(fx['tokens'])))
  want = _drop_column(fx['logp'], model.cfg.mask_id)
  assert np.isneginf(got[..., model.cfg.mask_id]).all()
  real = np.arange(got.shape[-1]) != model.cfg.mask_id
  np.testing.assert_allclose(got[..., real], want[..., real], atol=TOL, rtol=0)


def test_llada_left_padded_batch(llada):
  """modeling_llada's attention_mask path = dlm's key_mask_BxL; compared where the mask is 1."""
  model, fx = llada
  km = fx['padded_attention_mask'].astype(bool)
  got = np.asarray(jax.nn.log_softmax(model.logits(jnp.asarray(fx['padded_tokens']),
                                                   key_mask_BxL=jnp.asarray(km)), axis=-1))
  assert not km.all() and km.any(axis=1).all()
  np.testing.assert_allclose(got[km], fx['padded_logp'][km], atol=TOL, rtol=0)
  assert np.isnan(fx['padded_logp'][~km]).all()  # the reference's padded rows are not kept


def _runs():
  fx = _fixture('llada_expected.npz')
  for r in range(int(fx['num_gen_runs'])):
    g, b, s = (int(v) for v in fx[f'gen{r}_params'])
    mask, late, _ = (int(v) for v in fx[f'gen{r}_picks'])
    tag = f'run{r}_B{fx[f"gen{r}_prompt"].shape[0]}_gen{g}_block{b}_steps{s}'
    if float(fx[f'gen{r}_cfg_scale']):
      tag += f'_cfg{float(fx[f"gen{r}_cfg_scale"])}'
    if not fx[f'gen{r}_prompt_mask'].all():
      tag += '_leftpad'
    if mask:
      tag += f'_maskpicks{mask}_late{late}'
    yield pytest.param(r, id=tag)


@pytest.mark.parametrize('run', list(_runs()))
def test_llada_generate_greedy(llada, run):
  """semi_ar greedy low-confidence = LLaDA `generate` token for token. The canvas is the prompt
  followed by gen_length mask ids (dlm.sampling.canvas; its padding id differs from the
  reference's, which is harmless: padding keys are hidden and padding rows never read)."""
  model, fx = llada
  pre = f'gen{run}_'
  g, b, s = (int(v) for v in fx[pre + 'params'])
  prompt, pmask = fx[pre + 'prompt'], fx[pre + 'prompt_mask'].astype(bool)
  x, km = sampling.canvas(jnp.asarray(prompt), jnp.asarray(pmask), g, model.cfg.mask_id)
  cfg = sampling.SamplerConfig(strategy='semi_ar', gen_length=g, steps=s, block_length=b,
                               temperature=0.0, cfg_scale=float(fx[pre + 'cfg_scale']))
  out, _ = sampling.semi_ar(model, x, jax.random.key(0), cfg, km)
  out, want = np.asarray(out), fx[pre + 'output']
  P = prompt.shape[1]
  np.testing.assert_array_equal(out[:, :P][pmask], want[:, :P][pmask])
  np.testing.assert_array_equal(out[:, P:], want[:, P:],
                                err_msg=f'reference picks (mask, late, padding rows): '
                                        f'{fx[pre + "picks"].tolist()}')


def test_radd_config_maps(radd):
  model, _ = radd
  c = model.cfg
  assert (c.family, c.num_embeddings, c.mask_id, c.d_model, c.n_layers, c.n_heads,
          c.mlp_dim) == ('radd', 321, 320, 32, 2, 4, 128)


def test_radd_log_probs(radd):
  model, fx = radd
  tokens = jnp.asarray(fx['tokens'])
  got = np.asarray(model(tokens))
  V = model.cfg.mask_id
  assert np.isneginf(got[..., V]).all()
  np.testing.assert_allclose(got[..., :V], fx['logp_real'], atol=TOL, rtol=0)
  raw_mask = np.asarray(model.logits(tokens))[..., V]
  np.testing.assert_allclose(raw_mask, fx['mask_logit'], atol=TOL, rtol=0)
