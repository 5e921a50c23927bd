"""The Countdown reward (SPEC §6.1): answer extraction and a safe exact evaluator.

Plain Python on the host; no JAX, no tfds. The reward is a pure function of text and never executes
model output: answers are tokenized over a fixed ASCII alphabet and evaluated by a small
depth-limited recursive-descent parser over `fractions.Fraction`, so a hostile completion costs
bounded time and memory and always yields 0.0, 0.1 or 1.0.

Rules (where SPEC leaves room):
  * Any parseable expression is evaluated exactly (intermediates may be fractions or negative), as
    d1 does with real division; only the *final* value is compared to the target (within 1e-5).
  * No unary minus or plus, no leading zeros ("05"), no decimal point, no `**` or `//`, ASCII
    digits and white space only.
  * Limits: answer ≤ 1 000 characters, parenthesis depth ≤ 64, ≤ 32 numbers, ≤ 12 digits each.

Two entry points: `reward` (the public DESIGN §3 contract) catches everything; `reward_strict`
scores the same but lets an exception other than an expected rejection propagate, so
`dlm.tasks.base.score` can count bugs instead of silently training on them.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from fractions import Fraction

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


def score_answer_strict(answer: str | None, numbers: Sequence[int], target: int) -> float:
  """`score_answer` without the catch-all: an expected rejection (`_Invalid`) is 0.1, but any
  other exception (a malformed problem, a bug here) propagates so the caller can count it."""
  if answer is None:
    return 0.0
  try:
    tokens = _tokenize(answer)
    used = [t for t in tokens if isinstance(t, int)]
    # The multiset check comes first, so only the problem's own numbers are ever multiplied.
    if len(used) > MAX_NUMBERS or Counter(used) != Counter(int(n) for n in numbers):
      return 0.1
    value = _Parser(tokens).parse()
  except _Invalid:
    return 0.1
  return 1.0 if abs(value - Fraction(target)) < _TOLERANCE else 0.1


def reward_strict(completion: str, numbers: Sequence[int], target: int) -> float:
  """`reward` for callers that count bugs (`dlm.tasks.base.score`): the same values for every
  completion, but an unexpected exception propagates instead of becoming a reward."""
  return score_answer_strict(last_answer(completion), numbers, target)


def score_answer(answer: str | None, numbers: Sequence[int], target: int) -> float:
  """0.0 for no answer; 1.0 if `answer` uses exactly `numbers` and equals `target`; else 0.1.
  Never raises: an unexpected exception scores 0.1 like any rejected answer."""
  try:
    return score_answer_strict(answer, numbers, target)
  except Exception:
    return 0.1


def reward(completion: str, numbers: Sequence[int], target: int) -> float:
  """SPEC §6.1 / DESIGN §3: 0.0 without an `<answer>` block, 1.0 if its last one is a correct
  expression, 0.1 otherwise. Never raises, never executes the completion."""
  try:
    answer = last_answer(completion)
  except Exception:
    return 0.0
  return score_answer(answer, numbers, target)
