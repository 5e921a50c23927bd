"""4×4 Sudoku: the 288 grids, the split by solution grid, the generator, d1's CSV and the reward."""
import pytest

from dlm.tasks import data_file
from dlm.tasks import sudoku

D1_CSV = data_file('4x4_test_sudoku.csv')  # packaged copy of d1's test puzzles
PUZZLE, SOLUTION = '3102200002100320', '3142243142131324'  # d1's first test row


def test_grids():
  grids = sudoku.solution_grids()
  assert len(grids) == len(set(grids)) == 288
  assert all(sudoku.is_valid_grid(g) for g in grids)
  assert not sudoku.is_valid_grid('1234' * 4)  # rows fine, columns not
  assert not sudoku.is_valid_grid('1234234134124123')  # rows and columns fine, boxes not
  assert not sudoku.is_valid_grid(SOLUTION[:15])


def test_d1_csv_and_reward_on_its_solutions():
  puzzles = sudoku.load_d1_csv(D1_CSV)
  assert len(puzzles) == 500
  assert puzzles[0] == sudoku.Puzzle(PUZZLE, SOLUTION)
  for p in puzzles:
    assert sudoku.is_valid_grid(p.solution) and p.solution in sudoku.solutions(p.puzzle)
    assert sudoku.reward(f'<answer>\n{p.solution}\n</answer>', p.puzzle, p.solution) == 1.0
    assert sudoku.reward(sudoku.compact_solution(p), p.puzzle, p.solution) == 1.0


def test_load_d1_csv_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='missing.csv'):
    sudoku.load_d1_csv(tmp_path / 'missing.csv')
  bad = tmp_path / 'bad.csv'
  bad.write_text(f'Puzzle,Solution\n{PUZZLE},{SOLUTION}\n{PUZZLE},123\n')
  with pytest.raises(ValueError, match=':3:'):
    sudoku.load_d1_csv(bad)
  bad.write_text(f'{PUZZLE},{SOLUTION}\n')
  with pytest.raises(ValueError, match='header'):
    sudoku.load_d1_csv(bad)


def test_reward_partial_and_format():
  empty = [i for i, c in enumerate(PUZZLE) if c == '0']  # 8 cells
  one_wrong = list(SOLUTION)
  one_wrong[empty[0]] = '4' if SOLUTION[empty[0]] != '4' else '1'
  assert sudoku.reward(f'<answer>{"".join(one_wrong)}</answer>', PUZZLE, SOLUTION) == 7 / 8
  assert sudoku.reward(f'<answer>{PUZZLE}</answer>', PUZZLE, SOLUTION) == 0.0  # nothing filled
  spaced = ' '.join(SOLUTION[i:i + 4] for i in range(0, 16, 4))
  assert sudoku.reward(f'<answer>{spaced}</answer>', PUZZLE, SOLUTION) == 1.0  # separators dropped
  assert sudoku.reward(f'<answer>{SOLUTION}9999</answer>', PUZZLE, SOLUTION) == 1.0  # truncated
  # Padded with '0': the first 8 cells hold 4 of the 8 empty ones, all correct here.
  assert sudoku.reward(f'<answer>{SOLUTION[:8]}</answer>', PUZZLE, SOLUTION) == 4 / 8
  assert sudoku.reward('', PUZZLE, SOLUTION) == 0.0
  assert sudoku.reward('<answer></answer>', PUZZLE, SOLUTION) == 0.0
  assert sudoku.reward(SOLUTION, PUZZLE, SOLUTION) == 0.0  # no tag
  assert sudoku.reward(f'<answer>{"1" * 16}</answer> <answer>{SOLUTION}</answer>',
                       PUZZLE, SOLUTION) == 1.0  # last block wins
  assert sudoku.reward(f'<answer>{SOLUTION}</answer> <answer>{"1" * 16}</answer>',
                       PUZZLE, SOLUTION) < 1.0
  assert sudoku.reward(f'<answer>{SOLUTION}</answer>', SOLUTION, SOLUTION) == 0.0  # nothing empty
  fullwidth = SOLUTION.translate(str.maketrans('1234', '１２３４'))
  assert sudoku.reward(f'<answer>{fullwidth}</answer>', PUZZLE, SOLUTION) == 0.0


def test_reward_hostile_inputs_never_raise():
  for completion in (None, b'<answer>1</answer>', '<answer>' * 100_000 + '</answer>',
                     'x' * 1_000_000 + f'<answer>{SOLUTION}</answer>', '<answer>' + '1' * 10**6):
    assert 0.0 <= sudoku.reward(completion, PUZZLE, SOLUTION) <= 1.0
  assert sudoku.reward(f'<answer>{SOLUTION}</answer>', None, SOLUTION) == 0.0
  assert sudoku.reward(f'<answer>{SOLUTION}</answer>', PUZZLE[:5], SOLUTION) == 0.0
  # The strict scorer raises on a malformed problem (a bug) but scores any completion.
  for puzzle in (None, PUZZLE[:5], PUZZLE + '0'):
    with pytest.raises(ValueError, match='malformed'):
      sudoku.reward_strict(f'<answer>{SOLUTION}</answer>', puzzle, SOLUTION)
  for completion in (None, b'<answer>1</answer>', '<answer>' + '1' * 10**6):
    assert sudoku.reward_strict(completion, PUZZLE, SOLUTION) == sudoku.reward(
        completion, PUZZLE, SOLUTION)


def test_split_by_grid_and_generate():
  train_grids, test_grids = sudoku.split_grids(seed=0, num_test=58)
  assert len(test_grids) == 58 and len(train_grids) == 230
  assert not set(train_grids) & set(test_grids)
  assert sudoku.split_grids(seed=0, num_test=58) == (train_grids, test_grids)
  assert sudoku.split_grids(seed=1, num_test=58)[1] != test_grids
  d1_grids = {p.solution for p in sudoku.load_d1_csv(D1_CSV)}
  fresh_train, fresh_test = sudoku.split_grids(seed=0, num_test=20, exclude=sorted(d1_grids))
  assert len(fresh_train) + len(fresh_test) == 288 - len(d1_grids)
  assert not (set(fresh_train) | set(fresh_test)) & d1_grids

  train = sudoku.generate(1000, seed=0, grids=train_grids)
  test = sudoku.generate(200, seed=1, grids=test_grids)
  assert train == sudoku.generate(1000, seed=0, grids=train_grids)
  assert len({p.puzzle for p in train}) == 1000
  assert not {p.solution for p in train} & {p.solution for p in test}  # no shared solutions
  for p in train + test:
    assert p.puzzle.count('0') == 8
    assert sudoku.solutions(p.puzzle) == [p.solution]  # unique
  mixed = sudoku.generate(100, seed=2, grids=test_grids, num_empty=(4, 10), unique=False)
  assert {p.puzzle.count('0') for p in mixed} == {4, 10}
  with pytest.raises(ValueError, match='distinct'):
    sudoku.generate(100, seed=0, grids=test_grids[:1], num_empty=1)
  with pytest.raises(ValueError):
    sudoku.generate(1, seed=0, grids=['1234' * 4])


def test_prompts():
  prompt = sudoku.d1_prompt(PUZZLE)
  assert prompt.endswith(f'Solve the following Sudoku puzzle: {PUZZLE}\n')
  assert '<reasoning>' in prompt and '<answer>' in prompt
  assert sudoku.d1_prompt(sudoku.Puzzle(PUZZLE, SOLUTION)) == prompt
  assert sudoku.compact_prompt(PUZZLE) == '3102 2000 0210 0320 :'
