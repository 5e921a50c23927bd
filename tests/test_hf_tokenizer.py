"""dlm.hf_tokenizer.HFTokenizer against what `transformers` makes of the same files.

tests/data/tokenizers/expected.json was written by `transformers` (make_expected.py, run in a
separate environment); these tests never import it. The tokenizers are small stand-ins for
LLaDA-8B-Instruct's and GPT-2's (tests/data/tokenizers/README.md).
"""
import json
import pathlib
import pickle
import random
import shutil

import numpy as np
import pytest

from dlm.errors import ConfigError, DataError, MissingFileError
from dlm.hf_tokenizer import MAX_ID, HFTokenizer
from dlm.tasks import countdown
from dlm.tokenizer import MASK_TEXT

DATA = pathlib.Path(__file__).parent / 'data'
LLADA, RADD = DATA / 'llada_tiny', DATA / 'radd_tiny'
EXPECTED = json.loads((DATA / 'tokenizers' / 'expected.json').read_text(encoding='utf-8'))
LLADA_MASK = '<|mdm_mask|>'
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json',
                   'chat_template.jinja')


@pytest.fixture(scope='module')
def llada():
  return HFTokenizer.load(LLADA)


@pytest.fixture(scope='module')
def radd():
  return HFTokenizer.load(RADD)


def _tok(name, llada, radd):
  return {'llada_tiny': llada, 'radd_tiny': radd}[name]


def _cases(name):
  return [pytest.param(name, i, id=f'{name}-{i}') for i in range(len(EXPECTED[name]['texts']))]


@pytest.mark.parametrize('name,i', _cases('llada_tiny') + _cases('radd_tiny'))
def test_encode_decode_match_transformers(name, i, llada, radd):
  tok, case = _tok(name, llada, radd), EXPECTED[name]['texts'][i]
  ids = tok.encode(case['text'])
  assert ids == case['ids']
  if LLADA_MASK not in case['text'] or name == 'radd_tiny':
    # transformers' decode(skip_special_tokens=True); the mask differs on purpose (MASK_TEXT)
    assert tok.decode(ids) == case['decoded']
  if not any(i in tok.special_ids for i in ids):
    assert tok.decode(ids) == case['text']  # plain text round-trips exactly


def test_special_ids_llada(llada):
  want = EXPECTED['llada_tiny']['special']
  assert llada.vocab_size == EXPECTED['llada_tiny']['len'] == 413
  assert (llada.bos_id, llada.eos_id, llada.pad_id, llada.mask_id) == (384, 385, 385, 400)
  assert (llada.bos_id, llada.eos_id, llada.pad_id, llada.mask_id) == (
      want['bos'], want['eos'], want['pad'], want['mask'])
  assert set(want['all_special_ids']) <= llada.special_ids
  assert llada.special_ids == frozenset(range(384, 413))  # every added token of LLaDA is special
  for content, i in [('<|startoftext|>', 384), ('<|endoftext|>', 385), ('<|mdm_mask|>', 400),
                     ('<|start_header_id|>', 410), ('<|end_header_id|>', 411),
                     ('<|eot_id|>', 412)]:
    assert llada.encode(content) == [i]
  assert all(i < 384 for i in llada.encode('plain text 123 + (4 * 5)\n'))


def test_special_ids_radd(radd):
  want = EXPECTED['radd_tiny']['special']
  assert radd.vocab_size == EXPECTED['radd_tiny']['len'] == 320
  assert (radd.eos_id, radd.mask_id) == (319, 320)
  assert (radd.bos_id, radd.eos_id) == (want['bos'], want['eos'])
  assert want['pad'] is None and radd.pad_id == radd.eos_id  # GPT-2 has no pad: eos pads
  assert radd.special_ids == {319, 320}
  assert radd.chat_template is None and EXPECTED['radd_tiny']['chat_template'] is None


@pytest.mark.parametrize('i', range(len(EXPECTED['llada_tiny']['chats'])))
def test_chat_template_matches_transformers(llada, i):
  case = EXPECTED['llada_tiny']['chats'][i]
  got = llada.apply_chat_template(case['messages'],
                                  add_generation_prompt=case['add_generation_prompt'])
  assert got == case['rendered']


def test_chat_template_d1_countdown_prompt(llada):
  """The d1 Countdown prompt expected.json was made with is dlm's d1_prompt, and it renders and
  tokenizes as transformers does (how d1 builds its prompts)."""
  p = EXPECTED['d1_problem']
  prompt = countdown.d1_prompt(countdown.Problem(tuple(p['numbers']), p['target']))
  case = next(c for c in EXPECTED['llada_tiny']['chats']
              if c['messages'][0]['content'] == prompt and c['add_generation_prompt'])
  rendered = llada.apply_chat_template([{'role': 'user', 'content': prompt}])
  assert rendered == case['rendered']
  assert rendered.startswith('<|startoftext|><|start_header_id|>user<|end_header_id|>\n\n'
                             'Respond in the following format:')  # content | trim
  assert rendered.endswith('<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n')
  ids = llada.encode(rendered)
  tail = llada.encode('<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n')
  assert ids[:2] == [384, 410] and ids[-len(tail):] == tail and tail[:2] == [412, 410]
  text_case = next(t for t in EXPECTED['llada_tiny']['texts'] if t['text'] == prompt)
  assert llada.encode(prompt) == text_case['ids']


def _with_template(tmp_path, template):
  folder = tmp_path / 'tok'
  shutil.copytree(LLADA, folder)
  config = json.loads((folder / 'tokenizer_config.json').read_text(encoding='utf-8'))
  config['chat_template'] = template
  (folder / 'tokenizer_config.json').write_text(json.dumps(config), encoding='utf-8')
  return HFTokenizer.load(folder)


def test_template_environment_matches_transformers(tmp_path):
  """A test template using trim/lstrip blocks, loop controls, namespace, dict, tojson, the
  special-token variables, tools/documents, dropped None keys, reasoning aliases, generation."""
  rec = EXPECTED['llada_tiny']
  tok = _with_template(tmp_path, rec['env_template'])
  for case in rec['env_chats']:
    got = tok.apply_chat_template(case['messages'],
                                  add_generation_prompt=case['add_generation_prompt'])
    assert got == case['rendered']
  with pytest.raises(DataError, match=rec['env_error']['message']):
    tok.apply_chat_template(rec['env_error']['messages'])


def test_chat_template_from_jinja_file_overrides_config(tmp_path):
  folder = tmp_path / 'tok'
  shutil.copytree(LLADA, folder)
  (folder / 'chat_template.jinja').write_text('{{ messages[0].content }}!', encoding='utf-8')
  tok = HFTokenizer.load(folder)
  assert tok.apply_chat_template([{'role': 'user', 'content': 'hi'}]) == 'hi!'
  tok.save(tmp_path / 'saved')
  assert HFTokenizer.load(tmp_path / 'saved').chat_template == '{{ messages[0].content }}!'


def test_template_errors(tmp_path, llada, radd):
  with pytest.raises(ConfigError, match='no chat template'):
    radd.apply_chat_template([{'role': 'user', 'content': 'hi'}])
  with pytest.raises(DataError):
    llada.apply_chat_template([])
  with pytest.raises(DataError):
    llada.apply_chat_template(['not a dict'])
  with pytest.raises(ConfigError, match='does not compile'):
    _with_template(tmp_path, '{% for %}').apply_chat_template([{'role': 'user', 'content': 'x'}])


def test_template_sandbox(tmp_path):
  escape = "{{ messages.__class__.__mro__ }}"
  with pytest.raises(DataError):
    _with_template(tmp_path, escape).apply_chat_template([{'role': 'user', 'content': 'x'}])
  ns = "{% set ns = namespace(_x=1) %}{{ ns._x }}"
  with pytest.raises(DataError):
    _with_template(tmp_path / 'b', ns).apply_chat_template([{'role': 'user', 'content': 'x'}])


def test_decode_mask_specials_and_padding_rows(llada, radd):
  ids = llada.encode('ab')
  assert llada.decode([384, 410] + ids + [412, 385, 400, 400] + ids) == (
      f'ab{MASK_TEXT}{MASK_TEXT}ab')
  # ids past the tokenizer (the tiny model has 448 rows, LLaDA 126464) are padding rows: dropped
  assert llada.decode(ids + [413, 447, 448, 10**6, MAX_ID] + ids) == 'abab'
  assert llada.decode(np.array(ids + [400], dtype=np.int32)) == f'ab{MASK_TEXT}'
  assert radd.decode(radd.encode('hi') + [319, 320, 321]) == f'hi{MASK_TEXT}'
  assert llada.decode([]) == ''
  for bad in ([-1], [MAX_ID + 1]):
    with pytest.raises(ValueError):
      llada.decode(bad)


def test_decode_never_crashes_on_model_output(llada, radd):
  rng = random.Random(0)
  for tok, rows in ((llada, 448), (radd, 321)):
    for i in range(rows + 8):
      assert isinstance(tok.decode([i]), str)
    for _ in range(200):
      out = tok.decode([rng.randrange(rows + 8) for _ in range(rng.randint(0, 40))])
      assert isinstance(out, str)


def test_pickle_round_trip(llada, radd):
  for tok in (llada, radd):
    back = pickle.loads(pickle.dumps(tok))
    assert (back.vocab_size, back.eos_id, back.pad_id, back.bos_id, back.mask_id,
            back.special_ids, back.chat_template) == (
                tok.vocab_size, tok.eos_id, tok.pad_id, tok.bos_id, tok.mask_id,
                tok.special_ids, tok.chat_template)
    for case in EXPECTED['llada_tiny']['texts']:
      assert back.encode(case['text']) == tok.encode(case['text'])
  msgs = [{'role': 'user', 'content': 'hi'}]
  assert pickle.loads(pickle.dumps(llada)).apply_chat_template(msgs) == (
      llada.apply_chat_template(msgs))


@pytest.mark.parametrize('src', [LLADA, RADD], ids=['llada', 'radd'])
def test_save_load_round_trip(tmp_path, src):
  tok = HFTokenizer.load(src)
  tok.save(tmp_path / 'w')
  names = [n for n in TOKENIZER_FILES if (src / n).exists()]  # the folder holds a model too
  assert 'tokenizer_config.json' in names
  # the files come back byte-identical, and no temporaries are left behind
  assert sorted(p.name for p in (tmp_path / 'w').iterdir()) == sorted(names)
  for n in names:
    assert (tmp_path / 'w' / n).read_bytes() == (src / n).read_bytes()
  back = HFTokenizer.load(tmp_path / 'w')
  for case in EXPECTED['llada_tiny']['texts'] + EXPECTED['radd_tiny']['texts']:
    assert back.encode(case['text']) == tok.encode(case['text'])
  assert (back.eos_id, back.pad_id, back.bos_id, back.mask_id, back.chat_template) == (
      tok.eos_id, tok.pad_id, tok.bos_id, tok.mask_id, tok.chat_template)


def test_bare_tokenizer_json(tmp_path):
  """No tokenizer_config.json: eos (and pad) fall back to <|endoftext|>, no bos, no template;
  save writes a config naming them."""
  (tmp_path / 'a').mkdir()
  shutil.copy(RADD / 'tokenizer.json', tmp_path / 'a' / 'tokenizer.json')
  tok = HFTokenizer.load(tmp_path / 'a')
  assert (tok.eos_id, tok.pad_id, tok.bos_id, tok.mask_id) == (319, 319, None, 320)
  tok.save(tmp_path / 'b')
  config = json.loads((tmp_path / 'b' / 'tokenizer_config.json').read_text())
  assert config == {'eos_token': '<|endoftext|>', 'pad_token': '<|endoftext|>'}
  assert HFTokenizer.load(tmp_path / 'b').eos_id == 319


def test_special_tokens_map_and_dict_tokens(tmp_path):
  """Legacy folders: without added_tokens_decoder in the config, special_tokens_map.json names
  the tokens (dicts with "content" as in LLaDA's); config values may be dicts too."""
  folder = tmp_path / 'tok'
  shutil.copytree(LLADA, folder)
  config = json.loads((folder / 'tokenizer_config.json').read_text())
  del config['added_tokens_decoder']
  config['eos_token'] = config['pad_token'] = '<|eot_id|>'  # overridden by the map
  config['bos_token'] = {'__type': 'AddedToken', 'content': '<|startoftext|>'}
  (folder / 'tokenizer_config.json').write_text(json.dumps(config))
  tok = HFTokenizer.load(folder)
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (384, 385, 385)


def test_load_errors(tmp_path):
  with pytest.raises(MissingFileError):
    HFTokenizer.load(tmp_path)
  with pytest.raises(MissingFileError):
    HFTokenizer.load(tmp_path / 'nope')
  (tmp_path / 'tokenizer.json').write_text('{not json')
  with pytest.raises(DataError):
    HFTokenizer.load(tmp_path)
  shutil.copy(RADD / 'tokenizer.json', tmp_path / 'tokenizer.json')
  (tmp_path / 'tokenizer_config.json').write_text('[1, 2]')
  with pytest.raises(DataError):
    HFTokenizer.load(tmp_path)
  (tmp_path / 'tokenizer_config.json').write_text(json.dumps({'eos_token': '<|nope|>'}))
  with pytest.raises(DataError, match='eos_token'):
    HFTokenizer.load(tmp_path)
  (tmp_path / 'tokenizer_config.json').write_text(json.dumps(
      {'added_tokens_decoder': {'5': {'content': '<|endoftext|>', 'special': True}}}))
  with pytest.raises(DataError, match='id 5'):
    HFTokenizer.load(tmp_path)


def test_config_adds_missing_added_tokens(tmp_path):
  """An added token only tokenizer_config.json lists is added at its id, as transformers does."""
  shutil.copy(RADD / 'tokenizer.json', tmp_path / 'tokenizer.json')
  (tmp_path / 'tokenizer_config.json').write_text(json.dumps({'added_tokens_decoder': {
      '320': {'content': '<|mdm_mask|>', 'special': True, 'normalized': False}}}))
  tok = HFTokenizer.load(tmp_path)
  assert (tok.vocab_size, tok.mask_id, tok.eos_id) == (321, 320, 319)
  assert tok.encode('a<|mdm_mask|>') == tok.encode('a') + [320]
