"""dlm vs the reference PyTorch code on the same CPU, paired: RADD's train step and LLaDA's
`generate` (issue 11).

    python -m dlm.bench.vs_torch --torch_python=/tmp/torchenv/bin/python \\
        --radd_ref=DIR --llada_ref=DIR [--rounds=5] [--train_steps=300] [--quick]

--radd_ref   a checkout of github.com/ML-GSAI/RADD (model/, losses.py, noise_lib.py)
--llada_ref  a folder with LLaDA's generate.py (github.com/ML-GSAI/LLaDA) and the Hugging Face
             remote code of LLaDA-8B-Instruct (modeling_llada.py, configuration_llada.py);
             tests/data/parity/README.md says where each file comes from
--torch_python  an interpreter with torch (CPU), transformers 4.46, safetensors, einops,
             omegaconf: the torch side runs in `vs_torch_worker.py` under it, never in this
             process (dlm does not depend on torch)

Train step, RADD's small recipe scaled down (d 256, 4 heads, 4 blocks, vocabulary 1 000 + mask,
8 × 256 tokens, float32, dropout 0, AdamW, no clipping, no EMA, lambda-DCE): dlm's initial
weights are written in RADD's layout and loaded by RADD's own `from_pretrained`.
Generation, LLaDA's small configuration (d 256, 4 layers, batch 4, prompt 32, 128 tokens, block
32, 128 steps, greedy): a LLaDA-family model trained here by `dlm.train` on the builtin corpus
(cached in --cache_dir; its sentencepiece vocabulary is what that corpus yields, ~780 pieces),
written in LLaDA's layout (`dlm.convert.layouts`) and loaded by LLaDA's remote code, so both
sides decode with the same weights from the same held-out prompts; agreement = fraction of
generated tokens equal to `generate`'s, over --agreement_batches batches of held-out prompts (the
first is the timed one; the others run once, untimed). One batch is 4 × 128 tokens, and one
early divergence changes the rest of its row, so a single batch's agreement swings by tens of
points between prompt sets.

Rounds alternate (torch, dlm, torch, dlm, …) and never overlap; each side keeps its best and
median seconds. Ratios are torch ÷ dlm (> 1: dlm faster), of medians; `cpu ratio` is the same
of CPU seconds (both sides' process time over all threads). On a machine that other jobs load,
torch's OpenMP threads degrade far more than XLA's (we saw torch's step go from 0.29 s to 1.2–3 s
while dlm's doubled): only numbers from a quiet machine compare the implementations.
The host matters: the train step is ~48 GFLOP of float32 matmuls and both sides' kernels scale
differently with the vector unit (on a 2-core AMD Zen 4 VM, family 25, both sides' matmuls
peak near 200 GFLOP/s; the 2-core host of our earlier runs reached about 470). So the
train-step line also gives the step's model FLOPs (`dlm.metrics.model_flops_per_token`, as
the MFU of the other benches), each side's best float32 [2048, 2048] product on this host
(taking turns), the rate each step reaches, and the ratio dlm would have if every FLOP ran at
that peak: the bound on the ratio this host allows; and the step's matrix products each timed
alone on XLA:CPU (`matmul_floor`), the least time any XLA program of this step can take here,
whatever it does around them. The generation line does the same for `generate` and `semi_ar`,
which run the same full forward passes (--gen_steps of them, at batch × (prompt + gen)
tokens), forward products only.
Prints a table and, last, one JSON line (with `cpu`, the host's CPU model).
"""
import json
import os
import platform
import subprocess
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import ConfigDict

from configs import pretrain
from dlm import data as data_lib
from dlm import metrics
from dlm import model as model_lib
from dlm import sampling as S
from dlm import sharding
from dlm import task_tokens
from dlm import train as train_lib
from dlm import trainer as trainer_lib
from dlm import workdir as workdir_lib
from dlm.convert import layouts
from dlm.errors import ConfigError

_TORCH = flags.DEFINE_string('torch_python', None, 'python of the torch environment')
_RADD_REF = flags.DEFINE_string('radd_ref', None, 'checkout of ML-GSAI/RADD')
_LLADA_REF = flags.DEFINE_string('llada_ref', None, 'LLaDA generate.py + remote code folder')
_CACHE = flags.DEFINE_string('cache_dir', '/tmp/dlm_bench_vs_torch', 'trained LLaDA-family '
                               'model cache (reused when its checkpoint exists)')
_PARTS = flags.DEFINE_list('parts', ['train', 'generate'], 'train, generate')
_ROUNDS = flags.DEFINE_integer('rounds', 5, 'interleaved rounds per side')
_STEPS = flags.DEFINE_integer('steps_per_round', 3, 'train steps timed per round')
_THREADS = flags.DEFINE_integer('threads', 2, 'torch.set_num_threads')
_TRAIN_STEPS = flags.DEFINE_integer('train_steps', 300, 'training steps of the LLaDA model')
_THRESHOLD = flags.DEFINE_float('threshold', 0.9, 'threshold decoder confidence')
_QUICK = flags.DEFINE_bool('quick', False, 'small sizes: a smoke test of the script')
_AGREE = flags.DEFINE_integer('agreement_batches', 8, 'batches of held-out prompts over which '
                              'the decoders\' token agreement with `generate` is measured')

# (d, heads, layers, vocabulary) of both parts; the sizes unless --quick
SIZES = dict(d=256, heads=4, layers=4, vocab=1000, batch=8, seq=256, gen_batch=4, prompt=32,
             gen=128, block=32, gen_steps=128)
QUICK = dict(d=32, heads=4, layers=1, vocab=200, batch=2, seq=32, gen_batch=2, prompt=8,
             gen=32, block=16, gen_steps=32)


class Torch:
  """The worker process: one JSON command per line, one JSON answer per line."""

  def __init__(self, python, radd_ref, llada_ref, threads):
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'vs_torch_worker.py')
    env = {**os.environ, 'OMP_NUM_THREADS': str(threads)}
    self.p = subprocess.Popen([python, worker, f'--radd_ref={radd_ref}',
                               f'--llada_ref={llada_ref}', f'--threads={threads}'],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    self.info = self._read()

  def _read(self):
    line = self.p.stdout.readline()
    if not line:
      raise RuntimeError('the torch worker exited (its stderr is above)')
    return json.loads(line)

  def __call__(self, cmd, **kw):
    self.p.stdin.write(json.dumps({'cmd': cmd, **kw}) + '\n')
    self.p.stdin.flush()
    out = self._read()
    if 'error' in out:
      raise RuntimeError(f'torch worker, {cmd}: {out["error"]}')
    return out

  def close(self):
    self.p.stdin.write('{"cmd": "quit"}\n')
    self.p.stdin.close()
    self.p.wait()


def _stats(secs):
  return {'best': float(np.min(secs)), 'median': float(np.median(secs))}


def _timed(fn, n):
  """(wall seconds, CPU seconds of this process, last output) of n calls."""
  secs, cpu = [], []
  for _ in range(n):
    t, c = time.perf_counter(), time.process_time()
    out = jax.block_until_ready(fn())
    secs.append(time.perf_counter() - t)
    cpu.append(time.process_time() - c)
  return secs, cpu, out


def host_cpu() -> str:
  """The CPU model (and x86 family/model numbers): ratios here depend on the host, since the
  two sides' kernels gain differently from a wider vector unit."""
  info = {}
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        k, _, v = line.partition(':')
        info.setdefault(k.strip(), v.strip())
  except OSError:
    return platform.processor() or platform.machine()
  name = info.get('model name', platform.machine())
  if 'cpu family' in info:
    name += f' (family {info["cpu family"]}, model {info.get("model", "?")})'
  return name


def matmul_peak(torch, n=2048, reps=10, rounds=3) -> dict:
  """Each side's best float32 [n, n] @ [n, n] rate in GFLOP/s, taking turns: the host's
  matmul peak, against which each side's train step is measured."""
  a = jax.random.normal(jax.random.key(0), (n, n))
  f = jax.jit(lambda a, b: a @ b)
  jax.block_until_ready(f(a, a))
  t_best = j_best = float('inf')
  for _ in range(rounds):
    t_best = min(t_best, *torch('matmul', n=n, reps=reps)['seconds'])
    j_best = min(j_best, *_timed(lambda: f(a, a), reps)[0])
  gflop = 2 * n ** 3 / 1e9
  return {'jax': gflop / j_best, 'torch': gflop / t_best}


def pass_products(z, batch, seq, rows, gated=False) -> list[tuple]:
  """The matrix products of one forward pass of z's model (d, heads, layers; `rows` output-head
  columns; `gated`: SwiGLU's two input projections) as (einsum, operand shapes, times per pass,
  attention?)."""
  b, t, d, n, l = batch, seq, z['d'], z['heads'], z['layers']
  m, h, f = b * t, d // n, 4 * d
  return [('md,dnh->mnh', ((m, d), (d, n, h)), 3 * l, False),  # q, k, v
          ('mnh,nhd->md', ((m, n, h), (n, h, d)), l, False),  # o
          ('md,df->mf', ((m, d), (d, f)), (2 if gated else 1) * l, False),  # mlp in
          ('mf,fd->md', ((m, f), (f, d)), l, False),  # mlp out
          ('md,dv->mv', ((m, d), (d, rows)), 1, False),  # head
          ('bnth,bnsh->bnts', ((b, n, t, h), (b, n, t, h)), l, True),  # q·kᵀ, heads first
          ('bnts,bnsh->bnth', ((b, n, t, t), (b, n, t, h)), l, True)]  # p·v (dlm.attention)


def product_flops(spec, shapes) -> int:
  """2 × the product of every index's size: an einsum's multiply-adds, counted as two FLOPs."""
  sizes = {}
  for names, shape in zip(spec.split('->')[0].split(','), shapes):
    sizes.update(zip(names, shape))
  return 2 * int(np.prod(list(sizes.values())))


def matmul_floor(products, backward=True, reps=20) -> dict:
  """Least time XLA:CPU needs for `products` (`pass_products`): each one (its forward, and with
  `backward` the two products of its gradient) jitted and timed alone, best of `reps`, summed.
  A program that runs these products on XLA:CPU takes at least this, whatever it fuses or
  skips around them. Seconds: {'dense', 'attention', 'total'}."""
  out = {'dense': 0.0, 'attention': 0.0}
  for spec, shapes, count, attn in products:
    args = [jax.random.normal(jax.random.key(0), shape) for shape in shapes]
    op = lambda x, y, spec=spec: jnp.einsum(spec, x, y)
    runs = [lambda f=jax.jit(op): f(*args)]
    if backward:  # the vjp of a product needs no forward: XLA keeps only the two gradients
      dy = jax.random.normal(jax.random.key(1), jax.eval_shape(op, *args).shape)
      grad = jax.jit(lambda x, y, dy, op=op: jax.vjp(op, x, y)[1](dy))
      runs.append(lambda: grad(*args, dy))
    for run in runs:
      _timed(run, 1)
      out['attention' if attn else 'dense'] += count * min(_timed(run, reps)[0])
  out['total'] = out['dense'] + out['attention']
  return out


def radd_config(z) -> ConfigDict:
  c = pretrain.get_config('tiny')
  c.model.update(family='radd', num_embeddings=z['vocab'] + 1, mask_id=z['vocab'],
                 d_model=z['d'], n_heads=z['heads'], n_layers=z['layers'], mlp_dim=4 * z['d'],
                 dropout=0.0, dtype='float32')
  c.train.update(lr=3e-4, warmup_steps=1, clip_norm=0.0, ema_max_decay=0.0, weight_decay=0.0)
  c.diffusion.loss = 'lambda_dce'
  return c


def _outside_tensors(fmt, params, mcfg) -> dict:
  """dlm parameters as the outside layout's tensors (dlm.convert.layouts, the importer's map)."""
  model = {'d_model': mcfg.d_model, 'n_heads': mcfg.n_heads, 'n_layers': mcfg.n_layers,
           'mlp_dim': mcfg.mlp_dim, 'num_embeddings': mcfg.num_embeddings}
  tensors = {}
  for s in layouts.slots(fmt, model):
    a = params
    for k in s.path:
      a = a[k]
    tensors[s.name] = np.ascontiguousarray(s.to_outside(np.asarray(a)[s.index]), np.float32)
  return tensors


def write_radd(params, mcfg, z, out):
  """dlm parameters in RADD's `save_pretrained` layout (config.json + model.safetensors)."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  tensors = _outside_tensors('radd', params, mcfg)
  h = mcfg.head_dim
  tensors['rotary_emb.inv_freq'] = (1.0 / 10000 ** (np.arange(0, h, 2) / h)).astype(np.float32)
  save_file(tensors, os.path.join(out, 'model.safetensors'), metadata={'format': 'pt'})
  cfg = {'tokens': z['vocab'], 'model': {'name': 'bench', 'type': 'ddit_wot',
                                          'hidden_size': mcfg.d_model, 'cond_dim': 128,
                                          'length': z['seq'], 'n_blocks': mcfg.n_layers,
                                          'n_heads': mcfg.n_heads, 'dropout': 0.0,
                                          'use_checkpoint': False, 'dtype': 'float32'}}
  with open(os.path.join(out, 'config.json'), 'w') as f:
    json.dump(cfg, f)


def write_llada(params, mcfg, out):
  """dlm parameters in LLaDA's Hugging Face layout (what `dlm.convert --export=llada` writes,
  from the loaded model rather than a workdir's saved config)."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file(_outside_tensors('llada', params, mcfg), os.path.join(out, 'model.safetensors'),
            metadata={'format': 'pt'})
  model = {'d_model': mcfg.d_model, 'n_heads': mcfg.n_heads, 'n_layers': mcfg.n_layers,
           'mlp_dim': mcfg.mlp_dim, 'num_embeddings': mcfg.num_embeddings,
           'mask_id': mcfg.mask_id, 'rope_base': mcfg.rope_base, 'norm_eps': mcfg.norm_eps}
  with open(os.path.join(out, 'config.json'), 'w') as f:
    json.dump({**layouts.outside_config('llada', model), 'torch_dtype': 'float32'}, f)


def train_part(torch, z, peak) -> tuple[dict, dict]:
  c = radd_config(z)
  mcfg = model_lib.config_from(c.model)
  mesh = sharding.make_mesh(ConfigDict({'data': 1, 'fsdp': 1, 'tensor': 1}), jax.devices()[:1])
  tr = trainer_lib.Trainer(mcfg, c.train, mesh, c.sharding.rules, seed=0)
  state = tr.init_state()
  tmp = tempfile.mkdtemp(prefix='vs_torch_radd_')
  write_radd(jax.device_get(state.params), mcfg, z, tmp)
  info = torch('radd', dir=tmp, batch=z['batch'], seq_len=z['seq'], lr=c.train.lr)
  shard = {'tokens': sharding.batch_sharding(mesh, c.sharding.rules)}
  step = tr.compile_step(train_lib.diffusion_objective(c.diffusion, mcfg.mask_id), shard)
  rng = np.random.default_rng(0)
  batch = jax.device_put({'tokens': rng.integers(0, z['vocab'], (z['batch'], z['seq']),
                                                  dtype=np.int32)}, shard)
  holder = [state]

  def one():
    holder[0], m = step(holder[0], batch)
    return m

  _timed(one, 2)  # compile + warm-up
  torch('radd_steps', n=2)
  flops = metrics.model_flops_per_token(mcfg, z['seq']) * z['batch'] * z['seq']
  best_peak = max(peak.values())
  t_secs, d_secs, t_cpu, d_cpu = [], [], [], []
  for _ in range(_ROUNDS.value):
    r = torch('radd_steps', n=_STEPS.value)
    t_secs += r['seconds']
    t_cpu += r['cpu_seconds']
    s, c, _ = _timed(one, _STEPS.value)
    d_secs += s
    d_cpu += c
  floor = matmul_floor(pass_products(z, z['batch'], z['seq'], mcfg.num_embeddings))
  t, d = _stats(t_secs), _stats(d_secs)
  tc, dc = _stats(t_cpu), _stats(d_cpu)
  row = {'what': 'RADD train step', 'torch': t, 'dlm': d, 'ratio': t['median'] / d['median'],
         'cpu_ratio': tc['median'] / dc['median']}
  n_params = model_lib.count_params(mcfg)
  assert info['params'] == n_params, (info['params'], n_params)
  return row, {'train_torch_best_s': t['best'], 'train_torch_median_s': t['median'],
               'train_dlm_best_s': d['best'], 'train_dlm_median_s': d['median'],
               'train_speedup': row['ratio'], 'train_torch_cpu_median_s': tc['median'],
               'train_dlm_cpu_median_s': dc['median'], 'train_cpu_speedup': row['cpu_ratio'],
               'train_params': n_params, 'train_gflop': flops / 1e9,
               'train_dlm_gflops': flops / 1e9 / d['median'],
               'train_torch_gflops': flops / 1e9 / t['median'],
               'train_speedup_at_peak': t['median'] * best_peak * 1e9 / flops,
               'train_matmuls_alone_s': floor['total'],
               'train_matmuls_alone_dense_s': floor['dense'],
               'train_matmuls_alone_attention_s': floor['attention'],
               'train_speedup_at_matmuls_alone': t['median'] / floor['total']}


def llada_config(z, workdir) -> ConfigDict:
  c = pretrain.get_config('tiny')
  c.model.update(family='llada', d_model=z['d'], n_heads=z['heads'], n_layers=z['layers'],
                 mlp_dim=4 * z['d'], dropout=0.0, dtype='float32')
  c.data.update(vocab_size=z['vocab'], seq_len=-(-(z['prompt'] + z['gen']) // 64) * 64,
                batch_size=16, builtin_documents=8000)
  c.train.update(num_steps=_TRAIN_STEPS.value, lr=1e-3, warmup_steps=50,
                 log_every=100, eval_every=_TRAIN_STEPS.value,
                 checkpoint_every=_TRAIN_STEPS.value)
  return c


def trained_llada(z, workdir):
  c = llada_config(z, workdir)
  latest = workdir_lib.latest_config(workdir)
  if latest is None or latest[0] < _TRAIN_STEPS.value:
    train_lib.run(c, workdir)
  loaded = workdir_lib.load(workdir, _TRAIN_STEPS.value, use_ema=False)
  _, _, eval_src = data_lib.prepare(c.data, workdir)
  return c, loaded, eval_src


def generate_part(torch, z, peak) -> tuple[list[dict], dict]:
  workdir = _CACHE.value + ('_quick' if _QUICK.value else '')
  c, loaded, eval_src = trained_llada(z, workdir)
  tmp = tempfile.mkdtemp(prefix='vs_torch_llada_')
  write_llada(jax.device_get(loaded.params), loaded.mcfg, tmp)
  torch('llada', dir=tmp)
  P, G, K, B = z['prompt'], z['gen'], z['block'], z['gen_batch']
  tok = loaded.tokenizer
  docs = (tok.encode(data_lib.example_text(eval_src[i])) for i in range(len(eval_src)))
  prompts = [d[:P] for d in docs if len(d) >= P][:B * _AGREE.value]
  batches = [task_tokens.left_pad(prompts[i:i + B], P) for i in range(0, len(prompts) // B * B, B)]
  if not batches:
    raise ConfigError(f'the held-out split has fewer than {B} documents of ≥ {P} tokens')
  ids, mask = batches[0]
  mid = loaded.mcfg.mask_id
  base = dict(gen_length=G, block_length=K)
  runs = {'semi_ar': S.SamplerConfig('semi_ar', steps=z['gen_steps'], **base)}
  for cache in S.CACHES:
    runs['threshold' + ('' if cache == 'none' else f'_{cache}')] = S.SamplerConfig(
        'threshold', threshold=_THRESHOLD.value, cache=cache, **base)
  key = jax.random.key(0)
  fns = {name: S.sample_params.lower(loaded.graphdef, loaded.params, ids, mask, key,
                                     cfg=cfg).compile() for name, cfg in runs.items()}
  gen_kw = dict(gen_length=G, block_length=K, steps=z['gen_steps'], mask_id=mid)
  gen_kw['prompt'] = np.asarray(ids).tolist()
  ref = np.asarray(torch('generate', n=1, **gen_kw)['tokens'])[:, P:]
  secs = {name: [] for name in ['generate', *runs]}
  cpu = {name: [] for name in secs}
  outs = {}
  for _ in range(_ROUNDS.value):
    r = torch('generate', n=1, **gen_kw)
    secs['generate'] += r['seconds']
    cpu['generate'] += r['cpu_seconds']
    for name, fn in fns.items():
      s, c, (x, st) = _timed(lambda: fn(loaded.params, ids, mask, key), 1)
      secs[name] += s
      cpu[name] += c
      outs[name] = (np.asarray(x)[:, P:], float(np.asarray(st['calls_B']).mean()))
  same = {name: [(outs[name][0] == ref).sum()] for name in runs}  # equal tokens per batch
  for b_ids, b_mask in batches[1:]:  # agreement only: untimed
    b_ref = np.asarray(torch('generate', n=1, **{**gen_kw, 'prompt': np.asarray(b_ids).tolist()})
                       ['tokens'])[:, P:]
    for name, fn in fns.items():
      same[name].append((np.asarray(fn(loaded.params, b_ids, b_mask, key)[0])[:, P:] ==
                         b_ref).sum())
  t, tc = _stats(secs['generate']), _stats(cpu['generate'])
  flops = (metrics.model_flops_per_token(loaded.mcfg, P + G) / 3 * B * (P + G) *
           z['gen_steps'])  # a forward is a third of `model_flops_per_token`
  best_peak = max(peak.values())
  floor = matmul_floor(pass_products(z, B, P + G, loaded.mcfg.num_embeddings, gated=True),
                       backward=False)
  floor_s = floor['total'] * z['gen_steps']
  rows = [{'what': 'LLaDA generate', 'torch': t, 'dlm': None, 'ratio': None, 'cpu_ratio': None,
           'calls': float(z['gen_steps']), 'agreement': 1.0}]
  out = {'generate_torch_best_s': t['best'], 'generate_torch_median_s': t['median'],
         'generate_torch_cpu_median_s': tc['median']}
  for name in runs:
    d, dc = _stats(secs[name]), _stats(cpu[name])
    calls = outs[name][1]
    agree = float(np.sum(same[name]) / (len(batches) * B * G))
    rows.append({'what': f'dlm {name}', 'torch': None, 'dlm': d,
                 'ratio': t['median'] / d['median'], 'cpu_ratio': tc['median'] / dc['median'],
                 'calls': calls, 'agreement': agree})
    out.update({f'{name}_best_s': d['best'], f'{name}_median_s': d['median'],
                f'{name}_speedup': t['median'] / d['median'], f'{name}_cpu_median_s': dc['median'],
                f'{name}_cpu_speedup': tc['median'] / dc['median'], f'{name}_agreement': agree,
                f'{name}_calls': calls,
                f'{name}_agreement_per_batch': [int(n) / (B * G) for n in same[name]]})
  out.update({'agreement_batches': len(batches), 'generate_gflop': flops / 1e9,
              'generate_torch_gflops': flops / 1e9 / t['median'],
              'semi_ar_dlm_gflops': flops / 1e9 / out['semi_ar_median_s'],
              'semi_ar_speedup_at_peak': t['median'] * best_peak * 1e9 / flops,
              'semi_ar_matmuls_alone_s': floor_s,
              'semi_ar_speedup_at_matmuls_alone': t['median'] / floor_s})
  out['generate_model_train_steps'] = loaded.step
  out['generate_num_embeddings'] = loaded.mcfg.num_embeddings
  return rows, out


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  missing = [f'--{f.name}' for f in (_TORCH, _RADD_REF, _LLADA_REF) if not f.value]
  if missing:
    raise ConfigError(f'dlm.bench.vs_torch needs {", ".join(missing)} (see its docstring)')
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
  z = QUICK if _QUICK.value else SIZES
  torch = Torch(_TORCH.value, _RADD_REF.value, _LLADA_REF.value, _THREADS.value)
  rows, out = [], {}
  try:
    peak = matmul_peak(torch)
    out.update({'matmul_peak_jax_gflops': peak['jax'], 'matmul_peak_torch_gflops': peak['torch'],
                'matmul_peak_gflops': max(peak.values())})
    if 'train' in _PARTS.value:
      row, o = train_part(torch, z, peak)
      rows.append(row)
      out.update(o)
    if 'generate' in _PARTS.value:
      r, o = generate_part(torch, z, peak)
      rows += r
      out.update(o)
  finally:
    torch.close()
  fmt = lambda s: '—' if s is None else f'{s["best"]:.3f} / {s["median"]:.3f}'
  cpu = host_cpu()
  print(f'\nPaired, {_ROUNDS.value} interleaved rounds; seconds best / median; ratio = torch '
        f'median ÷ dlm median (torch {torch.info["torch"]}, {torch.info["threads"]} threads; '
        f'jax {jax.__version__}, {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs; '
        f'{cpu})')
  print('cpu ratio: the same of CPU seconds (process time, all threads), steadier on a busy '
        'machine')
  print(f'{"":>22} {"torch s":>15} {"dlm s":>15} {"ratio":>6} {"cpu ratio":>9} {"calls":>6} '
        f'{"agree":>6}')
  for r in rows:
    extra = (f' {r["calls"]:>6.1f} {r["agreement"]:>6.3f}' if 'calls' in r else '')
    ratio = '' if r['ratio'] is None else f'{r["ratio"]:.2f}'
    cratio = '' if r['cpu_ratio'] is None else f'{r["cpu_ratio"]:.2f}'
    print(f'{r["what"]:>22} {fmt(r["torch"]):>15} {fmt(r["dlm"]):>15} {ratio:>6} {cratio:>9}'
          f'{extra}')
  peak = out['matmul_peak_gflops']
  print(f'float32 matmul peak of this host: {out["matmul_peak_jax_gflops"]:.0f} (jax) / '
        f'{out["matmul_peak_torch_gflops"]:.0f} (torch) GFLOP/s')
  if 'train_gflop' in out:
    print(f'train step: {out["train_gflop"]:.1f} GFLOP (model FLOPs); the steps run at '
          f'{out["train_dlm_gflops"]:.0f} (dlm, {out["train_dlm_gflops"] / peak:.0%}) and '
          f'{out["train_torch_gflops"]:.0f} (torch, {out["train_torch_gflops"] / peak:.0%}); '
          f'every FLOP at that peak would make dlm {out["train_speedup_at_peak"]:.2f}x torch')
    print(f'the step\'s matrix products alone, each timed on its own on XLA:CPU: '
          f'{out["train_matmuls_alone_s"]:.3f} s (dense {out["train_matmuls_alone_dense_s"]:.3f}, '
          f'attention {out["train_matmuls_alone_attention_s"]:.3f}); a dlm step with nothing '
          f'else in it would be {out["train_speedup_at_matmuls_alone"]:.2f}x torch')
  if 'generate_gflop' in out:
    print(f'generation: {out["generate_gflop"]:.1f} GFLOP (model FLOPs of {z["gen_steps"]} full '
          f'forward passes); generate runs at {out["generate_torch_gflops"]:.0f} '
          f'({out["generate_torch_gflops"] / peak:.0%}), semi_ar at '
          f'{out["semi_ar_dlm_gflops"]:.0f} ({out["semi_ar_dlm_gflops"] / peak:.0%}); every FLOP '
          f'at that peak would make semi_ar {out["semi_ar_speedup_at_peak"]:.2f}x generate. '
          f'agreement over {out["agreement_batches"]} batches of {z["gen_batch"]} prompts.')
    print(f'the {z["gen_steps"]} forward passes\' matrix products alone, each timed on its own '
          f'on XLA:CPU: {out["semi_ar_matmuls_alone_s"]:.3f} s; a semi_ar with nothing else in '
          f'it would be {out["semi_ar_speedup_at_matmuls_alone"]:.2f}x generate')
  goals = {}
  if 'train_speedup' in out:
    goals['train_1.5x'] = out['train_speedup'] >= 1.5
  if 'semi_ar_speedup' in out:
    goals['semi_ar_1.5x'] = out['semi_ar_speedup'] >= 1.5
    goals['threshold_cache_4x_at_95pct'] = any(
        out[f'{n}_speedup'] >= 4 and out[f'{n}_agreement'] >= 0.95
        for n in ('threshold_prefix', 'threshold_dual'))
  print('goals: ' + ', '.join(f'{k}={"met" if v else "NOT met"}' for k, v in goals.items()))
  print(json.dumps({**out, 'goals': goals, 'sizes': z, 'rounds': _ROUNDS.value,
                    'torch': torch.info['torch'], 'torch_threads': torch.info['threads'],
                    'jax': jax.__version__, 'device': jax.devices()[0].device_kind,
                    'cpus': os.cpu_count(), 'machine': platform.machine(), 'cpu': cpu,
                    'python': platform.python_version()}))


if __name__ == '__main__':
  app.run(main)
