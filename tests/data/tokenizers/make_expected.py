"""Writes expected.json: what Hugging Face `transformers` makes of the stand-in tokenizers in
tests/data/llada_tiny and tests/data/radd_tiny (built by make_tokenizers.py), for
tests/test_hf_tokenizer.py to compare dlm.hf_tokenizer.HFTokenizer against.

transformers is NOT a dlm dependency: run this in a throw-away virtual environment, e.g.

    python -m venv /tmp/tokref
    /tmp/tokref/bin/pip install transformers tokenizers==0.23.3 jinja2==3.1.6
    /tmp/tokref/bin/python tests/data/tokenizers/make_expected.py

Per tokenizer it records `tokenizer(text, add_special_tokens=False).input_ids` and
`tokenizer.decode(ids, skip_special_tokens=True)` for every text in TEXTS, and (LLaDA only)
`tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=...)` for every
conversation in CHATS, with LLaDA's own template and with ENV_TEMPLATE, a test template that
touches the rendering environment (trim/lstrip blocks, loop controls, namespace, dict, tojson,
raise_exception, the special-token variables, tools=None, reasoning aliases, {% generation %}).
"""
from __future__ import annotations

import json
import pathlib
import sys

import jinja2
import tokenizers
import transformers
from transformers import AutoTokenizer

HERE = pathlib.Path(__file__).resolve().parent
DATA = HERE.parent

D1_FORMAT = ('\nRespond in the following format:\n<reasoning>\n...\n</reasoning>\n'
             '<answer>\n...\n</answer>\n')


def d1_prompt(numbers: list[int], target: int) -> str:
  """A copy of dlm.tasks.countdown.d1_prompt (the test checks that they still agree)."""
  return (f'{D1_FORMAT}\nUsing only the numbers {numbers}, create an arithmetic expression that '
          f'evaluates to exactly {target}. You must use all numbers from the list, and '
          'each number must be used exactly once. You may use the operations +, -, *, and / as '
          'needed. After reasoning, provide only your final expression inside <answer></answer> '
          'tags without including an equals sign or the target number. For example, if the '
          'numbers are [2, 3, 4] and the target is 5, a valid answer is: '
          '<answer>\n2*4-3\n</answer>')


D1_NUMBERS, D1_TARGET = [3, 5, 7], 22

TEXTS = [
    '',
    'Hello world',
    'The cat walks to the house every day.',
    '  leading and trailing spaces  ',
    'tabs\tand\nnewlines\n\nand\r\nCRLF\n',
    'Digits: 0123456789 and 22 and 100 + 93 - 30 = 163',
    'Using the numbers [3, 5, 7], create an equation that equals 22.\n'
    '<answer>(7 - 3) * 5 + 2</answer>',
    '<reasoning>\n3*5 = 15, 15+7 = 22\n</reasoning>\n<answer>\n3*5+7\n</answer>',
    '(1+2)*3/4-5 < 6 > 7 == 8 != 9 <= 10 >= 11',
    'unicode: héllo wörld — naïve café, 日本語, Ελληνικά, emoji 🙂👍🏽',
    'zero width\u200bjoiner \u00a0nbsp',
    'symbols ~!@#$%^&*()_+`-={}|[]\\:";\'<>?,./',
    '<|endoftext|>',
    '<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>',
    'a<|eot_id|>b<|endoftext|>c',
    '<|mdm_mask|><|mdm_mask|> mask in text<|mdm_mask|>',
    '<|mdm_mask partial <|eot_id <|endoftext| not special',
    '[CLS] [gMASK] <role>x</role> <|number_start|>42<|number_end|>',
    'x' * 300,
    d1_prompt(D1_NUMBERS, D1_TARGET),
]

CHATS = [
    [{'role': 'user', 'content': 'What is 2 + 3?'}],
    [{'role': 'system', 'content': 'You are a helpful assistant.'},
     {'role': 'user', 'content': 'Name three colors.'}],
    [{'role': 'user', 'content': 'Hi!'},
     {'role': 'assistant', 'content': 'Hello! How can I help?'},
     {'role': 'user', 'content': 'Count to 5.'}],
    [{'role': 'user', 'content': '\n\n   padded with whitespace \t\n  '}],
    [{'role': 'user', 'content': 'unicode: héllo 日本語 🙂 and <answer>(7 - 3) * 5</answer>'}],
    [{'role': 'user', 'content': d1_prompt(D1_NUMBERS, D1_TARGET)}],
]

ENV_TEMPLATE = """\
{%- set ns = namespace(n=0) -%}
{%- for m in messages -%}
  {%- if m.role not in ['system', 'user', 'assistant'] -%}
    {{ raise_exception('unknown role: ' + m.role) }}
  {%- endif -%}
  {%- if m.role == 'system' %}{% continue %}{% endif -%}
  {%- set ns.n = ns.n + 1 %}
  [{{ ns.n }}] {{ m.role }}: {{ m.content | tojson }}
  {% if m.thinking is defined %}<think>{{ m.thinking }}|{{ m.reasoning_content }}</think>{% endif %}
  {{ m.extra is defined }}
  {% if m.content == 'STOP' %}{% break %}{% endif %}
{% endfor %}
{{ dict(a=1, b='<&>') | tojson }} {{ {'k': 'é'} | tojson(indent=2) }}
{{ messages | length }} {{ tools is none }} {{ documents is none }}
{% if add_generation_prompt %}
gen:{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ unk_token is defined }}
{% endif %}
{% generation %}assistant text{% endgeneration %}
"""

ENV_CHATS = [
    [{'role': 'system', 'content': 'skipped'},
     {'role': 'user', 'content': 'a < b & "c" — é', 'extra': None},
     {'role': 'assistant', 'content': 'ok', 'reasoning_content': 'because'},
     {'role': 'user', 'content': 'STOP'},
     {'role': 'user', 'content': 'never shown'}],
    [{'role': 'user', 'content': 'x', 'extra': 1}],
]
ENV_ERROR_CHAT = [{'role': 'tool', 'content': 'x'}]


def _tokenizer_record(tok) -> dict:
  rec = {'len': len(tok), 'texts': []}
  for text in TEXTS:
    ids = tok(text, add_special_tokens=False).input_ids
    rec['texts'].append({'text': text, 'ids': ids,
                         'decoded': tok.decode(ids, skip_special_tokens=True)})
  return rec


def main():
  out = {
      'versions': {'transformers': transformers.__version__, 'tokenizers': tokenizers.__version__,
                   'jinja2': jinja2.__version__, 'python': sys.version.split()[0]},
      'd1_problem': {'numbers': D1_NUMBERS, 'target': D1_TARGET},
  }
  llada = AutoTokenizer.from_pretrained(str(DATA / 'llada_tiny'))
  rec = _tokenizer_record(llada)
  rec['special'] = {'bos': llada.bos_token_id, 'eos': llada.eos_token_id,
                    'pad': llada.pad_token_id, 'mask': llada.convert_tokens_to_ids('<|mdm_mask|>'),
                    'all_special_ids': sorted(llada.all_special_ids)}
  rec['chats'] = [
      {'messages': chat, 'add_generation_prompt': agp,
       'rendered': llada.apply_chat_template(chat, tokenize=False, add_generation_prompt=agp)}
      for chat in CHATS for agp in (True, False)]
  rec['env_template'] = ENV_TEMPLATE
  rec['env_chats'] = [
      {'messages': chat, 'add_generation_prompt': agp,
       'rendered': llada.apply_chat_template(chat, chat_template=ENV_TEMPLATE, tokenize=False,
                                             add_generation_prompt=agp)}
      for chat in ENV_CHATS for agp in (True, False)]
  try:
    llada.apply_chat_template(ENV_ERROR_CHAT, chat_template=ENV_TEMPLATE, tokenize=False)
    raise SystemExit('expected raise_exception to raise')
  except jinja2.TemplateError as e:
    rec['env_error'] = {'messages': ENV_ERROR_CHAT, 'message': str(e)}
  out['llada_tiny'] = rec

  radd = AutoTokenizer.from_pretrained(str(DATA / 'radd_tiny'))
  rec = _tokenizer_record(radd)
  rec['special'] = {'bos': radd.bos_token_id, 'eos': radd.eos_token_id,
                    'pad': radd.pad_token_id, 'all_special_ids': sorted(radd.all_special_ids)}
  rec['chat_template'] = radd.chat_template
  out['radd_tiny'] = rec

  path = HERE / 'expected.json'
  path.write_text(json.dumps(out, indent=1, ensure_ascii=False) + '\n', encoding='utf-8')
  print(f'wrote {path} with transformers {transformers.__version__}')


if __name__ == '__main__':
  main()
