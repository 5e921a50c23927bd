"""Evaluation: `python -m dlm.main --config=configs/eval.py:<preset> --workdir=W
[--config.init.checkpoint=CKPT]` evaluates CKPT (any dlm workdir; default W itself) and writes
W/eval.json and W/eval_samples.jsonl.

Presets:
  countdown, sudoku          the d1 protocol (SPEC §6): d1's test files, d1 prompts, greedy
                             semi_ar, 256 tokens, 256 steps, block 32
  countdown_cpu, sudoku_cpu  the held-out sets and decoding of the `cpu` RL presets
  ppl                        zero-shot perplexity (RADD, SPEC §3): λ-DCE Monte Carlo estimate
                             over 1 024-token rows of local text files or a tfds split
"""
import ml_collections

import configs
from configs import rl_countdown, rl_sudoku, sample


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.mode = 'eval'
  c.seed = 0
  c.dry_run = ''  # dlm.dry_run compiles training steps: a value here is an error (none here)
  c.init = i = ml_collections.ConfigDict()
  i.checkpoint = ''  # the model's workdir; '' = --workdir itself
  i.step = -1  # -1 = latest
  i.use_ema = True  # EMA parameters when the run kept them
  c.eval = e = ml_collections.ConfigDict()
  e.kind = 'task'  # 'task' | 'ppl'
  e.batch_size = 64  # prompts per greedy decoding call (task)
  return c


def task_eval(c, rl_config, train_size: int):
  """Task evaluation with the task section and greedy decoding of an RL config. Training
  problems are generated only to keep them disjoint from generated held-out ones and to pad
  prompts as that RL run does (`train_size`)."""
  c.task = rl_config.task.copy_and_resolve_references()
  c.task.unlock()
  c.task.train_size = train_size
  c.sampler = sample.base_config().sampler
  c.sampler.update(strategy='semi_ar', gen_length=rl_config.sampler.gen_length,
                   steps=rl_config.eval_sampler.steps, block_length=rl_config.sampler.block_length,
                   temperature=0.0)
  return c


def countdown(c):
  return task_eval(c, rl_countdown.get_config('paper'), train_size=1)


def sudoku(c):
  return task_eval(c, rl_sudoku.get_config('paper'), train_size=1)


def countdown_cpu(c):
  return task_eval(c, rl_countdown.get_config('cpu'), train_size=7000)


def sudoku_cpu(c):
  return task_eval(c, rl_sudoku.get_config('cpu'), train_size=7000)


def ppl(c):
  c.eval.kind = 'ppl'
  c.ppl = p = ml_collections.ConfigDict()
  p.corpus = 'text_files'  # 'text_files' | 'tfds'
  p.text_files = ''  # comma-separated paths/globs; documents separated by blank lines
  p.tfds_name = ''  # with corpus='tfds': a prepared dataset with a 'text' feature
  p.tfds_split = 'test'
  p.tfds_data_dir = ''
  p.seq_len = 1024
  p.num_draws = 1024  # Monte Carlo draws of the estimator per row (RADD: 1 024)
  p.loss = 'lambda_dce'  # 'lambda_dce' | 'k_dce'
  p.batch_size = 8
  p.max_sequences = 0  # 0 = every full row of the text
  return c


PRESETS = {'countdown': countdown, 'sudoku': sudoku, 'countdown_cpu': countdown_cpu,
           'sudoku_cpu': sudoku_cpu, 'ppl': ppl}


def get_config(preset: str = 'countdown') -> ml_collections.ConfigDict:
  return configs.from_preset(PRESETS, preset, base_config())
