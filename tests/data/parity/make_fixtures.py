"""Generates the parity fixtures of tests/test_parity.py from the reference PyTorch code. Run ONCE.

    python tests/data/parity/make_fixtures.py --llada_ref=DIR --radd_ref=DIR

Not a dependency of dlm or its tests: it needs torch, transformers (the LLaDA remote code was
written against 4.46), safetensors, numpy, einops, omegaconf and huggingface_hub in a separate
environment (README.md beside this file gives the exact commands and versions).

--llada_ref  a folder with LLaDA-8B-Instruct's Hugging Face remote code (modeling_llada.py,
             configuration_llada.py) and generate.py of github.com/ML-GSAI/LLaDA
--radd_ref   a checkout of github.com/ML-GSAI/RADD (its model/ package and configs/)

Writes (paths relative to --data, default: the tests/data folder above this file):
  llada_tiny/config.json, llada_tiny/model.safetensors   tiny random LLaDA in LLaDA's layout
  radd_tiny/config.json, radd_tiny/model.safetensors     tiny random RADD in RADD's layout
  parity/llada_expected.npz, parity/radd_expected.npz    inputs and reference outputs
Tokenizer files in llada_tiny/ and radd_tiny/ are not touched.

Everything runs on the CPU in float32 with fixed seeds. The reference model math is not changed,
with one documented exception: see `hf_sdpa` below.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 20250101

# Tiny sizes (the real models: tests/data/llada_8b_instruct/config.json, RADD configs/model/).
LLADA = dict(d_model=32, n_heads=4, n_kv_heads=4, n_layers=2, mlp_hidden_size=64, mlp_ratio=2,
             embedding_size=448, vocab_size=448, mask_token_id=400, eos_token_id=385,
             pad_token_id=385, rope_theta=500000.0, rms_norm_eps=1e-05)
# The tiny tokenizer beside the checkpoint (tests/data/tokenizers/make_tokenizers.py): ordinary
# tokens 0..383, LLaDA's special tokens 384..412 (<|endoftext|> = EOS = pad 385, <|mdm_mask|> 400,
# <|eot_id|> 412); rows 413..447 of the embedding and head are padding, as in LLaDA-8B.
LLADA_ORDINARY = 384  # inputs are drawn from the ordinary tokens
LLADA_TOKENIZER_SIZE = 413
RADD = dict(hidden_size=32, n_heads=4, n_blocks=2, tokens=320)  # mask id 320, 321 rows

# Pass/fail thresholds for a greedy generate run to be kept as a fixture: ties closer than this
# could flip between two float32 implementations.
MIN_CONF_GAP = 1e-4  # revealed vs. best unrevealed confidence in the block
MIN_LOGIT_GAP = 1e-3  # argmax vs. runner-up logit at every revealed position


def load_module(name, path, package_dir=None):
  spec = importlib.util.spec_from_file_location(
      name, path, submodule_search_locations=[package_dir] if package_dir else None)
  mod = importlib.util.module_from_spec(spec)
  sys.modules[name] = mod
  spec.loader.exec_module(mod)
  return mod


# --------------------------------------------------------------------------------------------
# Weights: large enough that a wrong rotary form, q/k/v split or norm placement moves the
# outputs by far more than the tests' 1e-4.


def random_tensor(rng, name, shape):
  if name.endswith('wte.weight') or name == 'vocab_embed.embedding':
    return rng.standard_normal(shape)
  if len(shape) == 1 and name.endswith('.weight'):  # norms (attn_norm, ln_f, norm1, …)
    return 1.0 + 0.3 * rng.standard_normal(shape)
  if name.endswith('.bias'):
    return 0.3 * rng.standard_normal(shape)
  assert len(shape) == 2, name
  return rng.standard_normal(shape) / np.sqrt(shape[1])  # [out, in]: std 1/sqrt(fan_in)


def randomise(model, rng, skip=()):
  """Every parameter of `model` (state-dict order) drawn by `random_tensor`, in place."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name not in skip:
        p.copy_(torch.from_numpy(random_tensor(rng, name, tuple(p.shape)).astype(np.float32)))


# --------------------------------------------------------------------------------------------
# LLaDA


def hf_sdpa(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False):
  """LLaDABlock._scaled_dot_product_attention as in the Hugging Face remote code that honours
  `attention_mask` (the public copy we used replaced its body by a Chebyshev approximation of
  exp; see README.md). Installed on the class, so a pristine copy is unaffected."""
  if self.flash_attn_func is not None and attn_mask is None:
    r = self.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                             dropout_p=dropout_p, causal=False)
    return r.transpose(1, 2)
  assert k.size(1) == v.size(1)
  num_kv_heads, num_q_heads = k.size(1), q.size(1)
  if num_q_heads != num_kv_heads:
    k = k.repeat_interleave(num_q_heads // num_kv_heads, dim=1, output_size=num_q_heads)
    v = v.repeat_interleave(num_q_heads // num_kv_heads, dim=1, output_size=num_q_heads)
  return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                        is_causal=False)


def write_llada(ref, out_dir, rng):
  """Writes config.json (the 8B config's keys, tiny sizes) and model.safetensors; returns the
  reference model loaded back from them through transformers' remote-code path."""
  from safetensors.torch import save_file
  from transformers import AutoModel

  with open(os.path.join(HERE, '..', 'llada_8b_instruct', 'config.json')) as f:
    real = json.load(f)
  missing = set(LLADA) - set(real)
  assert not missing, f'keys not in the real config: {missing}'
  config = {**real, **LLADA}
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'config.json'), 'w') as f:
    json.dump(config, f, indent=2, sort_keys=True)
    f.write('\n')

  # Build the reference model once only to learn its parameter names and shapes, fill them,
  # save exactly those tensors, then load from disk like any LLaDA checkpoint.
  work = tempfile.mkdtemp(prefix='llada_tiny_')
  for name in ('modeling_llada.py', 'configuration_llada.py'):
    shutil.copyfile(os.path.join(ref, name), os.path.join(work, name))
  shutil.copyfile(os.path.join(out_dir, 'config.json'), os.path.join(work, 'config.json'))
  from transformers import AutoConfig
  cfg = AutoConfig.from_pretrained(work, trust_remote_code=True)
  model = AutoModel.from_config(cfg, trust_remote_code=True, torch_dtype=torch.float32)
  randomise(model, rng)
  tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
  save_file(tensors, os.path.join(out_dir, 'model.safetensors'), metadata={'format': 'pt'})
  os.chmod(os.path.join(out_dir, 'model.safetensors'), 0o644)
  shutil.copyfile(os.path.join(out_dir, 'model.safetensors'),
                  os.path.join(work, 'model.safetensors'))

  loaded, info = AutoModel.from_pretrained(work, trust_remote_code=True,
                                           torch_dtype=torch.float32, output_loading_info=True)
  assert not any(info.values()), f'checkpoint does not match the model: {info}'
  for k, v in loaded.state_dict().items():
    assert torch.equal(v, tensors[k]), k
  block_cls = type(loaded.model.transformer.blocks[0])
  for cls in block_cls.__mro__:
    if '_scaled_dot_product_attention' in cls.__dict__:
      cls._scaled_dot_product_attention = hf_sdpa
  return loaded.eval(), sorted(tensors)


class Recorder(torch.nn.Module):
  """The model as `generate` sees it, keeping every call's input and logits."""

  def __init__(self, model):
    super().__init__()
    self.model, self.calls = model, []

  @property
  def device(self):
    return torch.device('cpu')

  def forward(self, x, attention_mask=None):
    out = self.model(x, attention_mask=attention_mask)
    self.calls.append((x.clone(), out.logits.detach().clone()))
    return out


def replay(calls, out, generate_mod, mask_id, prompt_len, gen_length, block_length, steps,
           cfg_scale):
  """Re-runs generate's selection from its recorded calls (asserting it lands on the same
  canvases) and measures how close it came to a tie. Returns a dict:
    conf_gap    smallest gap, over every step, between the k-th and (k+1)-th confidence
    logit_gap   smallest top-1 minus top-2 logit at a selected position
    mask_picks  selected positions whose argmax was the mask id itself (they stay masked, and
                generate may select them again in a later block: it sets -inf only on the
                positions after the current block)
    late_picks  positions selected while outside (before) the current block
    pad_picks   selected tokens at or above the tiny tokenizer's size (embedding padding rows)
  """
  B = out.shape[0]
  per_block = steps // (gen_length // block_length)
  assert len(calls) == steps
  r = dict(conf_gap=np.inf, logit_gap=np.inf, mask_picks=0, late_picks=0, pad_picks=0)
  x = calls[0][0][:B].clone()
  for c, (x_in, logits) in enumerate(calls):
    blk, i = divmod(c, per_block)
    lo, hi = prompt_len + blk * block_length, prompt_len + (blk + 1) * block_length
    if cfg_scale > 0:
      cond, un = torch.chunk(logits, 2, dim=0)
      logits = un + (cfg_scale + 1) * (cond - un)
    assert torch.equal(x_in[:B], x)
    if i == 0:
      counts = generate_mod.get_num_transfer_tokens(x[:, lo:hi] == mask_id, per_block)
    mask_index = x == mask_id
    x0 = logits.argmax(-1)
    conf = torch.gather(F.softmax(logits, dim=-1), -1, x0[..., None])[..., 0]
    conf[:, hi:] = -np.inf
    conf = torch.where(mask_index, conf, -np.inf)
    top2 = torch.topk(logits, 2, dim=-1).values
    for b in range(B):
      k = int(counts[b, i])
      order = torch.sort(conf[b], descending=True).values
      if k < len(order) and torch.isfinite(order[k]):
        r['conf_gap'] = min(r['conf_gap'], float(order[k - 1] - order[k]))
      sel = torch.topk(conf[b], k).indices
      assert torch.isfinite(conf[b][sel]).all()
      gaps = top2[b, sel, 0] - top2[b, sel, 1]
      r['logit_gap'] = min(r['logit_gap'], float(gaps.min()))
      r['mask_picks'] += int((x0[b, sel] == mask_id).sum())
      r['late_picks'] += int((sel < lo).sum())
      r['pad_picks'] += int((x0[b, sel] >= LLADA_TOKENIZER_SIZE).sum())
      x[b, sel] = x0[b, sel]
  assert torch.equal(x, out)
  return r


def llada_fixtures(model, generate_mod, rng):
  mid, V = LLADA['mask_token_id'], LLADA['embedding_size']
  pad = LLADA['pad_token_id']
  fx = {}

  def logp(x, attention_mask=None):
    with torch.no_grad():
      logits = model(torch.from_numpy(x), attention_mask=attention_mask).logits
    assert logits.dtype == torch.float32 and logits.shape[-1] == V
    return F.log_softmax(logits, dim=-1).numpy()

  # (a) plain batch: ordinary tokens, some masks, a special and a padding-row id as inputs.
  x = rng.integers(0, LLADA_ORDINARY, (3, 12))
  x[rng.random(x.shape) < 0.35] = mid
  x[0, 3] = 431  # a padding row
  x[1, 0] = 384  # <|startoftext|>
  fx['tokens'] = x.astype(np.int32)
  fx['logp'] = logp(x)

  # (b) left-padded batch with attention_mask: row 0 full, row 1 padded by 5, row 2 by 8.
  lengths = [12, 7, 4]
  xp = np.full((3, 12), pad)
  am = np.zeros((3, 12), np.int64)
  for i, n in enumerate(lengths):
    row = rng.integers(0, LLADA_ORDINARY, n)
    row[rng.random(n) < 0.35] = mid
    xp[i, 12 - n:] = row
    am[i, 12 - n:] = 1
  fx['padded_tokens'] = xp.astype(np.int32)
  fx['padded_attention_mask'] = am.astype(np.int32)
  lp = logp(xp, torch.from_numpy(am))
  fx['padded_logp'] = np.where(am[..., None] == 1, lp, np.nan).astype(np.float32)
  # Sanity: RoPE is relative, so the padded rows' real positions match each row run alone.
  for i, n in enumerate(lengths):
    alone = logp(xp[i:i + 1, 12 - n:])[0]
    err = np.abs(alone - lp[i, 12 - n:]).max()
    assert err < 1e-4, f'padded row {i}: {err} (attention_mask path not honoured?)'
    if n < 12:
      no_mask = logp(xp[i:i + 1])[0, 12 - n:]
      assert np.abs(no_mask - alone).max() > 1e-2, 'padding keys make no difference'

  # (c) greedy generate runs, token for token.
  # (batch of prompt lengths, left padding?, gen_length, block_length, steps, cfg, mask picks?)
  # mask picks: False = no selected argmax is the mask id; True = some block selects the mask
  # id and a later block selects that still-masked position again (generate's own behaviour).
  runs = [
      ([6], False, 16, 8, 8, 0.0, False),
      ([6], False, 16, 8, 16, 0.0, False),
      ([5], False, 16, 16, 16, 0.0, False),
      ([7, 7], False, 16, 8, 16, 0.0, False),
      ([8, 5], True, 16, 8, 8, 0.0, False),
      ([6], False, 16, 8, 16, 1.5, False),
      ([6], False, 16, 8, 8, 0.0, True),
  ]
  for r, (plens, padded, gen_length, block_length, steps, cfg_scale, picks) in enumerate(runs):
    P = max(plens)
    for attempt in range(2000 if picks else 200):
      prompt = np.full((len(plens), P), pad)
      am = np.zeros((len(plens), P), np.int64)
      for i, n in enumerate(plens):
        prompt[i, P - n:] = rng.integers(0, LLADA_ORDINARY, n)
        am[i, P - n:] = 1
      rec = Recorder(model)
      # generate's cfg branch reads `attention_mask_`, defined only when an attention_mask is
      # given: pass all ones there (the model treats a mask without zeros as no mask).
      mask_arg = torch.from_numpy(am) if (padded or cfg_scale > 0) else None
      with torch.no_grad():
        out = generate_mod.generate(rec, torch.from_numpy(prompt), attention_mask=mask_arg,
                                    steps=steps, gen_length=gen_length,
                                    block_length=block_length, temperature=0.,
                                    cfg_scale=cfg_scale, remasking='low_confidence',
                                    mask_id=mid)
      st = replay(rec.calls, out, generate_mod, mid, P, gen_length, block_length, steps,
                  cfg_scale)
      out = out.numpy()
      gen = out[:, P:]
      varied = len(np.unique(gen)) >= min(6, gen.size // 3)
      clear = st['conf_gap'] >= MIN_CONF_GAP and st['logit_gap'] >= MIN_LOGIT_GAP
      wanted = (st['mask_picks'] > 0 and st['late_picks'] > 0) if picks else st['mask_picks'] == 0
      if clear and varied and wanted:
        break
    else:
      raise RuntimeError(f'run {r}: no prompt found in {attempt + 1} attempts')
    pre = f'gen{r}_'
    fx[pre + 'prompt'] = prompt.astype(np.int32)
    fx[pre + 'prompt_mask'] = am.astype(np.int32)
    fx[pre + 'output'] = out.astype(np.int32)
    fx[pre + 'params'] = np.array([gen_length, block_length, steps], np.int32)
    fx[pre + 'cfg_scale'] = np.float32(cfg_scale)
    fx[pre + 'picks'] = np.array([st['mask_picks'], st['late_picks'], st['pad_picks']], np.int32)
    fx[pre + 'margins'] = np.array([st['conf_gap'], st['logit_gap']], np.float32)
    print(f'  generate run {r}: prompts {plens} padded={padded} gen/block/steps '
          f'{gen_length}/{block_length}/{steps} cfg {cfg_scale}: attempt {attempt + 1}, '
          f'conf gap {st["conf_gap"]:.2e}, logit gap {st["logit_gap"]:.2e}, mask/late/pad '
          f'picks {st["mask_picks"]}/{st["late_picks"]}/{st["pad_picks"]}, '
          f'output {gen.tolist()}')
  fx['num_gen_runs'] = np.int32(len(runs))
  return fx


# --------------------------------------------------------------------------------------------
# RADD


def write_radd(ref, out_dir, rng):
  """Builds RADD as its repo does, saves it with PyTorchModelHubMixin.save_pretrained (the
  layout of its Hugging Face releases) and loads it back with from_pretrained."""
  from omegaconf import OmegaConf
  pkg = load_module('radd_model', os.path.join(ref, 'model', '__init__.py'),
                    os.path.join(ref, 'model'))
  base = OmegaConf.load(os.path.join(ref, 'configs', 'config.yaml'))
  base.pop('defaults', None)
  base.pop('hydra', None)
  base.model = OmegaConf.load(os.path.join(ref, 'configs', 'model', 'small_radd.yaml'))
  base.tokens = RADD['tokens']
  base.model.hidden_size = RADD['hidden_size']
  base.model.n_heads = RADD['n_heads']
  base.model.n_blocks = RADD['n_blocks']
  base.model.dtype = 'float32'
  config = OmegaConf.to_container(base, resolve=True)

  model = pkg.RADD(config)
  randomise(model, rng)
  work = tempfile.mkdtemp(prefix='radd_tiny_')
  model.save_pretrained(work)
  os.makedirs(out_dir, exist_ok=True)
  for name in ('config.json', 'model.safetensors'):
    shutil.copyfile(os.path.join(work, name), os.path.join(out_dir, name))
    os.chmod(os.path.join(out_dir, name), 0o644)
  loaded = pkg.RADD.from_pretrained(out_dir)
  for k, v in model.state_dict().items():
    assert torch.equal(v, loaded.state_dict()[k]), k
  return loaded.eval(), sorted(model.state_dict())


def radd_fixtures(model, rng):
  V = RADD['tokens']
  x = rng.integers(0, V, (3, 12))
  x[rng.random(x.shape) < 0.35] = V
  with torch.no_grad():
    out = model(torch.from_numpy(x))  # columns 0..V-1 log-softmaxed, column V raw
    raw = model.logits(torch.from_numpy(x))
  assert out.dtype == torch.float32 and out.shape[-1] == V + 1
  assert torch.allclose(out[..., V], raw[..., V])
  return {'tokens': x.astype(np.int32), 'logp_real': out[..., :V].numpy(),
          'mask_logit': out[..., V].numpy()}


# --------------------------------------------------------------------------------------------


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--llada_ref', required=True)
  ap.add_argument('--radd_ref', required=True)
  ap.add_argument('--data', default=os.path.normpath(os.path.join(HERE, '..')))
  args = ap.parse_args()

  torch.manual_seed(SEED)
  torch.set_num_threads(1)
  torch.set_default_dtype(torch.float32)
  # Keep the remote-code module cache out of the user's home.
  os.environ.setdefault('HF_MODULES_CACHE', tempfile.mkdtemp(prefix='hf_modules_'))
  os.environ.setdefault('HF_HUB_OFFLINE', '1')
  rng = np.random.default_rng(SEED)
  versions = {'torch': torch.__version__, 'numpy': np.__version__}

  import transformers
  versions['transformers'] = transformers.__version__
  print('LLaDA')
  model, names = write_llada(args.llada_ref, os.path.join(args.data, 'llada_tiny'), rng)
  gen_mod = load_module('llada_generate', os.path.join(args.llada_ref, 'generate.py'))
  fx = llada_fixtures(model, gen_mod, rng)
  np.savez_compressed(os.path.join(args.data, 'parity', 'llada_expected.npz'), **fx)
  print('  tensors:', len(names))

  print('RADD')
  model, names = write_radd(args.radd_ref, os.path.join(args.data, 'radd_tiny'), rng)
  fx = radd_fixtures(model, rng)
  np.savez_compressed(os.path.join(args.data, 'parity', 'radd_expected.npz'), **fx)
  print('  tensors:', len(names))
  print('versions:', json.dumps(versions))


if __name__ == '__main__':
  main()
