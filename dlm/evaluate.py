"""Evaluation: task accuracy under greedy decoding (d1 protocol, SPEC §6) and zero-shot
perplexity (RADD's Monte Carlo protocol, SPEC §3), for `mode='eval'` (`configs/eval.py`).

The RL loop's held-out evaluation calls the same `task_records`. Writes `<workdir>/eval.json`
(task, n, accuracy / nll_per_token and ppl, ci95 = [lo, hi], checkpoint and step) and
`<workdir>/eval_samples.jsonl` (one record per problem or sequence).
"""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from dlm import data as data_lib
from dlm import diffusion
from dlm import generate
from dlm import metrics as metrics_lib
from dlm import sampling
from dlm import sft
from dlm import sharding
from dlm import task_tokens
from dlm import workdir as workdir_lib
from dlm.errors import ConfigError, DataError
from dlm.tasks import base as tasks_base

KINDS = ('task', 'ppl')
_Z95 = 1.959963984540054


def rollout(graphdef, params, enc, problems, key, scfg: sampling.SamplerConfig,
            rules=sharding.DEFAULT_RULES, local: bool = False):
  """(tokens_BxT, attend_BxT): each problem's prompt followed by a sampled response.

  On the parameters' mesh the rows are data-parallel (prompts placed sharded by batch, when the
  data-parallel axes divide them). `local`: `problems` are this process's rows of a global
  batch (`sharding.process_rows`), the other processes hold the rest; the sample is the one the
  global batch would get in one process, and this process's rows come back. A response position
  still holding the mask id (LLaDA's `generate`, which semi_ar follows for LLaDA models, can
  pick the mask token itself) becomes EOS: the response ends there for the reward and for the
  RL loss alike, whose support excludes the mask token."""
  ids, mask = enc.prompts(problems)
  placed_ids, placed_mask, mesh, rules = sampling.data_parallel(params, ids, mask, rules, local)
  tokens, _ = sampling.sample_params(graphdef, params, placed_ids, placed_mask, key, cfg=scfg,
                                     mesh=mesh, rules=rules)
  tokens = np.array(tokens)  # a writable host copy (the output is replicated)
  if local and mesh is not None:
    tokens = tokens[sharding.process_rows(mesh, rules, len(tokens))]
  response = tokens[:, enc.P:]
  response[response == enc.tok.mask_id] = enc.tok.eos_id
  return tokens, np.concatenate([mask, np.ones((len(problems), enc.R), bool)], 1)


def rewards(task, enc, tokens_BxT, problems) -> tuple[np.ndarray, int]:
  """(rewards, number of rewards that raised): model output is untrusted text."""
  completions = [enc.completion(row) for row in np.asarray(tokens_BxT)]
  return tasks_base.score(task, completions, problems)


def task_records(graphdef, params, task, enc, problems, scfg: sampling.SamplerConfig,
                 batch_size: int) -> list[dict]:
  """Per problem: prompt, completion, parsed answer, reward. Prompts of mixed lengths share a
  batch (left-padded to the encoder's width); every batch has one shape (the last is padded
  with copies), so decoding compiles once."""
  records = []
  for i in range(0, len(problems), batch_size):
    chunk = problems[i:i + batch_size]
    padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
    tokens, _ = rollout(graphdef, params, enc, padded, jax.random.key(0), scfg)
    completions = [enc.completion(row) for row in np.asarray(tokens)[:len(chunk)]]
    scores, _ = tasks_base.score(task, completions, chunk)
    records.extend({'prompt': enc.prompt_text(p), 'completion': c, 'answer': task.answer(c),
                    'reward': round(float(r), 6)} for p, c, r in zip(chunk, completions, scores))
  return records


def wilson(successes: int, n: int) -> list[float]:
  """95 % Wilson score interval of a binomial proportion (sound at 0 and 1, unlike ±1.96·se)."""
  if n == 0:
    return [0.0, 1.0]
  p, z2 = successes / n, _Z95 ** 2
  centre = (p + z2 / (2 * n)) / (1 + z2 / n)
  half = _Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
  return [0.0 if successes == 0 else max(0.0, centre - half),
          1.0 if successes == n else min(1.0, centre + half)]


def summarize(records: list[dict]) -> dict:
  solved = sum(r['reward'] == 1.0 for r in records)
  return {'n': len(records), 'accuracy': solved / max(len(records), 1),
          'reward_mean': float(np.mean([r['reward'] for r in records])) if records else 0.0,
          'ci95': wilson(solved, len(records))}


def task_accuracy(graphdef, params, task, enc, problems, scfg, batch_size) -> dict:
  """summarize(task_records(...)): what the RL loop logs at its eval steps."""
  return summarize(task_records(graphdef, params, task, enc, problems, scfg, batch_size))


# ------------------------------------------------------------------------------------------------
# Zero-shot perplexity


def documents(ppl_cfg) -> list[str]:
  """The evaluation text: local files (documents separated by blank lines) or a tfds split."""
  if ppl_cfg.corpus == 'text_files':
    if not ppl_cfg.text_files:
      raise ConfigError('ppl.text_files is empty: give comma-separated paths or globs of the '
                        'evaluation text')
    return [doc for f in data_lib.expand_paths(ppl_cfg.text_files)
            for doc in data_lib.split_documents(f.read_text())]
  if ppl_cfg.corpus == 'tfds':
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    if not ppl_cfg.tfds_name:
      raise ConfigError("ppl.corpus='tfds' needs ppl.tfds_name")
    src = tfds.data_source(ppl_cfg.tfds_name, split=ppl_cfg.tfds_split,
                           data_dir=ppl_cfg.tfds_data_dir or None)
    return [data_lib.example_text(src[i]) for i in range(len(src))]
  raise ConfigError(f"ppl.corpus must be 'text_files' or 'tfds', got {ppl_cfg.corpus!r}")


def packed_rows(docs, tok, seq_len: int, max_rows: int) -> np.ndarray:
  """Documents tokenized with EOS appended, concatenated and cut into rows of seq_len (the
  incomplete tail is dropped), as RADD evaluates on 1 024-token blocks."""
  stream = [t for d in docs for t in tok.encode(d) + [tok.eos_id]]
  n = len(stream) // seq_len
  if max_rows > 0:
    n = min(n, max_rows)
  if n == 0:
    raise DataError(f'the evaluation text has {len(stream)} tokens, fewer than one row of '
                    f'ppl.seq_len={seq_len}')
  return np.asarray(stream[:n * seq_len], np.int32).reshape(n, seq_len)


def perplexity_records(graphdef, params, mask_id: int, rows_NxL, ppl_cfg, seed: int) -> list:
  """Per sequence: its loss per token averaged over `ppl.num_draws` Monte Carlo draws of the
  configured estimator (λ-DCE or k-DCE: unbiased for the any-order NLL bound)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  @jax.jit
  def seq_loss(params, tokens_BxL, key):
    model = nnx.merge(graphdef, params)

    def draw(d, acc):
      loss_B, _ = diffusion.diffusion_loss(model.token_logp, tokens_BxL,
                                           jax.random.fold_in(key, d), loss=ppl_cfg.loss,
                                           mask_id=mask_id)
      return acc + loss_B

    total = jax.lax.fori_loop(0, ppl_cfg.num_draws, draw, jnp.zeros(tokens_BxL.shape[0]))
    return total / ppl_cfg.num_draws

  B, L = ppl_cfg.batch_size, rows_NxL.shape[1]
  base = jax.random.key(seed)
  out = []
  for i in range(0, len(rows_NxL), B):
    chunk = rows_NxL[i:i + B]
    padded = np.concatenate([chunk, np.repeat(chunk[-1:], B - len(chunk), 0)])
    loss_B = np.asarray(seq_loss(params, padded, jax.random.fold_in(base, i)))[:len(chunk)]
    out.extend({'sequence': i + j, 'nll_per_token': float(l / L)} for j, l in enumerate(loss_B))
  return out


def summarize_ppl(records: list[dict]) -> dict:
  x = np.array([r['nll_per_token'] for r in records])
  half = _Z95 * x.std(ddof=1) / math.sqrt(len(x)) if len(x) > 1 else math.inf
  nll = float(x.mean())
  return {'n': len(x), 'nll_per_token': nll, 'ppl': math.exp(nll),
          'ci95': [math.exp(nll - half), math.exp(nll + half)]}


# ------------------------------------------------------------------------------------------------
# Eval mode


def validate(cfg) -> None:
  if cfg.eval.kind not in KINDS:
    raise ConfigError(f'eval.kind={cfg.eval.kind!r}; valid: {KINDS}')
  if cfg.eval.kind == 'ppl':
    p = cfg.ppl
    if p.loss not in ('lambda_dce', 'k_dce'):
      raise ConfigError(f"ppl.loss={p.loss!r}; valid: ('lambda_dce', 'k_dce')")
    for k in ('seq_len', 'num_draws', 'batch_size'):
      if p[k] < 1:
        raise ConfigError(f'ppl.{k}={p[k]} must be ≥ 1')
  elif cfg.eval.batch_size < 1:
    raise ConfigError(f'eval.batch_size={cfg.eval.batch_size} must be ≥ 1')


def run(cfg, workdir: str) -> dict:
  """Evaluates init.checkpoint (default: the workdir's own model) and writes the results."""
  validate(cfg)
  src = cfg.init.checkpoint or workdir
  m = workdir_lib.load(src, cfg.init.step, cfg.init.use_ema)
  if cfg.eval.kind == 'ppl':
    docs = documents(cfg.ppl)
    rows = packed_rows(docs, m.tokenizer, cfg.ppl.seq_len, cfg.ppl.max_sequences)
    records = perplexity_records(m.graphdef, m.params, m.mcfg.mask_id, rows, cfg.ppl, cfg.seed)
    result = {'task': 'ppl', 'loss': cfg.ppl.loss, 'num_draws': cfg.ppl.num_draws,
              **summarize_ppl(records)}
  else:
    task, train, held_out = sft.task_problems(cfg, workdir)
    scfg = generate.sampler_config(cfg.sampler)
    # Width over train + held-out, as the RL run of the same task settings pads its prompts.
    enc = task_tokens.Encoder(task, cfg.task, m.tokenizer, scfg.gen_length, train + held_out)
    records = task_records(m.graphdef, m.params, task, enc, held_out, scfg, cfg.eval.batch_size)
    result = {'task': task.name, **summarize(records)}
  result.update(checkpoint=str(src), step=m.step)
  if jax.process_index() == 0:
    out = epath.Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'eval.json').write_text(json.dumps(result, indent=1) + '\n')
    (out / 'eval_samples.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
    shown = (f'accuracy {result["accuracy"]:.4f}' if 'accuracy' in result else
             f'ppl {result["ppl"]:.3f} (nll/token {result["nll_per_token"]:.4f})')
    metrics_lib.log(f'eval {result["task"]} of {src} (step {m.step}): n {result["n"]}, {shown}, '
                    f'ci95 [{result["ci95"][0]:.4g}, {result["ci95"][1]:.4g}] → {out / "eval.json"}')
  return result
