"""The PyTorch side of `dlm.bench.vs_torch`: runs the reference code, never imports dlm or JAX.

Started by vs_torch with the interpreter of a torch environment:
    python vs_torch_worker.py --radd_ref=DIR --llada_ref=DIR --threads=2
It reads one JSON command per line on stdin and answers one JSON line on stdout, so the two
sides take turns (A B A B) without ever running at the same time:
  {"cmd": "radd", "dir": D, "batch": B, "seq_len": L, "lr": lr, "seed": s}   load RADD from D
      (RADD's `save_pretrained` layout: config.json + model.safetensors) and its AdamW
  {"cmd": "radd_steps", "n": n}        n timed train steps: lambda-DCE (RADD's losses.py), AdamW
  {"cmd": "llada", "dir": D}           load LLaDA (HF remote code, modeling_llada.py) from D
  {"cmd": "generate", "n": n, "prompt": [[...]], "gen_length", "block_length", "steps",
   "mask_id"}                          n timed greedy runs of LLaDA's `generate`; returns tokens
  {"cmd": "matmul", "n": n, "reps": r} r timed float32 [n, n] @ [n, n] products (the host's peak)
  {"cmd": "quit"}
Answers: {"seconds": [...], ...} or {"error": "..."}.
"""
import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time

import torch
import torch.nn.functional as F


def _load(name, path, package_dir=None):
  spec = importlib.util.spec_from_file_location(
      name, path, submodule_search_locations=[package_dir] if package_dir else None)
  mod = importlib.util.module_from_spec(spec)
  sys.modules[name] = mod
  spec.loader.exec_module(mod)
  return mod


def _hf_sdpa(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False):
  """LLaDABlock._scaled_dot_product_attention of the Hugging Face original (exact softmax
  attention; the public copy of modeling_llada.py replaced it by an approximation of exp, see
  tests/data/parity/README.md). The only change to reference math, as in the parity fixtures."""
  num_kv_heads, num_q_heads = k.size(1), q.size(1)
  if num_q_heads != num_kv_heads:
    k = k.repeat_interleave(num_q_heads // num_kv_heads, dim=1, output_size=num_q_heads)
    v = v.repeat_interleave(num_q_heads // num_kv_heads, dim=1, output_size=num_q_heads)
  return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                        is_causal=False)


# LLaDA-8B-Instruct's config.json values of the keys dlm's export does not write (architecture
# flags and the remote-code map): the exported folder then loads as the real model would.
LLADA_8B_FLAGS = {
    'auto_map': {'AutoConfig': 'configuration_llada.LLaDAConfig',
                 'AutoModel': 'modeling_llada.LLaDAModelLM'},
    'alibi': False, 'alibi_bias_max': 8.0, 'attention_dropout': 0.0,
    'attention_layer_norm': False, 'attention_layer_norm_with_affine': True,
    'bias_for_layer_norm': False, 'block_group_size': 1, 'embedding_dropout': 0.0,
    'flash_attention': False, 'include_qkv_bias': False, 'init_fn': 'mitchell',
    'init_std': 0.02, 'input_emb_norm': False, 'layer_norm_with_affine': True,
    'max_sequence_length': 4096, 'multi_query_attention': None, 'residual_dropout': 0.0,
    'rope_full_precision': True, 'scale_logits': False, 'use_cache': False}


class Worker:

  def __init__(self, radd_ref, llada_ref):
    self.radd_ref, self.llada_ref = radd_ref, llada_ref
    self.radd = self.llada = None

  def cmd_radd(self, dir, batch, seq_len, lr, seed=0):
    sys.path.insert(0, self.radd_ref)  # losses.py imports noise_lib as a top-level module
    pkg = _load('radd_model', os.path.join(self.radd_ref, 'model', '__init__.py'),
                os.path.join(self.radd_ref, 'model'))
    losses = _load('radd_losses', os.path.join(self.radd_ref, 'losses.py'))
    model = pkg.RADD.from_pretrained(dir).train()
    V = model.config.tokens
    # RADD's get_optimizer (AdamW) with no warm-up, no clipping, no EMA: the setting.
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=0.0)
    loss_fn = losses.get_loss_fn(None, V + 1, True, loss_type='lambda_DCE')
    g = torch.Generator().manual_seed(seed)
    batch = torch.randint(0, V, (batch, seq_len), generator=g)
    self.radd = (model, opt, loss_fn, batch)
    return {'params': sum(p.numel() for p in model.parameters())}

  def cmd_radd_steps(self, n):
    model, opt, loss_fn, batch = self.radd
    secs, cpu, loss = [], [], None
    for _ in range(n):
      t, c = time.perf_counter(), time.process_time()
      loss = loss_fn(model, batch).mean()
      loss.backward()
      opt.step()
      opt.zero_grad(set_to_none=True)
      secs.append(time.perf_counter() - t)
      cpu.append(time.process_time() - c)
    return {'seconds': secs, 'cpu_seconds': cpu, 'loss': float(loss.detach())}

  def cmd_matmul(self, n, reps):
    """Seconds of each of `reps` float32 [n, n] @ [n, n] products (after one untimed): the
    caller takes the best as this host's matmul peak for torch."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    secs = []
    for _ in range(reps):
      t = time.perf_counter()
      a @ b
      secs.append(time.perf_counter() - t)
    return {'seconds': secs}

  def cmd_llada(self, dir):
    from transformers import AutoModel  # pylint: disable=g-import-not-at-top
    work = tempfile.mkdtemp(prefix='vs_torch_llada_')
    for name in os.listdir(dir):
      shutil.copyfile(os.path.join(dir, name), os.path.join(work, name))
    for name in ('modeling_llada.py', 'configuration_llada.py'):
      shutil.copyfile(os.path.join(self.llada_ref, name), os.path.join(work, name))
    with open(os.path.join(work, 'config.json')) as f:
      config = json.load(f)
    with open(os.path.join(work, 'config.json'), 'w') as f:
      json.dump({**LLADA_8B_FLAGS, **config}, f)
    model = AutoModel.from_pretrained(work, trust_remote_code=True, torch_dtype=torch.float32)
    for cls in type(model.model.transformer.blocks[0]).__mro__:
      if '_scaled_dot_product_attention' in cls.__dict__:
        cls._scaled_dot_product_attention = _hf_sdpa
    gen = _load('llada_generate', os.path.join(self.llada_ref, 'generate.py'))
    self.llada = (model.eval(), gen)
    return {'params': sum(p.numel() for p in model.parameters())}

  def cmd_generate(self, n, prompt, gen_length, block_length, steps, mask_id):
    model, gen = self.llada
    prompt = torch.tensor(prompt, dtype=torch.long)
    secs, cpu, out = [], [], None
    for _ in range(n):
      t, c = time.perf_counter(), time.process_time()
      out = gen.generate(model, prompt, steps=steps, gen_length=gen_length,
                         block_length=block_length, temperature=0.0, cfg_scale=0.0,
                         remasking='low_confidence', mask_id=mask_id)
      secs.append(time.perf_counter() - t)
      cpu.append(time.process_time() - c)
    return {'seconds': secs, 'cpu_seconds': cpu, 'tokens': out.tolist()}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--radd_ref', required=True)
  ap.add_argument('--llada_ref', required=True)
  ap.add_argument('--threads', type=int, default=2)
  args = ap.parse_args()
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  w = Worker(args.radd_ref, args.llada_ref)
  out = sys.stdout
  sys.stdout = sys.stderr  # library prints must not corrupt the protocol
  out.write(json.dumps({'ready': True, 'torch': torch.__version__,
                        'threads': torch.get_num_threads()}) + '\n')
  out.flush()
  for line in sys.stdin:
    msg = json.loads(line)
    cmd = msg.pop('cmd')
    if cmd == 'quit':
      break
    try:
      reply = getattr(w, f'cmd_{cmd}')(**msg)
    except Exception as e:  # pylint: disable=broad-except
      reply = {'error': f'{type(e).__name__}: {e}'}
    out.write(json.dumps(reply) + '\n')
    out.flush()


if __name__ == '__main__':
  main()
