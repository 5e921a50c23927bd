"""Pretraining configs: `get_config(preset)` returns a full, locked ConfigDict.

Presets: `tiny` (CPU, seconds), `radd_small` / `radd_medium` (RADD paper recipe, SPEC §3), and
`llada_8b` (architecture only, SPEC §2.1; reused by later RL/import configs).
Use: `--config=configs/pretrain.py:tiny --config.train.num_steps=50`.
"""
import ml_collections

import configs
from dlm import sharding


def optimizer(**overrides) -> ml_collections.ConfigDict:
  """What `dlm.trainer.Trainer` reads: AdamW, warm-up, clipping, EMA, micro-batches (SPEC §3)."""
  t = ml_collections.ConfigDict()
  t.lr = 3e-4
  t.warmup_steps = 2500
  t.b1 = 0.9
  t.b2 = 0.999
  t.eps = 1e-8
  t.weight_decay = 0.0
  t.clip_norm = 1.0
  t.ema_max_decay = 0.9999  # EMA decay min(max, (1+n)/(10+n)); 0 disables EMA
  t.microbatches = 1  # gradient accumulation by lax.scan
  t.update(overrides)
  return t


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.mode = 'pretrain'
  c.seed = 0
  c.dry_run = ''  # v5p-32, v5e-8, … or 'local': compile the step, report memory (dlm.dry_run)

  c.model = m = ml_collections.ConfigDict()
  m.family = 'radd'  # 'radd': LayerNorm(+bias) + GELU-tanh MLP; 'llada': RMSNorm + SwiGLU
  m.num_embeddings = 0  # rows of the embedding / output head incl. the mask row; 0 = tokenizer V + 1
  m.mask_id = -1  # -1 = last row (RADD convention: mask id = V)
  m.d_model = 768
  m.n_layers = 12
  m.n_heads = 12
  m.mlp_dim = 3072
  m.rope_base = 1e4
  m.norm_eps = 1e-5
  m.dropout = 0.0
  m.param_dtype = 'float32'
  m.dtype = 'auto'  # compute dtype: 'auto' = bfloat16 on GPU/TPU, float32 on CPU
  m.remat = 'none'  # 'none' | 'full' | 'dots' (save matmul outputs) | 'dots_no_batch'
  m.attention = 'auto'  # 'auto' (cuDNN on GPU, splash on TPU, else XLA) | 'xla' | 'cudnn' | 'splash'
  m.head_chunk = 128  # output-head positions per chunk in the losses (0 = all at once)
  # LoRA adapters (rank 0 = none): only they train, the base stays frozen (e.g. load it with
  # model.param_dtype='bfloat16'); d1 uses rank 128 on every projection
  m.lora = ml_collections.ConfigDict({'rank': 0, 'alpha': 16.0, 'targets': 'q,k,v,o,gate,up,down'})

  c.diffusion = d = ml_collections.ConfigDict()
  d.loss = 'lambda_dce'  # 'lambda_dce' | 't_dce' | 't_dse' | 'k_dce'
  d.schedule = 'loglinear'  # 'loglinear' | 'linear' | 'cosine'
  d.eps = 1e-3  # log-linear schedule epsilon and t floor

  c.data = dt = ml_collections.ConfigDict()
  dt.corpus = 'builtin'  # 'builtin' (generated offline) | 'text_files' | 'tfds'
  dt.text_files = ''  # comma-separated local paths/globs, one document per blank-line-separated block
  dt.tfds_name = ''  # with corpus='tfds': a prepared tfds dataset with a 'text' feature
  dt.tfds_data_dir = ''  # '' = <workdir>/tfds
  dt.tokenizer = ''  # sentencepiece .model path; '' = train one on the corpus into <workdir>
  dt.vocab_size = 50257  # pieces of a tokenizer trained here (real tokens V; mask is V)
  dt.seq_len = 1024
  dt.batch_size = 512  # global
  dt.eval_batches = 4
  dt.builtin_documents = 20000  # size of the generated default corpus

  c.train = t = optimizer()
  t.num_steps = 400_000
  t.log_every = 100
  t.eval_every = 5000
  t.checkpoint_every = 10000
  t.checkpoint_minutes = 30.0  # also save when this long has passed since the last save (0 = off)
  t.keep_checkpoints = 3

  c.sharding = s = ml_collections.ConfigDict()
  s.data = 1
  s.fsdp = -1  # -1 = all remaining devices
  s.tensor = 1
  # logical axis name -> mesh axes (None = replicated)
  s.rules = sharding.DEFAULT_RULES
  return c


def tiny(c):
  c.model.update(d_model=64, n_layers=2, n_heads=4, mlp_dim=256, dropout=0.0)
  c.data.update(vocab_size=256, seq_len=64, batch_size=16, eval_batches=2, builtin_documents=4000)
  c.train.update(num_steps=200, lr=3e-3, warmup_steps=20, log_every=10, eval_every=100,
                 checkpoint_every=100, ema_max_decay=0.999)
  return c


def radd_small(c):
  # remat 'dots' from the dry run (BENCHMARKS.md): 64 × 1024 per v5p chip takes 20.6 GB with
  # it, 66.3 GB without; radd_medium 42.6 GB
  c.model.update(num_embeddings=50258, mask_id=50257, d_model=768, n_layers=12, n_heads=12,
                 mlp_dim=3072, dropout=0.02, remat='dots')
  return c


def radd_medium(c):
  radd_small(c)
  c.model.update(d_model=1024, n_layers=24, n_heads=16, mlp_dim=4096)
  return c


def llada_8b(c):
  c.model.update(family='llada', num_embeddings=126464, mask_id=126336, d_model=4096,
                 n_layers=32, n_heads=32, mlp_dim=12288, rope_base=500000.0, dropout=0.0,
                 dtype='bfloat16', remat='full')
  c.data.update(vocab_size=126464, seq_len=4096)
  return c


PRESETS = {'tiny': tiny, 'radd_small': radd_small, 'radd_medium': radd_medium,
           'llada_8b': llada_8b}


def get_config(preset: str = 'radd_small') -> ml_collections.ConfigDict:
  return configs.from_preset(PRESETS, preset, base_config())
