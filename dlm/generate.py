"""Sample mode: load a run's checkpoint, sample, write `<workdir>/samples.jsonl`.

Any dlm workdir works (pretraining, SFT, RL): the model, its parameters and tokenizer load from
the workdir alone (`dlm.workdir.load`), which is only read; the sample config says how to
sample. One JSON object per sample: prompt, text (the generation up to its first EOS), tokens
(all generated ids), calls (network calls of its row), seconds (wall time of its batch,
compilation excluded), strategy, checkpoint step.
"""
import json
import time

import jax
import numpy as np
from etils import epath

from dlm import sampling
from dlm import workdir as workdir_lib
from dlm.errors import ConfigError
from dlm.task_tokens import left_pad
from dlm.tasks import base as tasks_base


def sampler_config(sampler_cfg) -> sampling.SamplerConfig:
  return sampling.SamplerConfig(**sampler_cfg.to_dict())


def run(cfg, workdir: str) -> list[dict]:
  scfg = sampler_config(cfg.sampler)
  if cfg.num_samples < 1 or cfg.batch_size < 1:
    raise ConfigError('num_samples and batch_size must be ≥ 1')
  tok, _, graphdef, params, _, step = workdir_lib.load(workdir, cfg.checkpoint_step, cfg.use_ema)
  prompts = [p for p in cfg.prompts for _ in range(cfg.num_samples)]
  encoded = [tok.encode(tasks_base.apply_template(p, cfg.chat_template, tok)) if p else []
             for p in prompts]
  width = max(map(len, encoded))
  ids, mask = left_pad(encoded, width)
  bs = cfg.batch_size
  n_batches = -(-len(prompts) // bs)
  pad = n_batches * bs - len(prompts)  # repeat the last row: every batch has the same shape
  ids, mask = (np.concatenate([a, np.repeat(a[-1:], pad, 0)]) for a in (ids, mask))
  base = jax.random.key(cfg.seed)
  rows = lambda b: sampling.data_parallel(params, ids[b * bs:(b + 1) * bs],
                                          mask[b * bs:(b + 1) * bs])  # data-parallel rows
  ids0, mask0, mesh, rules = rows(0)
  fn = sampling.sample_params.lower(graphdef, params, ids0, mask0, base, cfg=scfg, mesh=mesh,
                                    rules=rules).compile()
  records, batch_seconds = [], []
  for b in range(n_batches):
    t0 = time.perf_counter()
    x, stats = jax.device_get(fn(params, *rows(b)[:2], jax.random.fold_in(base, b)))
    seconds = time.perf_counter() - t0
    batch_seconds.append(seconds)
    for r in range(bs):
      i = b * bs + r
      if i >= len(prompts):
        break
      gen = [int(t) for t in x[r, width:]]
      text_ids = gen[:gen.index(tok.eos_id)] if tok.eos_id in gen else gen
      records.append({'prompt': prompts[i], 'text': tok.decode(text_ids), 'tokens': gen,
                      'calls': int(stats['calls_B'][r]), 'seconds': seconds,
                      'strategy': scfg.strategy, 'step': step})
  if jax.process_index() == 0:
    path = epath.Path(workdir) / cfg.output
    path.write_text(''.join(json.dumps(r) + '\n' for r in records))
    tokens = len(records) * scfg.gen_length
    print(f'{len(records)} samples ({scfg.strategy}, checkpoint {step}) → {path}; '
          f'{tokens / max(sum(batch_seconds), 1e-9):,.0f} tokens/s', flush=True)
    for r in records[:3]:
      print(f'  {r["prompt"]!r} → {r["text"]!r}', flush=True)
  return records
