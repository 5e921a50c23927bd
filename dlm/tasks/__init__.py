"""Verifiable tasks for RL post-training, the supervised warm start and evaluation.

Plain Python on the host (no JAX): rewards run on decoded text between device steps. Callers pick a
task by `task.name` with `get` and use only the `base.Task` protocol.
  base              the protocol, `render_prompt` (chat template hook), `score` (batched rewards
                    that count a raising reward), `data_file`, the shared task_cfg keys
  countdown         Countdown (SPEC §6.1): solver, generator, prompts, `CountdownTask`
  countdown_reward  its safe reward; `countdown.reward` (re-exported) is the DESIGN §3 contract
  countdown_tfds    the Countdown generator as a tfds data source (array_record) for grain
  sudoku            4×4 Sudoku (SPEC §6.2), split by solution grid, `SudokuTask`
  data/             d1's test files (Apache-2.0, see data/README.md), for `task.eval_file='d1'`
"""
from dlm.errors import ConfigError
from dlm.tasks.base import PROMPT_STYLES, Task, data_file, render_prompt, score
from dlm.tasks.countdown import CountdownTask
from dlm.tasks.sudoku import SudokuTask

TASKS: dict[str, Task] = {t.name: t for t in (CountdownTask(), SudokuTask())}

__all__ = ['TASKS', 'get', 'Task', 'PROMPT_STYLES', 'data_file', 'render_prompt', 'score']


def get(name: str) -> Task:
  """The registered task called `name` (the config's `task.name`)."""
  if name not in TASKS:
    raise ConfigError(f'task.name={name!r}; valid: {tuple(TASKS)}')
  return TASKS[name]
