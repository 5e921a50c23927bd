"""Countdown (SPEC §6.1): problems, an exhaustive solver, a generator, prompts and the `Task`.

Plain Python on the host; no JAX (tfds only inside `CountdownTask.problems`). The reward lives in
`countdown_reward` (never executes model output) and is re-exported here, so `countdown.reward`
stays the DESIGN §3 contract.

Choices (where SPEC leaves room):
  * Solver and generator use positive-integer intermediates (every sub-expression is an integer
    ≥ 1). All 256 d1 test problems are solvable that way; `solve(..., positive_integers=False)`
    searches over all rationals instead.
  * The reward accepts any parseable expression (see `countdown_reward` for its rules and limits).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import random
from collections.abc import Iterable, Iterator, Sequence
from fractions import Fraction

from etils import epath

from dlm.errors import ConfigError, DataError, MissingFileError
from dlm.tasks import base
from dlm.tasks.countdown_reward import evaluate, extract_answer, last_answer, reward, score_answer
from dlm.tasks.countdown_reward import reward_strict

__all__ = ['Problem', 'solve', 'generate', 'd1_prompt', 'compact_prompt', 'chain_solutions',
           'compact_solution', 'load_d1_test', 'CountdownTask', 'D1_TEST_FILE',
           # re-exported from countdown_reward (public contract)
           'reward', 'last_answer', 'extract_answer', 'evaluate', 'score_answer']

D1_TEST_FILE = 'countdown_cd3_test.jsonl'  # in dlm/tasks/data: `task.eval_file='d1'`
_OPEN, _CLOSE = '<answer>', '</answer>'
_MAX_MISSES = 20_000


@dataclasses.dataclass(frozen=True)
class Problem:
  numbers: tuple[int, ...]
  target: int

  @property
  def key(self) -> tuple[tuple[int, ...], int]:
    """Identity for dedup and train/test disjointness: the order of the numbers does not matter."""
    return tuple(sorted(self.numbers)), self.target


# ------------------------------------------------------------------------------------------------
# Solver

_ATOM, _MUL, _ADD = 3, 2, 1  # precedence of an expression's top operator


def _join(a, op: str, b, prec: int) -> str:
  """`a op b` with only the parentheses the grammar needs (so the string parses to the tree)."""
  left = a[1] if a[2] >= prec else f'({a[1]})'
  right_bare = b[2] > prec or (b[2] == prec and op in '+*')
  right = b[1] if right_bare else f'({b[1]})'
  return f'{left}{op}{right}'


def _combine(a, b, positive_integers: bool):
  """All (value, text, precedence) obtainable from a and b with one operation."""
  (x, _, _), (y, _, _) = a, b
  yield x + y, _join(a, '+', b, _ADD), _ADD
  yield x * y, _join(a, '*', b, _MUL), _MUL
  for (p, q), (u, v) in (((x, y), (a, b)), ((y, x), (b, a))):
    if not positive_integers or p > q:
      yield p - q, _join(u, '-', v, _ADD), _ADD
    if q != 0 and (not positive_integers or p % q == 0):
      yield p / q, _join(u, '/', v, _MUL), _MUL


def _search(items: list, target: Fraction, positive_integers: bool) -> str | None:
  if len(items) == 1:
    return items[0][1] if items[0][0] == target else None
  for i in range(len(items)):
    for j in range(i + 1, len(items)):
      rest = items[:i] + items[i + 1:j] + items[j + 1:]
      for item in _combine(items[i], items[j], positive_integers):
        found = _search(rest + [item], target, positive_integers)
        if found is not None:
          return found
  return None


def solve(numbers: Sequence[int], target: int, *, positive_integers: bool = True) -> str | None:
  """An expression using every number exactly once that equals `target`, or None.

  Exhaustive over + − × ÷ and every bracketing, with exact arithmetic. With
  `positive_integers` (the default, and the Countdown rule the d1 test set satisfies) every
  intermediate result must be an integer ≥ 1. The returned string scores 1.0 under `reward`.
  Cost grows steeply with the count: an unsolvable case takes ~5 ms with 4 numbers, ~0.2 s with
  5, ~20 s with 6.
  """
  if not numbers:
    return None
  items = [(Fraction(int(n)), str(int(n)), _ATOM) for n in numbers]
  if positive_integers and any(x <= 0 for x, _, _ in items):
    return None
  return _search(items, Fraction(target), positive_integers)


# ------------------------------------------------------------------------------------------------
# Generator


def _random_tree_value(numbers: list[int], rng: random.Random) -> int:
  """Value of a random expression tree over `numbers` with positive-integer intermediates."""
  pool = list(numbers)
  while len(pool) > 1:
    a = pool.pop(rng.randrange(len(pool)))
    b = pool.pop(rng.randrange(len(pool)))
    hi, lo = max(a, b), min(a, b)
    options = [a + b, a * b]
    if hi != lo:
      options.append(hi - lo)
    if hi % lo == 0:
      options.append(hi // lo)
    pool.append(rng.choice(options))
  return pool[0]


def generate(n: int, *, seed: int, num_numbers: int | Sequence[int] = (3,), low: int = 1,
             high: int = 100, exclude: Iterable[Problem] = ()) -> list[Problem]:
  """`n` distinct solvable problems, deterministic for `seed`.

  Each problem draws its count from `num_numbers`, its numbers uniformly from [low, high], and its
  target as the value of a random expression tree (exact division, positive intermediates); the
  target must lie in [low, high]. Problems are verified by `solve`, deduplicated by `Problem.key`
  and disjoint from `exclude`, so `train = generate(..., exclude=test)` is disjoint by construction.
  """
  counts = (num_numbers,) if isinstance(num_numbers, int) else tuple(num_numbers)
  if not counts or any(not 1 <= k <= 6 for k in counts):
    raise ConfigError(f'num_numbers must be counts in [1, 6], got {num_numbers!r}')
  if not 1 <= low <= high:
    raise ConfigError(f'need 1 <= low <= high, got low={low}, high={high}')
  if n < 0:
    raise ValueError(f'n must be >= 0, got {n}')
  rng = random.Random(seed)
  seen = {p.key for p in exclude}
  problems: list[Problem] = []
  misses = 0  # consecutive draws without a new problem: the settings admit no more
  while len(problems) < n:
    misses += 1
    if misses > _MAX_MISSES:
      raise ConfigError(f'found only {len(problems)} of {n} distinct problems with '
                       f'num_numbers={counts}, range [{low}, {high}]; widen the range')
    numbers = [rng.randint(low, high) for _ in range(rng.choice(counts))]
    target = _random_tree_value(numbers, rng)
    problem = Problem(tuple(numbers), target)
    if not low <= target <= high or problem.key in seen or solve(numbers, target) is None:
      continue
    seen.add(problem.key)
    problems.append(problem)
    misses = 0
  return problems


# ------------------------------------------------------------------------------------------------
# Prompts

D1_FORMAT = ('\nRespond in the following format:\n<reasoning>\n...\n</reasoning>\n'
             '<answer>\n...\n</answer>\n')


def d1_prompt(problem: Problem) -> str:
  """d1's Countdown training prompt (format instruction, task text, d1's worked example)."""
  numbers = list(problem.numbers)
  return (f'{D1_FORMAT}\nUsing only the numbers {numbers}, create an arithmetic expression that '
          f'evaluates to exactly {problem.target}. You must use all numbers from the list, and '
          'each number must be used exactly once. You may use the operations +, -, *, and / as '
          'needed. After reasoning, provide only your final expression inside <answer></answer> '
          'tags without including an equals sign or the target number. For example, if the '
          'numbers are [2, 3, 4] and the target is 5, a valid answer is: '
          '<answer>\n2*4-3\n</answer>')


def compact_prompt(problem: Problem) -> str:
  """A few tokens for tiny models: '30 100 93 -> 23 :'."""
  return f"{' '.join(map(str, problem.numbers))} -> {problem.target} :"


_CHAIN_OPS = ('+', '-', '*', '/')


def chain_solutions(numbers: Sequence[int], target: int) -> Iterator[str]:
  """Every left-to-right chain ((a o b) o c) … equal to target with positive-integer
  intermediates, lazily and without repeats, in the order: operator sequences + − × ÷ first,
  then `itertools.permutations` orders of the numbers. Chains are the shape a small model learns
  most easily; most small problems have several ('a+b-c', 'b+a-c', …)."""
  k, seen = len(numbers), set()
  for ops in itertools.product(_CHAIN_OPS, repeat=k - 1):
    for perm in itertools.permutations(numbers):
      value, text, prev = perm[0], str(perm[0]), None
      for op, n in zip(ops, perm[1:]):
        if op == '/':  # integers only: exact division or no chain
          if value % n:
            break
          value //= n
        else:
          value = value + n if op == '+' else value - n if op == '-' else value * n
        if value <= 0:
          break
        if op in '*/' and prev in ('+', '-'):
          text = f'({text})'
        text, prev = f'{text}{op}{n}', op
      else:
        if value == target and text not in seen:
          seen.add(text)
          yield text


@functools.lru_cache(maxsize=None)  # start-up asks twice per problem: tokenizer texts, SFT targets
def compact_solution(problem: Problem) -> str:
  """The SFT target completing `compact_prompt`: a real solution in answer tags — the first
  chain that works (see `chain_solutions`; one consistent shape), else the solver's expression."""
  expr = (next(chain_solutions(problem.numbers, problem.target), None) or
          solve(problem.numbers, problem.target))
  if expr is None:
    raise ValueError(f'no solution with positive-integer intermediates: {problem}')
  return f'{_OPEN}{expr}{_CLOSE}'


# ------------------------------------------------------------------------------------------------
# d1 test file


def load_d1_test(path) -> list[Problem]:
  """d1's Countdown test file: one `{"input": "30,100,93", "output": "23"}` per line."""
  path = epath.Path(path)
  if not path.exists():
    raise MissingFileError(f'Countdown test file not found: {path}')
  problems = []
  for lineno, line in enumerate(path.read_text().splitlines(), start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      numbers = tuple(int(x) for x in str(record['input']).split(','))
      target = int(record['output'])
    except (ValueError, KeyError, TypeError) as e:
      raise DataError(f'{path}:{lineno}: expected {{"input": "a,b,c", "output": "T"}}, '
                       f'got {line[:200]!r} ({e})') from None
    problems.append(Problem(numbers, target))
  return problems


# ------------------------------------------------------------------------------------------------
# Task protocol


class CountdownTask:
  """Countdown as a `base.Task`. task_cfg keys: the shared ones and `num_numbers` (int or counts),
  `low`, `high` (numbers and targets lie in [low, high])."""
  name = 'countdown'

  def problems(self, task_cfg, *, seed: int, data_dir) -> tuple[list[Problem], list[Problem]]:
    """Training problems from the tfds source under `data_dir` (train_seed=seed,
    test_seed=seed + 1), disjoint from the held-out ones: the eval file's if one is set, else
    the source's generated test split."""
    from dlm.tasks import countdown_tfds  # tfds only here, so the reward path never imports it
    path = base.eval_path(task_cfg['eval_file'], D1_TEST_FILE)
    held_out = load_d1_test(path) if path else None
    counts = task_cfg['num_numbers']
    settings = dict(train_size=task_cfg['train_size'], test_size=task_cfg['test_size'],
                    train_seed=seed, test_seed=seed + 1, low=task_cfg['low'],
                    high=task_cfg['high'],
                    num_numbers=counts if isinstance(counts, int) else tuple(counts))

    def read(split, exclude):
      source = countdown_tfds.data_source(data_dir, split, exclude=exclude, **settings)
      return [countdown_tfds.problem(source[i]) for i in range(len(source))]

    train = read('train', held_out or ())
    return train, held_out if held_out is not None else read('test', ())

  def prompt(self, problem: Problem, style: str) -> str:
    base.check_style(style)
    return d1_prompt(problem) if style == 'd1' else compact_prompt(problem)

  def demonstration(self, problem: Problem) -> str:
    return compact_solution(problem)

  def reward(self, completion: str, problem: Problem) -> float:
    return reward_strict(completion, problem.numbers, problem.target)

  def answer(self, completion: str) -> str | None:
    return extract_answer(completion)
