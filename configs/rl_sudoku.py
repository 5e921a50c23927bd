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
  rl_common.tiny_model(c, d_model=128, n_layers=4, n_heads=4, mlp_dim=512)
  c.task.update(prompt='compact', num_empty=(4, 5, 6, 7, 8), train_size=7000, test_size=256,
                eval_file='')
  c.sampler.update(gen_length=24, steps=24, block_length=8, temperature=1.0)
  c.eval_sampler.update(steps=24, batch_size=128)
  c.rl.update(num_steps=100, num_prompts=16, group_size=8, num_mc=8, eval_every=25,
              checkpoint_every=10)
  c.train.update(lr=5e-5, warmup_steps=1, clip_norm=1.0)
  c.warmstart.update(steps=2500, batch_size=64, lr=5e-4, warmup_steps=100, log_every=100,
                     checkpoint_every=500, problem_fraction=0.5, disjoint=True, demo_error=0.5)
  return c


def tiny(c):
  """Seconds-scale smoke run for tests: the cpu pipeline with everything shrunk."""
  cpu(c)
  c.model.update(d_model=32, n_layers=1, n_heads=2, mlp_dim=64)
  c.task.update(train_size=200, test_size=16)
  c.warmstart.update(problem_fraction=1.0, disjoint=False)
  c.eval_sampler.update(batch_size=16)
  c.rl.update(num_steps=4, num_prompts=2, group_size=4, num_mc=2, eval_every=2,
              checkpoint_every=2)
  c.warmstart.update(steps=4, batch_size=8, warmup_steps=1, log_every=2, checkpoint_every=2)
  return c


PRESETS = {'paper': lambda c: c, 'cpu': cpu, 'tiny': tiny}


def get_config(preset: str = 'paper') -> ml_collections.ConfigDict:
  return configs.from_preset(PRESETS, preset, base_config())
