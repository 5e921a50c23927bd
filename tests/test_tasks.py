"""The task protocol: every registered task through the same code (dlm.tasks.base), as RL, the
warm start and evaluation use it."""
import csv
import json
import logging

import ml_collections
import numpy as np
import pytest

import dlm.tasks
from dlm.tasks import base, countdown, sudoku

NAMES = sorted(dlm.tasks.TASKS)
SPECIFIC = {  # small settings, so every test stays fast
    'countdown': dict(num_numbers=(3,), low=1, high=20),
    'sudoku': dict(num_empty=6, test_grids=40),
}
EXAMPLE = {
    'countdown': countdown.Problem((30, 100, 93), 23),
    'sudoku': sudoku.Puzzle('3102200002100320', '3142243142131324'),
}
D1_COUNT = {'countdown': 256, 'sudoku': 500}


def config(name, **over):
  c = dict(name=name, prompt='compact', chat_template='', train_size=60, test_size=12,
           eval_file='', **SPECIFIC[name])
  return ml_collections.ConfigDict({**c, **over})


def held_out_keys(name, problems) -> set:
  """What training must not share with these held-out problems: Countdown problems (order of the
  numbers aside); Sudoku every grid that solves one of the puzzles (SPEC §6.2)."""
  if name == 'countdown':
    return {p.key for p in problems}
  return {g for p in problems for g in sudoku.solutions(p.puzzle)}


def train_keys(name, problems) -> set:
  return {p.key for p in problems} if name == 'countdown' else {p.solution for p in problems}


def write_d1_file(name, path, problems):
  if name == 'countdown':
    path.write_text(''.join(json.dumps({'input': ','.join(map(str, p.numbers)),
                                        'output': str(p.target)}) + '\n' for p in problems))
  else:
    with open(path, 'w', newline='') as f:
      csv.writer(f).writerows([('Puzzle', 'Solution')] + [(p.puzzle, p.solution) for p in problems])


@pytest.fixture(params=NAMES)
def task(request):
  return dlm.tasks.get(request.param)


def test_registry():
  assert set(NAMES) == {'countdown', 'sudoku'}
  for name, task in dlm.tasks.TASKS.items():
    assert task.name == name and isinstance(task, dlm.tasks.Task)
    assert dlm.tasks.get(name) is task
  with pytest.raises(ValueError, match=r"task\.name='nope'.*countdown.*sudoku"):
    dlm.tasks.get('nope')


def test_problems_deterministic_and_disjoint(task, tmp_path):
  cfg = config(task.name)
  train, held_out = task.problems(cfg, seed=0, data_dir=tmp_path / 'a')
  assert len(train) == 60 and len(held_out) == 12
  assert len(train_keys(task.name, train)) > 1  # not one repeated problem
  assert (train, held_out) == task.problems(cfg, seed=0, data_dir=tmp_path / 'b')
  other_train, other_held_out = task.problems(cfg, seed=1, data_dir=tmp_path / 'a')
  assert other_train != train and other_held_out != held_out
  assert not train_keys(task.name, train) & held_out_keys(task.name, held_out)


def test_packaged_d1_eval_file(task, tmp_path):
  train, held_out = task.problems(config(task.name, eval_file='d1'), seed=0, data_dir=tmp_path)
  assert len(held_out) == D1_COUNT[task.name] and len(train) == 60
  assert held_out[0] == EXAMPLE[task.name]  # the first line of d1's file
  assert not train_keys(task.name, train) & held_out_keys(task.name, held_out)


def test_eval_file_path_is_excluded_from_training(task, tmp_path):
  """A held-out file made of problems the generator would otherwise train on: the exclusion
  has work to do here, unlike with d1's file."""
  cfg = config(task.name)
  train, _ = task.problems(cfg, seed=0, data_dir=tmp_path / 'a')
  path = tmp_path / 'held_out.txt'
  write_d1_file(task.name, path, train[:5])
  assert train_keys(task.name, train) & held_out_keys(task.name, train[:5])
  cfg.eval_file = str(path)
  new_train, held_out = task.problems(cfg, seed=0, data_dir=tmp_path / 'b')
  assert held_out == train[:5] and len(new_train) == 60
  assert not train_keys(task.name, new_train) & held_out_keys(task.name, held_out)


def test_demonstrations_score_one_and_wrong_answers_less(task, tmp_path):
  for eval_file in ('', 'd1'):
    train, held_out = task.problems(config(task.name, eval_file=eval_file), seed=0,
                                    data_dir=tmp_path)
    problems = train[:20] + held_out[:20]
    demos = [task.demonstration(p) for p in problems]
    rewards, errors = dlm.tasks.score(task, demos, problems)
    assert rewards.dtype == np.float32 and errors == 0
    np.testing.assert_array_equal(rewards, np.ones(len(problems)))
    for p, demo in zip(problems, demos):
      assert demo.startswith('<answer>') and demo.endswith('</answer>')
      assert task.answer(demo) == demo[len('<answer>'):-len('</answer>')]
      for wrong in ('<answer>1</answer>', '<answer></answer>', demo[:-1], '', None):
        assert task.reward(wrong, p) < 1.0, (p, wrong)
  assert task.answer('no answer here') is None


def test_render_prompt(task):
  p = EXAMPLE[task.name]
  for style in dlm.tasks.PROMPT_STYLES:
    text = task.prompt(p, style)
    assert text and dlm.tasks.render_prompt(task, p, style) == text
  assert task.prompt(p, 'd1') != task.prompt(p, 'compact')
  assert '<answer>' in task.prompt(p, 'd1')
  # Braces other than {prompt} stay literal (str.format would fail on them).
  template = '{"role": "user", "content": "{prompt}"} {x}'
  text = task.prompt(p, 'compact')
  assert (dlm.tasks.render_prompt(task, p, 'compact', template) ==
          f'{{"role": "user", "content": "{text}"}} {{x}}')
  with pytest.raises(ValueError, match=r'chat_template'):
    dlm.tasks.render_prompt(task, p, 'compact', '<user>{promt}</user>')
  # 'auto': the tokenizer's own chat template (one user turn, generation prompt), else raw
  assert dlm.tasks.render_prompt(task, p, 'compact', 'auto') == text

  class Chat:
    chat_template = 'given'

    def apply_chat_template(self, messages, add_generation_prompt):
      assert add_generation_prompt
      return f'<u>{messages[0]["content"]}</u><a>' if messages[0]['role'] == 'user' else ''

  assert dlm.tasks.render_prompt(task, p, 'compact', 'auto', Chat()) == f'<u>{text}</u><a>'
  with pytest.raises(ValueError, match=r'task\.prompt'):
    dlm.tasks.render_prompt(task, p, 'chat')


def test_score_counts_a_raising_reward_and_logs_once(task, monkeypatch, caplog):
  monkeypatch.setattr(base, '_reported', set())
  p = EXAMPLE[task.name]
  real_reward = task.reward

  def reward(completion, problem):
    if completion == 'boom':
      raise RuntimeError('reward bug')
    return real_reward(completion, problem)

  monkeypatch.setattr(task, 'reward', reward)
  completions = [task.demonstration(p), 'boom', 'no answer']
  caplog.set_level(logging.WARNING, logger='dlm.tasks.base')
  for _ in range(2):
    rewards, errors = dlm.tasks.score(task, completions, [p] * 3)
    np.testing.assert_array_equal(rewards, [1.0, 0.0, 0.0])
    assert errors == 1
  logged = [r for r in caplog.records if 'reward raised' in r.getMessage()]
  assert len(logged) == 1
  assert task.name in logged[0].getMessage() and 'reward bug' in logged[0].getMessage()
  assert "'boom'" in logged[0].getMessage()
  with pytest.raises(ValueError, match='2 completions for 3 problems'):
    dlm.tasks.score(task, completions[:2], [p] * 3)


def test_task_reward_is_strict_about_malformed_problems(task, caplog):
  """The Task's reward lets a bug (here a malformed problem) raise, so `score` counts it; the
  public per-task `reward` functions would have hidden it as an ordinary low reward."""
  bad = {'countdown': countdown.Problem(('x', 2), 3), 'sudoku': sudoku.Puzzle('12', '34')}
  caplog.set_level(logging.WARNING, logger='dlm.tasks.base')
  rewards, errors = dlm.tasks.score(task, ['<answer>1+2</answer>'] * 2, [bad[task.name]] * 2)
  assert errors == 2 and rewards.tolist() == [0.0, 0.0]


def test_long_inputs_are_truncated_in_the_log(monkeypatch, caplog):
  monkeypatch.setattr(base, '_reported', set())
  task = dlm.tasks.get('sudoku')
  caplog.set_level(logging.WARNING, logger='dlm.tasks.base')
  dlm.tasks.score(task, ['x' * 100_000], [sudoku.Puzzle('1' * 5000, '2')])
  (record,) = [r for r in caplog.records if 'reward raised' in r.getMessage()]
  assert len(record.getMessage()) < 2000
