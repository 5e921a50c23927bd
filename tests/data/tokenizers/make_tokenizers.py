"""Builds the two stand-in Hugging Face tokenizers the tests use (deterministic; run from anywhere):

  tests/data/llada_tiny/  a LLaDA-8B-Instruct look-alike: byte-level BPE with 384 ordinary tokens
                          (ids 0..383, digits split one per token), then LLaDA's special tokens in
                          LLaDA's order (ids 384..412, `<|mdm_mask|>` = 400), and LLaDA's
                          tokenizer_config.json / special_tokens_map.json with the real chat template.
  tests/data/radd_tiny/   a GPT-2 look-alike (RADD's tokenizer): byte-level BPE with 319 ordinary
                          tokens and `<|endoftext|>` = 319 last, 320 tokens in all.

Needs only the `tokenizers` library (the version setup.py pins). See README.md beside this file.

    python tests/data/tokenizers/make_tokenizers.py
"""
from __future__ import annotations

import json
import pathlib
import random

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

DATA = pathlib.Path(__file__).resolve().parent.parent
LLADA_DIR, RADD_DIR = DATA / 'llada_tiny', DATA / 'radd_tiny'

LLADA_ORDINARY = 384  # ordinary (BPE) tokens: ids 0..383
LLADA_MASK_ID = 400
RADD_ORDINARY = 319   # GPT-2 has 50256 ordinary tokens, then <|endoftext|> = 50256
SEED = 20240601

# LLaDA-8B-Instruct's chat template, verbatim from its tokenizer_config.json (GSAI-ML, MIT license;
# copy in GitHub repo yinj66/support_basis, folder `LLaDA-8B-Instruct-B&S-light/`, commit fa6c180).
LLADA_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim "
    "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}")


def llada_special_tokens() -> list[str]:
  """LLaDA's added tokens in id order, shrunk: the real ones sit at 126080..126348 with 252
  reserved tokens before the mask (126336) and 3 after; here 12 before (mask = 384 + 16 = 400)."""
  reserved = [f'<|reserved_token_{k}|>' for k in range(16)]
  reserved[LLADA_MASK_ID - LLADA_ORDINARY - 4] = '<|mdm_mask|>'  # as 126336 replaces reserved_252
  return (['<|startoftext|>', '<|endoftext|>', '[CLS]', '[gMASK]'] + reserved +
          ['<role>', '</role>', '<|arithmetic_start|>', '<|arithmetic_end|>', '<|number_start|>',
           '<|number_end|>', '<|start_header_id|>', '<|end_header_id|>', '<|eot_id|>'])


LLADA_ADDITIONAL = ['<role>', '</role>', '<|arithmetic_start|>', '<|arithmetic_end|>',
                    '<|number_start|>', '<|number_end|>']

_SUBJECTS = ['The cat', 'A small dog', 'My friend', 'The teacher', 'Our team', 'The model',
             'Every student', 'The old man', 'She', 'He', 'They', 'We', 'The river', 'This city']
_VERBS = ['walks to', 'looks at', 'writes about', 'thinks of', 'runs past', 'talks with',
          'reads about', 'waits for', 'works on', 'plays with', 'learns from', 'builds']
_OBJECTS = ['the house', 'a new book', 'the big tree', 'the number', 'an answer', 'the problem',
            'the market', 'a long road', 'the garden', 'our school', 'the green field', 'the sea']
_ENDINGS = ['.', ' today.', ' every day.', ' in the morning.', ' after lunch.', '?', '!',
            ' and then goes home.', ', because it is important.', ' with great care.']
_QUESTIONS = ['What is the capital of France?', 'Please explain how a rainbow forms.',
              'Write a short poem about the sea.', 'How many days are in a week?',
              'Can you help me with my homework?', 'Tell me a story about a brave knight.',
              'Why is the sky blue?', 'Give three reasons to learn math.']


def _expression(rng: random.Random, numbers: list[int]) -> tuple[str, int]:
  """A random expression over `numbers` (each once) and its integer value (// for /)."""
  text, value = str(numbers[0]), numbers[0]
  for n in numbers[1:]:
    op = rng.choice('+-*')
    if op in '*' and rng.random() < 0.5:
      text = f'({text})'
    text = f'{text} {op} {n}'
    value = {'+': value + n, '-': value - n, '*': value * n}[op]
  return text, value


def corpus(n: int = 3000, seed: int = SEED) -> list[str]:
  """English-ish sentences, Countdown-style arithmetic and chat-shaped text (no special tokens)."""
  rng = random.Random(seed)
  out = []
  for i in range(n):
    kind = i % 4
    if kind == 0:
      out.append(' '.join(f'{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} '
                          f'{rng.choice(_OBJECTS)}{rng.choice(_ENDINGS)}'
                          for _ in range(rng.randint(1, 3))))
    elif kind == 1:
      numbers = [rng.randint(1, 99) for _ in range(rng.randint(3, 4))]
      expr, target = _expression(rng, numbers)
      out.append(f'Using the numbers {numbers}, create an equation that equals {target}. '
                 'You can use basic arithmetic operations (+, -, *, /) and each number can only '
                 'be used once.\n<reasoning>\nLet me try: '
                 f'{expr} = {target}\n</reasoning>\n<answer>{expr}</answer>')
    elif kind == 2:
      a, b = rng.randint(0, 999), rng.randint(1, 99)
      out.append(f'{a} + {b} = {a + b}\n{a} - {b} = {a - b}\n({a} * {b}) / {b} = {a}\n'
                 f'{a} < {a + b} and {a + b} > {b}')
    else:
      out.append(f'user\n\n{rng.choice(_QUESTIONS)}\n\nassistant\n\n'
                 f'{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}.\n')
  return out


def _byte_level_bpe(n_ordinary: int, split_digits: bool) -> Tokenizer:
  tok = Tokenizer(models.BPE())
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                byte_level]) if split_digits else byte_level)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=n_ordinary, min_frequency=2, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                special_tokens=[])
  tok.train_from_iterator(corpus(), trainer=trainer)
  if tok.get_vocab_size() != n_ordinary:
    raise SystemExit(f'BPE stopped at {tok.get_vocab_size()} tokens, wanted {n_ordinary}')
  return tok


def _add_special(tok: Tokenizer, contents: list[str]) -> None:
  first = tok.get_vocab_size()
  tok.add_special_tokens([AddedToken(c, special=True, normalized=False, lstrip=False,
                                     rstrip=False, single_word=False) for c in contents])
  for k, c in enumerate(contents):
    assert tok.token_to_id(c) == first + k, (c, tok.token_to_id(c))


def _added_decoder(tok: Tokenizer, contents: list[str]) -> dict:
  return {str(tok.token_to_id(c)): {'content': c, 'lstrip': False, 'normalized': False,
                                    'rstrip': False, 'single_word': False, 'special': True}
          for c in contents}


def _write(path: pathlib.Path, text: str) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text, encoding='utf-8')
  print(f'wrote {path.relative_to(DATA.parent.parent)} ({len(text)} chars)')


def _token_dict(content: str) -> dict:  # special_tokens_map.json's shape in LLaDA's repo
  return {'content': content, 'lstrip': False, 'normalized': False, 'rstrip': False,
          'single_word': False}


def build_llada() -> Tokenizer:
  tok = _byte_level_bpe(LLADA_ORDINARY, split_digits=True)
  specials = llada_special_tokens()
  _add_special(tok, specials)
  assert tok.token_to_id('<|mdm_mask|>') == LLADA_MASK_ID
  config = {  # LLaDA-8B-Instruct's tokenizer_config.json, keys and values as there
      'add_bos_token': False,
      'add_eos_token': False,
      'added_tokens_decoder': _added_decoder(tok, specials),
      'additional_special_tokens': LLADA_ADDITIONAL,
      'bos_token': '<|startoftext|>',
      'chat_template': LLADA_CHAT_TEMPLATE,
      'clean_up_tokenization_spaces': False,
      'cls_token': '[CLS]',
      'eos_token': '<|endoftext|>',
      'fast_tokenizer': True,
      'gmask_token': '[gMASK]',
      'merges_file': None,
      'model_input_names': ['input_ids', 'attention_mask'],
      'model_max_length': 1000000000000000019884624838656,
      'pad_token': '<|endoftext|>',
      'tokenizer_class': 'PreTrainedTokenizerFast',
      'vocab_file': None,
  }
  special_map = {
      'additional_special_tokens': LLADA_ADDITIONAL,
      'bos_token': _token_dict('<|startoftext|>'),
      'cls_token': _token_dict('[CLS]'),
      'eos_token': _token_dict('<|endoftext|>'),
      'pad_token': _token_dict('<|endoftext|>'),
  }
  _write(LLADA_DIR / 'tokenizer.json', tok.to_str(pretty=True) + '\n')
  _write(LLADA_DIR / 'tokenizer_config.json', json.dumps(config, indent=2, ensure_ascii=False) + '\n')
  _write(LLADA_DIR / 'special_tokens_map.json', json.dumps(special_map, indent=2) + '\n')
  return tok


def build_radd() -> Tokenizer:
  tok = _byte_level_bpe(RADD_ORDINARY, split_digits=False)
  _add_special(tok, ['<|endoftext|>'])
  config = {  # GPT-2's: <|endoftext|> is bos, eos and unk; no pad, no chat template
      'add_prefix_space': False,
      'added_tokens_decoder': _added_decoder(tok, ['<|endoftext|>']),
      'bos_token': '<|endoftext|>',
      'clean_up_tokenization_spaces': False,
      'eos_token': '<|endoftext|>',
      'model_max_length': 1024,
      'tokenizer_class': 'PreTrainedTokenizerFast',
      'unk_token': '<|endoftext|>',
  }
  _write(RADD_DIR / 'tokenizer.json', tok.to_str(pretty=True) + '\n')
  _write(RADD_DIR / 'tokenizer_config.json', json.dumps(config, indent=2) + '\n')
  return tok


if __name__ == '__main__':
  llada, radd = build_llada(), build_radd()
  print(f'llada_tiny: {llada.get_vocab_size()} tokens; radd_tiny: {radd.get_vocab_size()} tokens')
