"""The task protocol: what RL, the supervised warm start and evaluation need from a verifiable task.

Plain Python on the host (no JAX): rewards run on decoded text between device steps. A task is
picked by `task.name` from `dlm.tasks.TASKS`; everything task-specific stays behind `Task`.

task_cfg is the config's `task` section (a ConfigDict or a plain dict), read with `task_cfg[key]`.
Keys every task reads (`SHARED_KEYS`):
  name           the registry key
  prompt         a `PROMPT_STYLES` entry: 'd1' (the d1 training prompt) | 'compact' (tiny models)
  chat_template  'auto' = the tokenizer's own chat template if it has one (Instruct models), else
                 the raw prompt; '' = the raw prompt; else a string with '{prompt}'
                 (see `render_prompt`)
  train_size     training problems to generate
  test_size      held-out problems to generate when eval_file is ''
  eval_file      '' = held-out problems generated disjoint from training; 'd1' = d1's test file
                 packaged in dlm/tasks/data; anything else = a path to a file in d1's format
Task-specific keys sit flat in the same section (see each task's docstring).
"""
from __future__ import annotations

import logging
import pathlib
import typing
from collections.abc import Sequence

import numpy as np

from dlm.errors import ConfigError, MissingFileError

PROMPT_STYLES = ('d1', 'compact')
SHARED_KEYS = ('name', 'prompt', 'chat_template', 'train_size', 'test_size', 'eval_file')
DATA_DIR = pathlib.Path(__file__).resolve().parent / 'data'

_REPR_CHARS = 300
_logger = logging.getLogger(__name__)
_reported: set[str] = set()  # names of tasks whose reward has raised (logged once per process)


@typing.runtime_checkable
class Task(typing.Protocol):
  """A verifiable task. Problems are opaque to callers: only the task's own methods read them."""

  name: str

  def problems(self, task_cfg, *, seed: int, data_dir) -> tuple[list, list]:
    """(train, held_out): deterministic for (task_cfg, seed), disjoint. `data_dir` is where a task
    may cache generated data."""

  def prompt(self, problem, style: str) -> str:
    """The prompt text in a `PROMPT_STYLES` style (ValueError otherwise)."""

  def demonstration(self, problem) -> str:
    """The supervised warm-start target: the completion after the prompt, a correct answer in
    `<answer>…</answer>` tags (so it scores 1.0 under `reward`)."""

  def reward(self, completion: str, problem) -> float:
    """Pure. Expected bad input (any completion) is scored, never raised; an exception means a
    bug, which `score` counts."""

  def answer(self, completion: str) -> str | None:
    """The parsed answer, for evaluation logs; None if the completion has none."""


def data_file(name: str) -> pathlib.Path:
  """A file packaged in dlm/tasks/data (see its README), e.g. 'countdown_cd3_test.jsonl'."""
  path = DATA_DIR / name
  if not path.is_file():
    available = sorted(p.name for p in DATA_DIR.iterdir()) if DATA_DIR.is_dir() else []
    raise MissingFileError(f'no packaged task data file {name!r} in {DATA_DIR}; '
                            f'available: {available}')
  return path


def eval_path(eval_file: str, d1_name: str):
  """Resolves `task.eval_file`: None for '', the packaged `d1_name` for 'd1', else the path."""
  if not eval_file:
    return None
  return data_file(d1_name) if eval_file == 'd1' else eval_file


def check_style(style: str) -> None:
  if style not in PROMPT_STYLES:
    raise ConfigError(f'task.prompt={style!r}; valid: {PROMPT_STYLES}')


def render_prompt(task: Task, problem, style: str, chat_template: str = '', tokenizer=None) -> str:
  """The text the model sees: the task's prompt, through `apply_template`."""
  return apply_template(task.prompt(problem, style), chat_template, tokenizer)


def apply_template(text: str, chat_template: str, tokenizer=None) -> str:
  """`text` as one user turn of a chat template.

  'auto': the tokenizer's own template (an Instruct model's, e.g. LLaDA-8B-Instruct's
  `tokenizer_config.json`, rendered as `transformers`' apply_chat_template with the generation
  prompt), or the raw text when the tokenizer has none; '': the raw text; any other string is a
  template whose '{prompt}' is replaced with `str.replace`, not `str.format` (prompts and
  templates contain other braces).
  """
  if chat_template == 'auto':
    if tokenizer is not None and getattr(tokenizer, 'chat_template', None):
      return tokenizer.apply_chat_template([{'role': 'user', 'content': text}],
                                           add_generation_prompt=True)
    return text
  if not chat_template:
    return text
  if '{prompt}' not in chat_template:
    raise ConfigError(f"chat_template={chat_template[:_REPR_CHARS]!r} must contain '{{prompt}}' "
                     "(or be '' for the raw prompt, 'auto' for the tokenizer's own)")
  return chat_template.replace('{prompt}', text)


def _short(x) -> str:
  text = repr(x[:_REPR_CHARS + 1] if isinstance(x, str) else x)
  return text if len(text) <= _REPR_CHARS else text[:_REPR_CHARS] + '…'


def score(task: Task, completions: Sequence[str], problems: Sequence) -> tuple[np.ndarray, int]:
  """(float32 rewards, number of rewards that raised). A raising reward scores 0.0, so one bad
  case cannot stop training, and is counted so it cannot pass unnoticed either; the first one
  per task per process is logged with its inputs."""
  if len(completions) != len(problems):
    raise ValueError(f'{len(completions)} completions for {len(problems)} problems')
  rewards, errors = np.zeros(len(problems), np.float32), 0
  for i, (completion, problem) in enumerate(zip(completions, problems)):
    try:
      rewards[i] = float(task.reward(completion, problem))
    except Exception as e:  # noqa: BLE001 - a bug in a reward: count it, score 0
      errors += 1
      if task.name not in _reported:
        _reported.add(task.name)
        _logger.warning('task %s: reward raised %s (scored 0.0; later errors of this task are '
                        'only counted) on completion=%s problem=%s', task.name, _short(e),
                        _short(completion), _short(problem), exc_info=e)
  return rewards, errors
