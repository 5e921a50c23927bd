"""RL post-training on 4×4 Sudoku (SPEC §5, §6.2): `python -m dlm.main --config=configs/rl_sudoku.py`.

Train and held-out puzzles never share a solution grid (only 288 grids exist; d1's own split leaks
them). Reward: the fraction of the puzzle's empty cells the last `<answer>` fills correctly.
Default preset: the BGPO paper setting (LLaDA-8B-Instruct from `init.checkpoint`, n_t = 32,
evaluated on d1's test puzzles). Preset `cpu`: the whole pipeline on a laptop CPU, like
`rl_countdown.py:cpu`: a tiny model warm-started on generated puzzles by a demonstrator that is
lazy half the time (it writes every blank as 1), then BGPO on puzzles of other grids' kind.
"""
import ml_collections

import configs
from configs import rl_common


def base_config() -> ml_collections.ConfigDict:
  c = rl_common.base_config()
  t = c.task
  t.name = 'sudoku'
  t.eval_file = 'd1'  # d1's 4×4 test puzzles (packaged); '' = generated; or a d1-format CSV
  t.num_empty = (8,)  # blank-cell counts of generated puzzles (d1's test puzzles have 8)
  t.test_grids = 58  # solution grids held out (of 288) when eval_file is ''
  c.rl.num_mc = 32  # the paper's n_t for Sudoku
  return c


def cpu(c):
  """Tiny model, puzzles with 4–8 blanks, grids split 230 / 58; minutes on 2 cores."""
  rl_common.cpu_pipeline(c, gen_length=24)
  c.task.update(num_empty=(4, 5, 6, 7, 8))
  return c


def tiny(c):
  """Seconds-scale smoke run for tests: the cpu pipeline with everything shrunk."""
  cpu(c)
  rl_common.tiny_pipeline(c)
  c.task.update(train_size=200, test_size=16)
  return c


PRESETS = {'paper': lambda c: c, 'cpu': cpu, 'tiny': tiny}


def get_config(preset: str = 'paper') -> ml_collections.ConfigDict:
  return configs.from_preset(PRESETS, preset, base_config())
