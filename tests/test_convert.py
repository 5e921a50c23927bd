"""dlm.convert: LLaDA and RADD folders (SPEC §7) in and out.

The folders are written here tensor by tensor from SPEC §7's names, with std 1/√fan_in weights
and non-trivial norms and biases; a small numpy forward written from SPEC §2/§7 (not from dlm)
checks that every tensor lands where the model reads it. (Parity with the reference PyTorch code
itself is a separate fixture.)"""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from configs import pretrain
from dlm import convert
from dlm import model as model_lib
from dlm import workdir as workdir_lib
from dlm.convert import layouts
from dlm.errors import ConfigError, DataError, MissingFileError

ROOT = Path(__file__).resolve().parents[1]
D, N, F, L, V = 16, 2, 48, 2, 37  # d_model, heads, MLP, layers, rows (mask included)


def llada_tensors(rng):
  w = lambda o, i: (rng.standard_normal((o, i)) / np.sqrt(i)).astype(np.float32)
  norm = lambda: (1 + 0.3 * rng.standard_normal(D)).astype(np.float32)
  t = {'model.transformer.wte.weight': rng.standard_normal((V, D)).astype(np.float32),
       'model.transformer.ln_f.weight': norm(),
       'model.transformer.ff_out.weight': w(V, D)}
  for i in range(L):
    b = f'model.transformer.blocks.{i}'
    t.update({f'{b}.attn_norm.weight': norm(), f'{b}.q_proj.weight': w(D, D),
              f'{b}.k_proj.weight': w(D, D), f'{b}.v_proj.weight': w(D, D),
              f'{b}.attn_out.weight': w(D, D), f'{b}.ff_norm.weight': norm(),
              f'{b}.ff_proj.weight': w(F, D), f'{b}.up_proj.weight': w(F, D),
              f'{b}.ff_out.weight': w(D, F)})
  return t


LLADA_CONFIG = {'model_type': 'llada', 'd_model': D, 'n_heads': N, 'n_kv_heads': N,
                'n_layers': L, 'mlp_hidden_size': F, 'vocab_size': V, 'embedding_size': V,
                'mask_token_id': V - 3, 'rope_theta': 500000.0, 'rms_norm_eps': 1e-5,
                'weight_tying': False, 'block_type': 'llama', 'activation_type': 'silu'}


def radd_tensors(rng):
  w = lambda o, i: (rng.standard_normal((o, i)) / np.sqrt(i)).astype(np.float32)
  vec = lambda n, c: (c + 0.3 * rng.standard_normal(n)).astype(np.float32)
  t = {'vocab_embed.embedding': rng.standard_normal((V, D)).astype(np.float32),
       'rotary_emb.inv_freq': np.ones(D // N // 2, np.float32),
       'output_layer.norm_final.weight': vec(D, 1), 'output_layer.norm_final.bias': vec(D, 0),
       'output_layer.linear.weight': w(V, D), 'output_layer.linear.bias': vec(V, 0)}
  for i in range(L):
    b = f'blocks.{i}'
    t.update({f'{b}.norm1.weight': vec(D, 1), f'{b}.norm1.bias': vec(D, 0),
              f'{b}.attn_qkv.weight': w(3 * D, D), f'{b}.attn_out.weight': w(D, D),
              f'{b}.norm2.weight': vec(D, 1), f'{b}.norm2.bias': vec(D, 0),
              f'{b}.mlp.0.weight': w(4 * D, D), f'{b}.mlp.0.bias': vec(4 * D, 0),
              f'{b}.mlp.2.weight': w(D, 4 * D), f'{b}.mlp.2.bias': vec(D, 0)})
  return t


RADD_CONFIG = {'model': {'hidden_size': D, 'n_blocks': L, 'n_heads': N, 'dropout': 0.0},
               'tokens': V - 1}


def write_folder(path: Path, config: dict, tensors: dict, shards: int = 1) -> Path:
  path.mkdir(parents=True)
  (path / 'config.json').write_text(json.dumps(config))
  names = sorted(tensors)
  for s in range(shards):
    save_file({n: tensors[n] for n in names[s::shards]},
              str(path / f'model-{s + 1:05d}-of-{shards:05d}.safetensors'))
  return path


# ------------------------------------------------------------------------------------------------
# An independent numpy forward (SPEC §2.1 / §7)


def _rope(x_LxNxH, base):
  L_, _, H = x_LxNxH.shape
  inv = base ** (-np.arange(0, H, 2) / H)
  ang = np.arange(L_)[:, None] * inv[None]
  cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
  x1, x2 = x_LxNxH[..., :H // 2], x_LxNxH[..., H // 2:]
  return x_LxNxH * cos[:, None] + np.concatenate([-x2, x1], -1) * sin[:, None]


def reference_logp(fmt, t, tokens, mask_id):
  f64 = {k: v.astype(np.float64) for k, v in t.items()}
  if fmt == 'llada':
    p = 'model.transformer.'
    norm = lambda x, w: x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * w
    x = f64[p + 'wte.weight'][tokens]
  else:
    norm = lambda x, wb: ((x - x.mean(-1, keepdims=True)) /
                          np.sqrt(x.var(-1, keepdims=True) + 1e-5)) * wb[0] + wb[1]
    x = f64['vocab_embed.embedding'][tokens]
  H = D // N
  for i in range(L):
    if fmt == 'llada':
      b = f'{p}blocks.{i}.'
      h = norm(x, f64[b + 'attn_norm.weight'])
      q, k, v = (h @ f64[b + f'{n}_proj.weight'].T for n in 'qkv')
    else:
      b = f'blocks.{i}.'
      h = norm(x, (f64[b + 'norm1.weight'], f64[b + 'norm1.bias']))
      q, k, v = np.split(h @ f64[b + 'attn_qkv.weight'].T, 3, -1)
    base = 500000.0 if fmt == 'llada' else 1e4
    q, k = (_rope(a.reshape(-1, N, H), base) for a in (q, k))
    v = v.reshape(-1, N, H)
    s = np.einsum('qnh,knh->nqk', q, k) / np.sqrt(H)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = np.einsum('nqk,knh->qnh', a, v).reshape(-1, D)
    x = x + o @ f64[b + 'attn_out.weight'].T
    if fmt == 'llada':
      h = norm(x, f64[b + 'ff_norm.weight'])
      g = h @ f64[b + 'ff_proj.weight'].T
      x = x + ((g / (1 + np.exp(-g))) * (h @ f64[b + 'up_proj.weight'].T)) @ \
          f64[b + 'ff_out.weight'].T
    else:
      h = norm(x, (f64[b + 'norm2.weight'], f64[b + 'norm2.bias']))
      u = h @ f64[b + 'mlp.0.weight'].T + f64[b + 'mlp.0.bias']
      u = 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u ** 3)))
      x = x + u @ f64[b + 'mlp.2.weight'].T + f64[b + 'mlp.2.bias']
  if fmt == 'llada':
    logits = norm(x, f64[p + 'ln_f.weight']) @ f64[p + 'ff_out.weight'].T
  else:
    h = norm(x, (f64['output_layer.norm_final.weight'], f64['output_layer.norm_final.bias']))
    logits = h @ f64['output_layer.linear.weight'].T + f64['output_layer.linear.bias']
  logits[:, mask_id] = -np.inf
  m = logits.max(-1, keepdims=True)
  return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('fmt', ['llada', 'radd'])
def test_import_puts_every_tensor_where_the_model_reads_it(fmt, tmp_path):
  t = (llada_tensors if fmt == 'llada' else radd_tensors)(np.random.default_rng(0))
  src = write_folder(tmp_path / 'src', LLADA_CONFIG if fmt == 'llada' else RADD_CONFIG, t,
                     shards=2)
  model = convert.load_model(src)
  mask_id = LLADA_CONFIG['mask_token_id'] if fmt == 'llada' else V - 1
  assert model.cfg.family == fmt and model.cfg.mask_id == mask_id
  tokens = np.random.default_rng(1).integers(0, V, (1, 11))
  tokens[0, [2, 5]] = mask_id
  got = np.asarray(model(tokens))[0]
  want = reference_logp(fmt, t, tokens[0], mask_id)
  finite = np.isfinite(want)
  assert np.array_equal(finite, np.isfinite(got))
  np.testing.assert_allclose(got[finite], want[finite], atol=1e-4)


def word_level_tokenizer(size: int, path: Path) -> None:
  """A Hugging Face tokenizer.json of `size` words (the last is GPT-2's eos), no mask token."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  vocab = {**{f'w{i}': i for i in range(size - 1)}, '<|endoftext|>': size - 1}
  tok = Tokenizer(models.WordLevel(vocab, unk_token='<|endoftext|>'))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(str(path))


def test_llada_import_export_import_is_bit_exact(tmp_path):
  t = llada_tensors(np.random.default_rng(2))
  src = write_folder(tmp_path / 'src', LLADA_CONFIG, t, shards=3)
  word_level_tokenizer(V - 3, src / 'tokenizer.json')  # mask id = its size = the config's
  w = convert.import_checkpoint(src, tmp_path / 'w')
  assert workdir_lib.load(w).tokenizer.mask_id == LLADA_CONFIG['mask_token_id']
  out = convert.export_llada(w, tmp_path / 'out', max_shard_bytes=20_000)
  index = json.loads((Path(out) / 'model.safetensors.index.json').read_text())
  assert sorted(index['weight_map']) == sorted(t) and len(set(index['weight_map'].values())) > 1
  back = convert.tensor_index(out)
  for name, a in t.items():
    got = convert._read(back, name)
    assert got.dtype == a.dtype and np.array_equal(got, a), name
  cfg = json.loads((Path(out) / 'config.json').read_text())
  assert {k: cfg[k] for k in LLADA_CONFIG} == LLADA_CONFIG
  assert (Path(out) / 'tokenizer.json').read_bytes() == (src / 'tokenizer.json').read_bytes()
  w2 = convert.import_checkpoint(out, tmp_path / 'w2')
  p1, p2 = (workdir_lib.load(x, need_tokenizer=False).params for x in (w, w2))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), p1, p2)


def test_import_in_bfloat16_and_from_a_bfloat16_file(tmp_path):
  t = {k: v.astype(ml_dtypes.bfloat16) for k, v in llada_tensors(np.random.default_rng(3)).items()}
  src = write_folder(tmp_path / 'src', LLADA_CONFIG, t)
  w = convert.import_checkpoint(src, tmp_path / 'w', param_dtype='bfloat16')
  loaded = workdir_lib.load(w, need_tokenizer=False)
  model, params = loaded.config['model'], loaded.params
  assert loaded.tokenizer is None and model['param_dtype'] == 'bfloat16'
  assert all(a.dtype == ml_dtypes.bfloat16 for a in jax.tree.leaves(params))
  out = convert.export_llada(w, tmp_path / 'out')
  back = convert.tensor_index(out)
  for name, a in t.items():
    assert np.array_equal(convert._read(back, name).view(np.uint16), a.view(np.uint16)), name


def _cli(*args):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  return subprocess.run([sys.executable, '-m', 'dlm.convert', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def _one_error_line(r):
  errors = [l for l in r.stderr.splitlines() if l.startswith('error:')]
  return r.returncode == 1 and len(errors) == 1 and 'Traceback' not in r.stderr and errors[0]


def test_bad_sources_are_one_line_errors_and_leave_nothing(tmp_path):
  rng = np.random.default_rng(4)
  pth = tmp_path / 'pth'
  pth.mkdir()
  (pth / 'config.json').write_text(json.dumps(LLADA_CONFIG))
  (pth / 'pytorch_model.bin').write_bytes(b'\x80\x04not unpickled')
  r = _cli(f'--src={pth}', f'--out={tmp_path / "o1"}')
  assert 'pytorch_model.bin' in _one_error_line(r) and 'never loaded' in r.stderr
  trunc = write_folder(tmp_path / 'trunc', LLADA_CONFIG, llada_tensors(rng))
  f = next(trunc.glob('*.safetensors'))
  f.write_bytes(f.read_bytes()[:-100])
  r = _cli(f'--src={trunc}', f'--out={tmp_path / "o2"}')
  assert 'not a readable safetensors file' in _one_error_line(r)
  bad = write_folder(tmp_path / 'bad', {**LLADA_CONFIG, 'mlp_hidden_size': 40},
                     llada_tensors(rng))
  r = _cli(f'--src={bad}', f'--out={tmp_path / "o3"}')
  line = _one_error_line(r)
  assert 'ff_proj.weight has shape (48, 16)' in line and '(40, 16)' in line
  assert sorted(p.name for p in tmp_path.iterdir()) == ['bad', 'pth', 'trunc']  # no output
  t = llada_tensors(rng)
  del t['model.transformer.blocks.1.up_proj.weight']
  t['model.transformer.blocks.0.lora.weight'] = np.zeros(3, np.float32)
  with pytest.raises(DataError, match=r'missing tensors \[.model.transformer.blocks.1.up_proj'
                     r'.weight.\], unexpected tensors \[.model.transformer.blocks.0.lora'):
    convert.import_checkpoint(write_folder(tmp_path / 'gaps', LLADA_CONFIG, t), tmp_path / 'o4')
  with pytest.raises(MissingFileError, match='config.json'):
    convert.import_checkpoint(tmp_path, tmp_path / 'o5')  # a folder without config.json
  wrong = tmp_path / 'wrong_tok'
  wrong.mkdir()
  word_level_tokenizer(V - 1, wrong / 'tokenizer.json')  # its mask id would be 36, not 34
  with pytest.raises(ConfigError, match='mask id 36.*model.mask_id=34'):
    convert.import_checkpoint(write_folder(tmp_path / 'ok', LLADA_CONFIG, llada_tensors(rng)),
                              tmp_path / 'o6', tokenizer=wrong)
  assert not any((tmp_path / o).exists() for o in ('o4', 'o5', 'o6'))
  assert not list(tmp_path.glob('.o*'))


def test_imported_workdir_loads_its_parameters_alone(tmp_path):
  """RL init, sample and eval read an import through `workdir.load` (given a tokenizer)."""
  from dlm.tokenizer import Tokenizer
  src = write_folder(tmp_path / 'src', RADD_CONFIG, radd_tensors(np.random.default_rng(5)))
  texts = [f'word{i % 40} and more words {i}' for i in range(400)]
  (tmp_path / 'tok').mkdir()
  assert Tokenizer.train(texts, V - 1, tmp_path / 'tok/tokenizer.model').vocab_size == V - 1
  w = convert.import_checkpoint(src, tmp_path / 'w', tokenizer=tmp_path / 'tok')  # RADD: none
  loaded = workdir_lib.load(w)
  assert loaded.step == convert.STEP and loaded.mcfg.family == 'radd'
  direct = convert.load_model(src)
  tokens = np.arange(9)[None] % (V - 1)
  from_workdir = nnx.merge(loaded.graphdef, loaded.params)
  np.testing.assert_array_equal(np.asarray(direct(tokens)), np.asarray(from_workdir(tokens)))


def test_llada_8b_index_maps_onto_the_preset_shapes():
  """LLaDA-8B-Instruct's own config.json and model.safetensors.index.json (tests/data): the
  config gives the llada_8b preset, and every tensor the index names is exactly one slot of a
  dlm parameter of the right shape (abstract shapes only: nothing is allocated)."""
  folder = ROOT / 'tests' / 'data' / 'llada_8b_instruct'
  config = json.loads((folder / 'config.json').read_text())
  names = json.loads((folder / 'model.safetensors.index.json').read_text())['weight_map']
  assert layouts.detect(config) == 'llada'
  model = layouts.model_section('llada', config)
  preset = pretrain.get_config('llada_8b').model
  for k in ('num_embeddings', 'mask_id', 'd_model', 'n_layers', 'n_heads', 'mlp_dim',
            'rope_base', 'norm_eps', 'family'):
    assert model[k] == preset[k], k
  shapes = nnx.to_pure_dict(nnx.state(nnx.eval_shape(
      lambda: model_lib.Transformer(model_lib.config_from(preset), nnx.Rngs(0)))))
  slots = layouts.slots('llada', model)
  assert sorted(s.name for s in slots) == sorted(names)
  for s in slots:
    leaf = shapes
    for k in s.path:
      leaf = leaf[k]
    want = jax.eval_shape(lambda a: a[s.index], jax.ShapeDtypeStruct(leaf.shape, np.float32))
    got = jax.eval_shape(s.to_dlm, jax.ShapeDtypeStruct(s.outside_shape, np.float32))
    assert got.shape == want.shape, s.name
