"""4×4 Sudoku (SPEC §6.2, d1 protocol): grids, generator, split by solution grid, prompt, reward.

Plain Python on the host; no JAX. Puzzles and solutions are 16-character strings read row by row,
'0' = empty. Only 288 valid 4×4 grids exist, so a split by puzzle leaks solutions (d1's 500 test
puzzles share 229 grids with its training puzzles); `split_grids` splits the grids themselves and
`generate` draws puzzles from one side only. `SudokuTask` is the `base.Task`.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import io
import itertools
import random
from collections.abc import Sequence

from etils import epath

from dlm.errors import ConfigError, DataError, MissingFileError
from dlm.tasks import base
from dlm.tasks.countdown_reward import last_answer

SIZE = 16
D1_TEST_FILE = '4x4_test_sudoku.csv'  # in dlm/tasks/data: `task.eval_file='d1'`
_UNITS = ([[4 * r + c for c in range(4)] for r in range(4)] +  # rows
          [[4 * r + c for r in range(4)] for c in range(4)] +  # columns
          [[4 * (br + r) + bc + c for r in range(2) for c in range(2)]
           for br in (0, 2) for bc in (0, 2)])  # 2×2 boxes


@dataclasses.dataclass(frozen=True)
class Puzzle:
  puzzle: str
  solution: str


def is_valid_grid(grid: str) -> bool:
  """True for a complete solution: 16 digits 1-4, every row, column and box a permutation."""
  return (isinstance(grid, str) and len(grid) == SIZE and set(grid) <= set('1234') and
          all(len({grid[i] for i in unit}) == 4 for unit in _UNITS))


@functools.cache
def solution_grids() -> tuple[str, ...]:
  """All 288 valid 4×4 grids, sorted (enumerated by backtracking over cells)."""
  peers = [{j for unit in _UNITS if i in unit for j in unit} - {i} for i in range(SIZE)]
  cells, grids = [''] * SIZE, []

  def fill(i: int):
    if i == SIZE:
      grids.append(''.join(cells))
      return
    for d in '1234':
      if all(cells[j] != d for j in peers[i] if j < i):
        cells[i] = d
        fill(i + 1)
    cells[i] = ''

  fill(0)
  return tuple(grids)


def solutions(puzzle: str) -> list[str]:
  """Every valid grid consistent with the puzzle's givens (288 candidates: a scan is enough)."""
  return [g for g in solution_grids() if all(p == '0' or p == s for p, s in zip(puzzle, g))]


def split_grids(*, seed: int = 0, num_test: int = 58,
                exclude: Sequence[str] = ()) -> tuple[list[str], list[str]]:
  """(train_grids, test_grids): a seeded partition of the 288 grids, `num_test` held out.

  Grids in `exclude` (e.g. the solutions of an outside test set) go to neither side.
  """
  excluded = set(exclude)
  grids = [g for g in solution_grids() if g not in excluded]
  if not 0 <= num_test <= len(grids):
    raise ConfigError(f'num_test must be in [0, {len(grids)}], got {num_test}')
  random.Random(seed).shuffle(grids)
  return sorted(grids[num_test:]), sorted(grids[:num_test])


def generate(n: int, *, seed: int, grids: Sequence[str], num_empty: int | Sequence[int] = 8,
             unique: bool = True) -> list[Puzzle]:
  """`n` distinct puzzles from `grids`, deterministic for `seed`.

  Each blanks a random `num_empty` cells (d1's test puzzles all have 8) of a random grid; with
  `unique`, only puzzles whose givens determine the grid are kept, so the reward's reference
  solution is the only right answer.
  """
  counts = (num_empty,) if isinstance(num_empty, int) else tuple(num_empty)
  if not grids or any(not is_valid_grid(g) for g in grids):
    raise ConfigError('grids must be a non-empty list of valid 4x4 solution grids')
  if not counts or any(not 1 <= k <= SIZE for k in counts):
    raise ConfigError(f'num_empty must be counts in [1, 16], got {num_empty!r}')
  rng, seen, puzzles = random.Random(seed), set(), []
  misses = 0  # consecutive draws without a new puzzle: the settings admit no more
  while len(puzzles) < n:
    misses += 1
    if misses > 20_000:
      raise ConfigError(f'found only {len(puzzles)} of {n} distinct puzzles from {len(grids)} grids')
    grid = rng.choice(grids)
    empty = set(rng.sample(range(SIZE), rng.choice(counts)))
    puzzle = ''.join('0' if i in empty else c for i, c in enumerate(grid))
    if puzzle in seen or (unique and len(solutions(puzzle)) != 1):
      continue
    seen.add(puzzle)
    puzzles.append(Puzzle(puzzle, grid))
    misses = 0
  return puzzles


def load_d1_csv(path) -> list[Puzzle]:
  """d1's Sudoku CSV: header `Puzzle,Solution`, then 16-character strings per row."""
  path = epath.Path(path)
  if not path.exists():
    raise MissingFileError(f'Sudoku CSV not found: {path}')
  rows = list(csv.reader(io.StringIO(path.read_text())))
  if not rows or [h.strip() for h in rows[0]] != ['Puzzle', 'Solution']:
    raise DataError(f'{path}:1: expected header "Puzzle,Solution"')
  puzzles = []
  for lineno, row in enumerate(rows[1:], start=2):
    if not row:
      continue
    if len(row) != 2 or not all(len(x) == SIZE and x.isascii() and x.isdigit() for x in row):
      raise DataError(f'{path}:{lineno}: expected two 16-digit strings, got {row!r}')
    puzzles.append(Puzzle(*row))
  return puzzles


_D1_INSTRUCTION = """
Please solve the following 4x4 Sudoku puzzle. The puzzle is provided as a 16-character string reading left-to-right, top-to-bottom, where '0' represents empty cells.

Rules:
- Fill empty cells with digits 1-4
- Each row must contain digits 1-4 exactly once
- Each column must contain digits 1-4 exactly once
- Each 2x2 box must contain digits 1-4 exactly once

Important: Your solution must be a COMPLETE 16-character string with only the digits 1-4, representing your final solved grid.

Respond in this exact format:
<reasoning>
Your step-by-step solving process
</reasoning>
<answer>
[16-character solution string with no spaces or separators]
</answer>
"""


def d1_prompt(puzzle: Puzzle | str) -> str:
  """d1's Sudoku prompt."""
  text = puzzle.puzzle if isinstance(puzzle, Puzzle) else puzzle
  return f'{_D1_INSTRUCTION}\n\nSolve the following Sudoku puzzle: {text}\n'


def compact_prompt(puzzle: Puzzle | str) -> str:
  """A few tokens for tiny models: '3102 2000 0210 0320 :' (rows separated by spaces)."""
  text = puzzle.puzzle if isinstance(puzzle, Puzzle) else puzzle
  return ' '.join(text[i:i + 4] for i in range(0, SIZE, 4)) + ' :'


def compact_solution(puzzle: Puzzle) -> str:
  """The SFT target completing `compact_prompt`."""
  return f'<answer>{puzzle.solution}</answer>'


def _answer_digits(completion: str) -> str | None:
  """The first 16 ASCII digits of the last `<answer>` block (anything else dropped), or None."""
  answer = last_answer(completion)
  if answer is None:
    return None
  return ''.join(itertools.islice((c for c in answer if '0' <= c <= '9'), SIZE))


def reward_strict(completion: str, puzzle: str, solution: str) -> float:
  """`reward` for callers that count bugs (`base.score`): the same value for every completion,
  but a malformed puzzle or solution raises instead of scoring 0.0."""
  if not (isinstance(puzzle, str) and isinstance(solution, str) and
          len(puzzle) == len(solution) == SIZE):
    raise ValueError(f'malformed problem: puzzle={puzzle!r:.40}, solution={solution!r:.40}')
  digits = _answer_digits(completion)
  empty = [i for i in range(SIZE) if puzzle[i] == '0']
  if not digits or not empty:
    return 0.0
  digits = digits.ljust(SIZE, '0')
  return sum(digits[i] == solution[i] for i in empty) / len(empty)


def reward(completion: str, puzzle: str, solution: str) -> float:
  """Fraction of the puzzle's empty cells that the last `<answer>` block fills correctly.

  The answer's ASCII digits (anything else is dropped) are padded with '0' / truncated to 16,
  as in d1. 0.0 without an answer block, for an empty one, or for a puzzle with no empty cells.
  Never raises (a malformed problem also scores 0.0).
  """
  try:
    return reward_strict(completion, puzzle, solution)
  except Exception:
    return 0.0


# ------------------------------------------------------------------------------------------------
# Task protocol


class SudokuTask:
  """4×4 Sudoku as a `base.Task`. task_cfg keys: the shared ones, `num_empty` (empty cells per
  puzzle: int or counts) and `test_grids` (solution grids held out when eval_file is '')."""
  name = 'sudoku'

  def problems(self, task_cfg, *, seed: int, data_dir) -> tuple[list[Puzzle], list[Puzzle]]:
    """Split by solution grid (SPEC §6.2). With an eval file, its puzzles are held out and training
    draws only from grids that solve none of them (a puzzle with several solutions rules out
    each); else `split_grids(seed=seed)` and `generate` from each side (train seed, test seed + 1).
    Generated in memory (milliseconds), so `data_dir` is unused."""
    del data_dir
    num_empty = task_cfg['num_empty']
    num_empty = num_empty if isinstance(num_empty, int) else tuple(num_empty)
    path = base.eval_path(task_cfg['eval_file'], D1_TEST_FILE)
    if path:
      held_out = load_d1_csv(path)
      taken = {p.solution for p in held_out}.union(*(solutions(p.puzzle) for p in held_out))
      train_grids = [g for g in solution_grids() if g not in taken]
    else:
      train_grids, test_grids = split_grids(seed=seed, num_test=task_cfg['test_grids'])
      held_out = generate(task_cfg['test_size'], seed=seed + 1, grids=test_grids,
                          num_empty=num_empty)
    train = generate(task_cfg['train_size'], seed=seed, grids=train_grids, num_empty=num_empty)
    return train, held_out

  def prompt(self, problem: Puzzle, style: str) -> str:
    base.check_style(style)
    return d1_prompt(problem) if style == 'd1' else compact_prompt(problem)

  def demonstration(self, problem: Puzzle) -> str:
    return compact_solution(problem)

  def reward(self, completion: str, problem: Puzzle) -> float:
    return reward_strict(completion, problem.puzzle, problem.solution)

  def answer(self, completion: str) -> str | None:
    """The digits `reward` scores (first 16 of the last answer block, unpadded), or None."""
    return _answer_digits(completion)
