"""Countdown: the safe reward against hostile answers, the solver on d1's test set, the generator
and its tfds data source."""
import json
import time
from fractions import Fraction

import pytest

from dlm.tasks import countdown as cd
from dlm.tasks import countdown_reward
from dlm.tasks import data_file

D1_TEST = data_file('countdown_cd3_test.jsonl')  # packaged copy of d1's test set
NUMS, TARGET = (30, 100, 93), 23  # 93-(100-30) = 23


def r(answer, numbers=NUMS, target=TARGET):
  return cd.reward(f'<reasoning>think</reasoning><answer>{answer}</answer>', numbers, target)


@pytest.mark.parametrize('answer, expected', [
    ('93-(100-30)', 1.0),
    ('93 - (100 - 30)', 1.0),
    ('\n 93\t-(\n100-30 ) \r\n', 1.0),  # whitespace variants
    ('(93-(100-30))', 1.0),
    ('30+93-100', 1.0),
    ('30+100-93', 0.1),  # wrong value
    ('93-(100-3)', 0.1),  # a different number
    ('93-100', 0.1),  # a number missing
    ('93-(100-30)+30-30', 0.1),  # repeated numbers
    ('93-(100-30)*1', 0.1),  # an extra number
    ('93-(100-30)/(30-30)', 0.1),  # extra numbers and division by zero
    ('', 0.1),  # empty answer
    ('   ', 0.1),
    ('93-(100-30', 0.1),  # unbalanced
    ('93-(100-30))', 0.1),
    ('93 100 30', 0.1),  # no operators
    ('-30+93-(100-130)', 0.1),  # unary minus (and wrong numbers)
    ('93+-(100-30)+0', 0.1),
    ('+30+93-100', 0.1),  # unary plus
    ('93-(100-30.0)', 0.1),  # decimal point
    ('93-(100-030)', 0.1),  # leading zero
    ('93-(100-３0)', 0.1),  # fullwidth digit
    ('93-(100-٣0)', 0.1),  # Arabic-Indic digit
    ('93-(100-30)=23', 0.1),  # equals sign
    ('93−(100−30)', 0.1),  # unicode minus
    ('93-(100-30)\u00a0', 0.1),  # non-ASCII space
    ('30**1+93-100', 0.1),
    ('93-(100//1-30)', 0.1),
    ('__import__("os")', 0.1),
])
def test_reward_cases(answer, expected):
  assert r(answer) == expected
  completion = f'<answer>{answer}</answer>'
  assert countdown_reward.reward_strict(completion, NUMS, TARGET) == expected


def test_reward_multi_digit_numbers_are_single_numbers():
  assert cd.reward('<answer>12+3</answer>', (1, 2, 3), 15) == 0.1  # "12" is not "1","2"
  assert cd.reward('<answer>1*2+3</answer>', (1, 2, 3), 5) == 1.0
  assert cd.reward('<answer>12+3</answer>', (12, 3), 15) == 1.0


def test_reward_division_is_exact_real_division():
  assert cd.reward('<answer>(1+2)/4*8</answer>', (1, 2, 4, 8), 6) == 1.0  # 3/4 intermediate
  assert cd.reward('<answer>7/2+1</answer>', (7, 2, 1), 4) == 0.1  # 4.5, not floor division
  assert cd.reward('<answer>5/(3-3)</answer>', (5, 3, 3), 1) == 0.1


def test_reward_tags():
  assert cd.reward('93-(100-30)', NUMS, TARGET) == 0.0  # no tag
  assert cd.reward('<answer>93-(100-30)', NUMS, TARGET) == 0.0  # never closed
  assert cd.reward('<answer></answer>', NUMS, TARGET) == 0.1
  last_wins = '<answer>93-(100-30)</answer> no: <answer>30+100-93</answer>'
  assert cd.reward(last_wins, NUMS, TARGET) == 0.1
  last_wins = '<answer>30+100-93</answer> no: <answer>93-(100-30)</answer> trailing text'
  assert cd.reward(last_wins, NUMS, TARGET) == 1.0
  # An unclosed later tag does not hide the last complete block.
  assert cd.reward('<answer>93-(100-30)</answer><answer>1', NUMS, TARGET) == 1.0
  assert cd.reward(None, NUMS, TARGET) == 0.0
  assert cd.reward(b'<answer>93-(100-30)</answer>', NUMS, TARGET) == 0.0


def test_reward_huge_inputs_are_bounded_and_never_raise():
  start = time.perf_counter()
  big = 'x' * 1_000_000 + '<answer>' * 1000 + '</answer' * 1000
  assert cd.reward(big + '<answer>93-(100-30)</answer>', NUMS, TARGET) == 1.0
  assert cd.reward('<answer>' + '1+' * 500_000 + '1</answer>', NUMS, TARGET) == 0.1
  assert cd.reward('<answer>' * 200_000 + '</answer>' * 100_000, NUMS, TARGET) == 0.1
  assert cd.reward('<answer>' + '(' * 10_000 + '23' + ')' * 10_000 + '</answer>', (23,), 23) == 0.1
  assert cd.reward('<answer>' + '(' * 10_000 + '</answer>', NUMS, TARGET) == 0.1
  deep = '(' * 100 + '93-(100-30)' + ')' * 100  # within the length limit, past the depth limit
  assert r(deep) == 0.1
  assert r('(' * 60 + '93-(100-30)' + ')' * 60) == 1.0
  nines = '9' * 400
  assert cd.reward(f'<answer>{nines}*{nines}</answer>', (int(nines),) * 2, 1) == 0.1
  assert cd.reward(f'<answer>{"9" * 12}*{"9" * 12}</answer>', (10**12 - 1,) * 2,
                   (10**12 - 1)**2) == 1.0
  assert time.perf_counter() - start < 1.0


def test_reward_catch_all():
  assert cd.reward('<answer>1+2</answer>', ('x', 2), 3) == 0.1  # bad problem: still no exception
  assert cd.reward('<answer>1+2</answer>', (1, 2), object()) == 0.1
  assert cd.score_answer('1+2', (1, 2), object()) == 0.1
  # The strict scorer lets such bugs through (for `base.score` to count), but still scores
  # every hostile completion.
  with pytest.raises(ValueError):
    countdown_reward.reward_strict('<answer>1+2</answer>', ('x', 2), 3)
  with pytest.raises(TypeError):
    countdown_reward.reward_strict('<answer>1+2</answer>', (1, 2), object())
  for completion in (None, b'<answer>1+2</answer>', '<answer>' + '(' * 10_000 + '</answer>'):
    assert countdown_reward.reward_strict(completion, (1, 2), 3) in (0.0, 0.1)


def test_extract_answer_precedence():
  assert cd.extract_answer('a <answer> 1+2 </answer> \\boxed{3+4}') == '1+2'
  assert cd.extract_answer('<answer>\n\\boxed{1+2}\n</answer>') == '1+2'
  assert cd.extract_answer('so \\boxed{1+2} or \\boxed{(3+4)*{5}}') == '(3+4)*{5}'
  assert cd.extract_answer('\\boxed{1+2') is None
  assert cd.extract_answer('nothing') is None
  assert cd.score_answer(cd.extract_answer('\\boxed{93-(100-30)}'), NUMS, TARGET) == 1.0
  assert cd.evaluate('7/2+1') == Fraction(9, 2)
  assert cd.evaluate('-1') is None


def test_load_d1_test_and_solve_all():
  problems = cd.load_d1_test(D1_TEST)
  assert len(problems) == 256
  assert problems[0] == cd.Problem((30, 100, 93), 23)
  assert all(len(p.numbers) == 3 for p in problems)
  assert all(1 <= x <= 100 for p in problems for x in p.numbers + (p.target,))
  for p in problems:
    expr = cd.solve(p.numbers, p.target)
    assert expr is not None, p
    assert cd.reward(f'<answer>{expr}</answer>', p.numbers, p.target) == 1.0, (p, expr)
    assert cd.reward(cd.compact_solution(p), p.numbers, p.target) == 1.0


def test_solve_unsolvable_and_modes():
  assert cd.solve((1, 1, 1), 100) is None
  assert cd.solve((1, 1, 1), 100, positive_integers=False) is None
  assert cd.solve((), 0) is None
  # The classic 24 puzzles that need fractional intermediates.
  for numbers in ((3, 3, 8, 8), (1, 5, 5, 5)):
    assert cd.solve(numbers, 24) is None
    expr = cd.solve(numbers, 24, positive_integers=False)
    assert expr is not None and cd.reward(f'<answer>{expr}</answer>', numbers, 24) == 1.0


def test_load_d1_test_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='nope.jsonl'):
    cd.load_d1_test(tmp_path / 'nope.jsonl')
  bad = tmp_path / 'bad.jsonl'
  good = json.dumps({'input': '1,2,3', 'output': '6'})
  bad.write_text(good + '\n{"input": "1,x", "output": 3}\n')
  with pytest.raises(ValueError, match=':2:'):
    cd.load_d1_test(bad)
  bad.write_text('{"input": "1,2"}\n')
  with pytest.raises(ValueError, match=':1:'):
    cd.load_d1_test(bad)


def test_generate_fast_deterministic_valid():
  start = time.perf_counter()
  problems = cd.generate(10_000, seed=0)
  assert time.perf_counter() - start < 5.0
  assert problems == cd.generate(10_000, seed=0)
  assert problems[:100] != cd.generate(100, seed=1)
  assert len({p.key for p in problems}) == 10_000
  assert all(len(p.numbers) == 3 for p in problems)
  assert all(1 <= x <= 100 for p in problems for x in p.numbers + (p.target,))
  assert all(cd.solve(p.numbers, p.target) is not None for p in problems[:2000])


def test_generate_options_and_disjointness():
  mixed = cd.generate(300, seed=1, num_numbers=(3, 4))
  assert {len(p.numbers) for p in mixed} == {3, 4}
  # A small range, so that independent draws do collide and the exclusion has work to do.
  test = cd.generate(200, seed=1, high=12)
  train = cd.generate(1000, seed=0, high=12, exclude=test)
  assert not {p.key for p in train} & {p.key for p in test}
  assert {p.key for p in cd.generate(1000, seed=0, high=12)} & {p.key for p in test}
  small = cd.generate(80, seed=3, num_numbers=2, low=5, high=20)
  assert all(5 <= x <= 20 for p in small for x in p.numbers + (p.target,))
  assert all(cd.solve(p.numbers, p.target) for p in small)
  with pytest.raises(ValueError, match='distinct'):
    cd.generate(1000, seed=0, num_numbers=2, low=1, high=3)
  with pytest.raises(ValueError):
    cd.generate(1, seed=0, low=0)


def test_prompts():
  p = cd.Problem((30, 100, 93), 23)
  prompt = cd.d1_prompt(p)
  assert prompt.index('<reasoning>') < prompt.index('</reasoning>') < prompt.index('<answer>')
  assert ('Using only the numbers [30, 100, 93], create an arithmetic expression that evaluates '
          'to exactly 23. You must use all numbers from the list, and each number must be used '
          'exactly once. You may use the operations +, -, *, and / as needed. After reasoning, '
          'provide only your final expression inside <answer></answer> tags without including an '
          'equals sign or the target number.') in prompt
  assert cd.compact_prompt(p) == '30 100 93 -> 23 :'
  assert cd.reward(cd.compact_solution(p), p.numbers, p.target) == 1.0
  with pytest.raises(ValueError):
    cd.compact_solution(cd.Problem((1, 1, 1), 100))


def test_chain_solutions_are_every_correct_left_to_right_chain():
  p = cd.Problem((16, 1, 13), 3)
  chains = list(cd.chain_solutions(p.numbers, p.target))
  # By hand: (16−13)·1, (16−13)/1, 16·1−13, 1·16−13, 16/1−13; nothing else with two ops.
  assert sorted(chains) == sorted(['(16-13)*1', '(16-13)/1', '16*1-13', '1*16-13', '16/1-13'])
  assert cd.compact_solution(p) == f'<answer>{chains[0]}</answer>'
  for q in cd.generate(50, seed=3, num_numbers=(3, 4), high=20):
    for c in cd.chain_solutions(q.numbers, q.target):
      assert cd.reward(f'<answer>{c}</answer>', q.numbers, q.target) == 1.0, (q, c)


def test_tfds_source_matches_generate(tmp_path):
  from dlm.tasks import countdown_tfds
  settings = dict(train_size=200, test_size=40, num_numbers=(3, 4), exclude=cd.generate(5, seed=7))
  test = cd.generate(40, seed=1, num_numbers=(3, 4), exclude=settings['exclude'])
  train = cd.generate(200, seed=0, num_numbers=(3, 4), exclude=test + settings['exclude'])
  for split, expected in (('train', train), ('test', test)):
    source = countdown_tfds.data_source(tmp_path, split, **settings)
    assert [countdown_tfds.problem(source[i]) for i in range(len(source))] == expected
  # Different settings get a different config, not the stale files.
  other = countdown_tfds.data_source(tmp_path, 'test', **{**settings, 'test_size': 10})
  assert len(other) == 10
