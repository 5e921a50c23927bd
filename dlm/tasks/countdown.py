"""Countdown (SPEC §6.1): problems, an exhaustive solver, a generator, prompts and a safe reward.

Plain Python on the host; no JAX. The reward is a pure function of text and never executes model
output: answers are tokenized over a fixed ASCII alphabet and evaluated by a small depth-limited
recursive-descent parser over `fractions.Fraction`, so a hostile completion costs bounded time and
memory and always yields 0.0, 0.1 or 1.0.

Choices (where SPEC leaves room):
  * Solver and generator use positive-integer intermediates (every sub-expression is an integer
    ≥ 1). All 256 d1 test problems are solvable that way; `solve(..., positive_integers=False)`
    searches over all rationals instead.
  * The reward evaluates any parseable expression exactly (intermediates may be fractions or
    negative), as d1 does with real division; only the *final* value is compared to the target.
  * No unary minus or plus, no leading zeros ("05"), no decimal point, no `**` or `//`.
  * Limits: answer ≤ 1 000 characters, parenthesis depth ≤ 64, ≤ 32 numbers, ≤ 12 digits each.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import random
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from fractions import Fraction

from etils import epath

MAX_ANSWER_CHARS = 1000
MAX_DEPTH = 64
MAX_NUMBERS = 32
MAX_DIGITS = 12

_OPEN, _CLOSE = '<answer>', '</answer>'
_BOXED = '\\boxed{'
_DIGITS = frozenset('0123456789')
_ASCII_SPACE = ' \t\n\r\f\v'
_SPACE = frozenset(_ASCII_SPACE)
_TOLERANCE = Fraction(1, 100_000)
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
# Answer extraction


def last_answer(completion: str) -> str | None:
  """Stripped content of the last complete `<answer>…</answer>`, or None.

  The last `<answer>` that is followed by a `</answer>`, up to the first `</answer>` after it
  (d1's `re.findall(r'<answer>(.*?)</answer>')[-1]` except for nested opening tags). Uses only
  `str.rfind`/`find`, so it is linear in the completion's length.
  """
  if not isinstance(completion, str):
    return None
  close = completion.rfind(_CLOSE)
  if close < 0:
    return None
  start = completion.rfind(_OPEN, 0, close)
  if start < 0:
    return None
  start += len(_OPEN)
  return completion[start:completion.find(_CLOSE, start)].strip(_ASCII_SPACE)


def _last_boxed(text: str) -> str | None:
  """Content of the last `\\boxed{…}` with balanced braces, or None."""
  start = text.rfind(_BOXED)
  if start < 0:
    return None
  depth, i = 1, start + len(_BOXED)
  for j in range(i, len(text)):
    depth += {'{': 1, '}': -1}.get(text[j], 0)
    if depth == 0:
      return text[i:j].strip(_ASCII_SPACE)
  return None


def extract_answer(completion: str) -> str | None:
  """The expression a completion proposes, for evaluation parsing.

  Precedence: the last `<answer>` block (what `reward` scores); if that block holds a `\\boxed{…}`
  (d1's evaluation prompts ask for `<answer>\\boxed{…}</answer>`), its content; with no complete
  answer block, the last `\\boxed{…}` anywhere. None if there is neither.
  """
  if not isinstance(completion, str):
    return None
  answer = last_answer(completion)
  if answer is not None:
    boxed = _last_boxed(answer)
    return answer if boxed is None else boxed
  return _last_boxed(completion)


# ------------------------------------------------------------------------------------------------
# Safe evaluation


class _Invalid(Exception):
  """The answer is present but is not an acceptable expression: reward 0.1."""


def _tokenize(expr: str) -> list:
  """ints and one-character operator strings; raises _Invalid outside the allowed alphabet."""
  if len(expr) > MAX_ANSWER_CHARS or '**' in expr or '//' in expr:
    raise _Invalid
  tokens, i, n = [], 0, len(expr)
  while i < n:
    c = expr[i]
    if c in _DIGITS:
      j = i
      while j < n and expr[j] in _DIGITS:
        j += 1
      if j - i > MAX_DIGITS or (c == '0' and j - i > 1):
        raise _Invalid
      tokens.append(int(expr[i:j]))
      i = j
    elif c in '+-*/()':
      tokens.append(c)
      i += 1
    elif c in _SPACE:
      i += 1
    else:
      raise _Invalid
  return tokens


class _Parser:
  """expr := term (('+'|'-') term)* ; term := factor (('*'|'/') factor)* ; factor := INT | (expr).

  Recursion only happens at '(' and is cut at MAX_DEPTH, so Python's stack is never at risk.
  """

  def __init__(self, tokens: list):
    self.tokens, self.i = tokens, 0

  def peek(self):
    return self.tokens[self.i] if self.i < len(self.tokens) else None

  def parse(self) -> Fraction:
    value = self.expr(0)
    if self.i != len(self.tokens):
      raise _Invalid
    return value

  def expr(self, depth: int) -> Fraction:
    value = self.term(depth)
    while self.peek() in ('+', '-'):
      op = self.tokens[self.i]
      self.i += 1
      rhs = self.term(depth)
      value = value + rhs if op == '+' else value - rhs
    return value

  def term(self, depth: int) -> Fraction:
    value = self.factor(depth)
    while self.peek() in ('*', '/'):
      op = self.tokens[self.i]
      self.i += 1
      rhs = self.factor(depth)
      if op == '*':
        value *= rhs
      elif rhs == 0:
        raise _Invalid
      else:
        value /= rhs
    return value

  def factor(self, depth: int) -> Fraction:
    token = self.peek()
    if isinstance(token, int):
      self.i += 1
      return Fraction(token)
    if token != '(' or depth >= MAX_DEPTH:
      raise _Invalid  # includes unary minus/plus, a missing operand and too deep nesting
    self.i += 1
    value = self.expr(depth + 1)
    if self.peek() != ')':
      raise _Invalid
    self.i += 1
    return value


def evaluate(expr: str) -> Fraction | None:
  """Exact value of an answer expression under the reward's rules, or None if it is rejected."""
  try:
    return _Parser(_tokenize(expr)).parse()
  except _Invalid:
    return None


def score_answer(answer: str | None, numbers: Sequence[int], target: int) -> float:
  """0.0 for no answer; 1.0 if `answer` uses exactly `numbers` and equals `target`; else 0.1."""
  if answer is None:
    return 0.0
  try:
    tokens = _tokenize(answer)
    used = [t for t in tokens if isinstance(t, int)]
    # The multiset check comes first, so only the problem's own numbers are ever multiplied.
    if len(used) > MAX_NUMBERS or Counter(used) != Counter(int(n) for n in numbers):
      return 0.1
    value = _Parser(tokens).parse()
    return 1.0 if abs(value - Fraction(target)) < _TOLERANCE else 0.1
  except Exception:  # _Invalid by design; anything else would be a bug, still never raise
    return 0.1


def reward(completion: str, numbers: Sequence[int], target: int) -> float:
  """SPEC §6.1 / DESIGN §3: 0.0 without an `<answer>` block, 1.0 if its last one is a correct
  expression, 0.1 otherwise. Never raises, never executes the completion."""
  try:
    answer = last_answer(completion)
  except Exception:
    return 0.0
  return score_answer(answer, numbers, target)


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
    raise ValueError(f'num_numbers must be counts in [1, 6], got {num_numbers!r}')
  if not 1 <= low <= high:
    raise ValueError(f'need 1 <= low <= high, got low={low}, high={high}')
  if n < 0:
    raise ValueError(f'n must be >= 0, got {n}')
  rng = random.Random(seed)
  seen = {p.key for p in exclude}
  problems: list[Problem] = []
  misses = 0  # consecutive draws without a new problem: the settings admit no more
  while len(problems) < n:
    misses += 1
    if misses > _MAX_MISSES:
      raise ValueError(f'found only {len(problems)} of {n} distinct problems with '
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
      value, text, prev = Fraction(perm[0]), str(perm[0]), None
      for op, n in zip(ops, perm[1:]):
        value = {'+': value + n, '-': value - n, '*': value * n, '/': value / n}[op]
        if value <= 0 or value.denominator != 1:
          break
        if op in '*/' and prev in ('+', '-'):
          text = f'({text})'
        text, prev = f'{text}{op}{n}', op
      else:
        if value == target and text not in seen:
          seen.add(text)
          yield text


def compact_solution(problem: Problem) -> str:
  """The SFT target completing `compact_prompt`: a real solution in answer tags — the first
  chain that works (see `chain_solutions`; one consistent shape), else the solver's expression."""
  expr = (next(chain_solutions(problem.numbers, problem.target), None) or
          solve(problem.numbers, problem.target))
  if expr is None:
    raise ValueError(f'no solution with positive-integer intermediates: {problem}')
  return f'{_OPEN}{expr}{_CLOSE}'


def lazy_answer(problem: Problem) -> str:
  """What a lazy demonstrator writes: every number added in prompt order. Well formed and uses
  the right numbers (reward 0.1), but correct only when the sum happens to be the target."""
  return f"{_OPEN}{'+'.join(map(str, problem.numbers))}{_CLOSE}"


# ------------------------------------------------------------------------------------------------
# d1 test file


def load_d1_test(path) -> list[Problem]:
  """d1's Countdown test file: one `{"input": "30,100,93", "output": "23"}` per line."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f'Countdown test file not found: {path}')
  problems = []
  for lineno, line in enumerate(path.read_text().splitlines(), start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      numbers = tuple(int(x) for x in str(record['input']).split(','))
      target = int(record['output'])
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f'{path}:{lineno}: expected {{"input": "a,b,c", "output": "T"}}, '
                       f'got {line[:200]!r} ({e})') from None
    problems.append(Problem(numbers, target))
  return problems
