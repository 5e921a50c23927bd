"""A Hugging Face `tokenizer.json` (LLaDA, RADD's GPT-2) behind dlm's tokenizer contract.

The same interface as `dlm.tokenizer.Tokenizer` (vocab_size, pad_id, eos_id, mask_id, encode,
decode, save, load, picklable) plus `bos_id`, `special_ids`, `chat_template` and
`apply_chat_template`, without `transformers` or torch: the `tokenizers` library runs the
tokenizer and `jinja2` renders the chat template in the environment `transformers` gives it.

Files of a tokenizer folder (as `transformers`' `save_pretrained` writes them):
  tokenizer.json           required: the tokenizers pipeline, vocabulary and added tokens
  tokenizer_config.json    optional: bos/eos/pad/unk/… token names (strings or {"content": …}),
                           `added_tokens_decoder`, `chat_template` (a string, or a list of
                           {"name", "template"} from which "default" is used)
  special_tokens_map.json  optional, legacy: read only when tokenizer_config.json has no
                           `added_tokens_decoder`, and then its token names override the config's
                           (transformers 5's rule)
  chat_template.jinja      optional: overrides the config's chat_template (transformers' rule)

Special ids:
  eos_id    the config's `eos_token`, else `<|endoftext|>` (GPT-2's eos, LLaDA's too).
  pad_id    the config's `pad_token`, else eos_id (GPT-2 has no pad token).
  bos_id    the config's `bos_token`, else None.
  mask_id   the id of `<|mdm_mask|>` where the tokenizer has it (LLaDA: 126336); else
            `vocab_size`, one past the real vocabulary (RADD's GPT-2 convention: 50257), so
            such a model has vocab_size + 1 embedding rows.
  special_ids  the ids of the tokenizer's special added tokens, the named special tokens
            (bos/eos/pad/unk/…, additional_special_tokens) and mask_id.

Decoding model output (untrusted; any int id list in bounds decodes without error):
  * ids in [0, vocab_size) decode as `tokenizer.decode(ids, skip_special_tokens=True)` does,
    except that pad_id is always dropped;
  * mask_id shows as `dlm.tokenizer.MASK_TEXT` (samples mid-denoising);
  * ids in [vocab_size, MAX_ID] other than mask_id are embedding padding rows (LLaDA's
    126464-row table past its 126349-token tokenizer; the tiny stand-in's 448 rows past 413)
    and decode to '' (dropped, like pad);
  * ids < 0 or > MAX_ID (2**31 - 1, the int32 limit) raise ValueError.
"""
from __future__ import annotations

import datetime
import json
import operator
from collections.abc import Mapping, Sequence
from typing import Any

from etils import epath
import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment
import tokenizers

from dlm import storage
from dlm.errors import ConfigError, DataError, MissingFileError
from dlm.tokenizer import MASK_TEXT

TOKENIZER_FILE = 'tokenizer.json'
CONFIG_FILE = 'tokenizer_config.json'
SPECIAL_TOKENS_MAP_FILE = 'special_tokens_map.json'
CHAT_TEMPLATE_FILE = 'chat_template.jinja'

MASK_TOKEN = '<|mdm_mask|>'
DEFAULT_EOS = '<|endoftext|>'
MAX_ID = 2**31 - 1  # largest id decode accepts (int32): anything a model's argmax can produce
# The named special tokens transformers passes to chat templates (its SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = ('bos_token', 'eos_token', 'unk_token', 'sep_token', 'pad_token',
                       'cls_token', 'mask_token')
# Names a message's reasoning goes by; transformers copies it to `reasoning_content` and
# `thinking` before rendering, so templates reading either see it.
_REASONING_FIELDS = ('reasoning_content', 'thinking', 'reasoning')


class HFTokenizer:
  """A `tokenizer.json` plus its config. Picklable (carries the files' text)."""

  def __init__(self, tokenizer_json: str, config_json: str | None = None,
               special_tokens_map_json: str | None = None,
               chat_template_jinja: str | None = None):
    self._files = {TOKENIZER_FILE: tokenizer_json, CONFIG_FILE: config_json,
                   SPECIAL_TOKENS_MAP_FILE: special_tokens_map_json,
                   CHAT_TEMPLATE_FILE: chat_template_jinja}
    try:
      self._tok = tokenizers.Tokenizer.from_str(tokenizer_json)
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
      raise DataError(f'unreadable {TOKENIZER_FILE}: {e}') from e
    # dlm pads and truncates itself; transformers switches these off too.
    self._tok.no_truncation()
    self._tok.no_padding()
    config = _parse_json(config_json, CONFIG_FILE) if config_json is not None else {}
    special_map = (_parse_json(special_tokens_map_json, SPECIAL_TOKENS_MAP_FILE)
                   if special_tokens_map_json is not None else {})
    self._add_missing_tokens(config.get('added_tokens_decoder') or {})

    names = dict(config)
    if 'added_tokens_decoder' not in config:
      names.update(special_map)
    self._special_tokens = {}  # name -> content, for the chat template's variables
    for name in SPECIAL_TOKEN_NAMES:
      content = _token_content(names.get(name))
      if content is not None:
        self._special_tokens[name] = content

    vocab = self._tok.get_vocab(with_added_tokens=True)
    self.vocab_size = max(self._tok.get_vocab_size(with_added_tokens=True),
                          max(vocab.values(), default=-1) + 1)
    if self.vocab_size == 0:
      raise DataError(f'{TOKENIZER_FILE} has an empty vocabulary')
    eos = self._special_tokens.get('eos_token', DEFAULT_EOS)
    self.eos_id = self._id_of(eos, 'eos_token')
    self.pad_id = (self._id_of(self._special_tokens['pad_token'], 'pad_token')
                   if 'pad_token' in self._special_tokens else self.eos_id)
    self.bos_id = (self._id_of(self._special_tokens['bos_token'], 'bos_token')
                   if 'bos_token' in self._special_tokens else None)
    mask = self._tok.token_to_id(MASK_TOKEN)
    self.mask_id = self.vocab_size if mask is None else mask

    special = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
    named = list(self._special_tokens.values()) + [
        c for c in map(_token_content, names.get('additional_special_tokens') or [])
        if c is not None]
    special.update(i for i in map(self._tok.token_to_id, named) if i is not None)
    special.update(i for i in (self.eos_id, self.pad_id, self.bos_id, self.mask_id)
                   if i is not None)
    self.special_ids = frozenset(special)

    self.chat_template = _pick_template(
        chat_template_jinja if chat_template_jinja is not None else config.get('chat_template'))
    self._compiled = None  # the jinja2 Template, compiled on first use (not pickled)

  # ----------------------------------------------------------------------------------------------
  # Files

  @classmethod
  def load(cls, folder) -> HFTokenizer:
    """Reads a tokenizer folder (see the module docstring for its files)."""
    folder = epath.Path(folder)
    path = folder / TOKENIZER_FILE
    if not path.exists():
      raise MissingFileError(f'{TOKENIZER_FILE} not found in {folder}')
    texts = {}
    for name in (TOKENIZER_FILE, CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE, CHAT_TEMPLATE_FILE):
      p = folder / name
      if name != TOKENIZER_FILE and not p.exists():
        texts[name] = None
        continue
      try:
        texts[name] = p.read_text(encoding='utf-8')
      except (OSError, UnicodeDecodeError) as e:
        raise DataError(f'cannot read {p}: {e}') from e
    return cls(texts[TOKENIZER_FILE], texts[CONFIG_FILE], texts[SPECIAL_TOKENS_MAP_FILE],
               texts[CHAT_TEMPLATE_FILE])

  def save(self, workdir) -> None:
    """Writes the files it was loaded from into `workdir`, each atomically (`storage.write_atomic`).

    tokenizer.json is byte-identical to the loaded one; tokenizer_config.json too, or, if none was
    loaded, one naming the special tokens resolved at load; special_tokens_map.json and
    chat_template.jinja only if they were loaded."""
    folder = epath.Path(workdir)
    folder.mkdir(parents=True, exist_ok=True)
    files = dict(self._files)
    if files[CONFIG_FILE] is None:
      config = {'eos_token': self._tok.id_to_token(self.eos_id),
                'pad_token': self._tok.id_to_token(self.pad_id)}
      if self.bos_id is not None:
        config['bos_token'] = self._tok.id_to_token(self.bos_id)
      files[CONFIG_FILE] = json.dumps(config, indent=2, ensure_ascii=False) + '\n'
    for name, text in files.items():
      if text is None:
        continue
      storage.write_atomic(folder / name, text)

  def __getstate__(self):
    return dict(self._files)

  def __setstate__(self, state):
    self.__init__(state[TOKENIZER_FILE], state[CONFIG_FILE], state[SPECIAL_TOKENS_MAP_FILE],
                  state[CHAT_TEMPLATE_FILE])

  def __repr__(self):
    return (f'HFTokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id}, '
            f'pad_id={self.pad_id}, bos_id={self.bos_id}, mask_id={self.mask_id})')

  # ----------------------------------------------------------------------------------------------
  # Text

  def encode(self, text: str) -> list[int]:
    """`transformers`' `tokenizer(text, add_special_tokens=False).input_ids`: no bos/eos added;
    special-token strings in `text` (a rendered chat template) become their ids."""
    if not isinstance(text, str):
      raise TypeError(f'encode takes a str, got {type(text).__name__}')
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids` (see the module docstring): special tokens and padding rows dropped, the mask
    id shown as MASK_TEXT. Raises ValueError only for ids < 0 or > MAX_ID."""
    parts, run = [], []
    for i in ids:
      i = operator.index(i)  # ints and numpy integers; a float is a TypeError
      if not 0 <= i <= MAX_ID:
        raise ValueError(f'token id {i} outside [0, {MAX_ID}]')
      if i == self.mask_id:
        if run:
          parts.append(self._tok.decode(run, skip_special_tokens=True))
          run = []
        parts.append(MASK_TEXT)
      elif i < self.vocab_size and i != self.pad_id:
        run.append(i)
    if run:
      parts.append(self._tok.decode(run, skip_special_tokens=True))
    return ''.join(parts)

  # ----------------------------------------------------------------------------------------------
  # Chat template

  def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                          add_generation_prompt: bool = True) -> str:
    """The rendered conversation, as `transformers`' `tokenizer.apply_chat_template(messages,
    tokenize=False, add_generation_prompt=...)` renders it (encode it with `encode`).

    Raises ConfigError if the tokenizer has no chat template (or it does not compile), DataError
    if the messages are malformed or the template rejects them (its `raise_exception`)."""
    if self.chat_template is None:
      raise ConfigError('this tokenizer has no chat template (tokenizer_config.json has no '
                        '"chat_template", and there is no chat_template.jinja)')
    if self._compiled is None:
      self._compiled = _compile(self.chat_template)
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
      raise DataError(f'messages must be a list of dicts, got {type(messages).__name__}')
    if not messages:
      raise DataError('cannot apply a chat template to an empty conversation')
    chat = []
    for m in messages:
      if not isinstance(m, Mapping):
        raise DataError(f'chat messages must be dicts, got {m!r}')
      # transformers drops None-valued keys (APIs send content=None) and aliases reasoning fields
      m = {k: _plain(v) for k, v in m.items() if v is not None}
      reasoning = next((m[k] for k in _REASONING_FIELDS if k in m), None)
      if reasoning is not None:
        m = {'thinking': reasoning, **m, 'reasoning_content': reasoning}
      chat.append(m)
    try:
      return self._compiled.render(messages=chat, tools=None, documents=None,
                                   add_generation_prompt=bool(add_generation_prompt),
                                   **self._special_tokens)
    except jinja2.TemplateError as e:
      raise DataError(f'the chat template rejected the messages: {e}') from e

  # ----------------------------------------------------------------------------------------------

  def _id_of(self, content: str, name: str) -> int:
    i = self._tok.token_to_id(content)
    if i is None:
      raise DataError(f'{name} {content!r} is not in {TOKENIZER_FILE}')
    return i

  def _add_missing_tokens(self, added_tokens_decoder: Mapping) -> None:
    """Adds `tokenizer_config.json`'s added tokens that tokenizer.json lacks, as transformers
    does; each must land on the id the config gives it."""
    if not isinstance(added_tokens_decoder, Mapping):
      raise DataError(f'{CONFIG_FILE}: added_tokens_decoder must be an object')
    items = []
    for key, tok in added_tokens_decoder.items():
      content = _token_content(tok)
      try:
        idx = int(key)
      except ValueError:
        idx = None
      if idx is None or content is None:
        raise DataError(f'{CONFIG_FILE}: bad added_tokens_decoder entry {key!r}: {tok!r}')
      items.append((idx, content, tok if isinstance(tok, Mapping) else {}))
    for idx, content, tok in sorted(items):
      have = self._tok.token_to_id(content)
      if have is None:
        kwargs = {k: bool(tok[k]) for k in ('single_word', 'lstrip', 'rstrip', 'normalized')
                  if k in tok}
        special = bool(tok.get('special', False))
        added = tokenizers.AddedToken(content, special=special, **kwargs)
        if special:
          self._tok.add_special_tokens([added])
        else:
          self._tok.add_tokens([added])
        have = self._tok.token_to_id(content)
      if have != idx:
        raise DataError(f'{CONFIG_FILE} puts {content!r} at id {idx}, but {TOKENIZER_FILE} '
                        f'gives it id {have}')


def _parse_json(text: str, name: str) -> dict:
  try:
    value = json.loads(text)
  except ValueError as e:
    raise DataError(f'unreadable {name}: {e}') from e
  if not isinstance(value, dict):
    raise DataError(f'{name} must hold a JSON object, got {type(value).__name__}')
  return value


def _token_content(value) -> str | None:
  """A token as tokenizer_config.json / special_tokens_map.json write it: a string, or an
  AddedToken dict {"content": …, …} (optionally with "__type": "AddedToken")."""
  if isinstance(value, str):
    return value
  if isinstance(value, Mapping) and isinstance(value.get('content'), str):
    return value['content']
  return None


def _pick_template(value) -> str | None:
  """The config's chat_template: a string, or transformers' list of named templates, of which
  the one named "default" (the one apply_chat_template uses when no tools are given)."""
  if value is None or isinstance(value, str):
    return value or None
  if isinstance(value, list):
    named = {t.get('name'): t.get('template') for t in value if isinstance(t, Mapping)}
    if isinstance(named.get('default'), str):
      return named['default']
    raise ConfigError(f'{CONFIG_FILE} has named chat templates {sorted(map(str, named))} but none '
                      'called "default"')
  raise ConfigError(f'{CONFIG_FILE}: chat_template must be a string, got {type(value).__name__}')


def _plain(value):
  """The message data a template may see, rebuilt from plain JSON types (as transformers does:
  an object's methods could escape the sandbox); anything else becomes '<TypeName>'."""
  if value is None or type(value) in (str, int, float, bool):
    return value
  if isinstance(value, str):
    return str.__str__(value)
  if isinstance(value, int):
    return int.__int__(value)
  if isinstance(value, float):
    return float.__float__(value)
  if isinstance(value, Mapping):
    return {_plain(k): _plain(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_plain(v) for v in value]
  if isinstance(value, tuple):
    return tuple(_plain(v) for v in value)
  if hasattr(value, 'item') and callable(value.item) and getattr(value, 'shape', None) == ():
    return _plain(value.item())  # numpy scalars
  return f'<{type(value).__name__}>'


# ------------------------------------------------------------------------------------------------
# The template environment: what transformers' chat_template_utils sets up (jinja2 >= 3.1.6
# sandbox, trim_blocks, lstrip_blocks, loop controls, its `tojson`, `raise_exception`,
# `strftime_now`, a `dict` constructor and a `namespace` without underscore attributes).


class _GenerationTag(jinja2.ext.Extension):
  """`{% generation %}…{% endgeneration %}` (templates that mark assistant tokens): renders its
  body unchanged (transformers only records the span, for an assistant-token mask)."""
  tags = {'generation'}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(('name:endgeneration',), drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method('_render'), [], [], body).set_lineno(lineno)

  def _render(self, caller):
    return caller()


def _raise_exception(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  # jinja2's own tojson HTML-escapes <, >, & and '; transformers' does not.
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def _strftime_now(fmt):
  return datetime.datetime.now().strftime(fmt)


class _TemplateDict:
  """`dict(...)` in templates, without exposing the dict type itself."""

  def __call__(self, *args, **kwargs):
    return dict(*args, **kwargs)

  def fromkeys(self, *args, **kwargs):
    return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
  """jinja2's `namespace`, refusing underscore-prefixed attributes (CPython internals)."""

  def __init__(*args, **kwargs):  # pylint: disable=no-method-argument
    self, args = args[0], args[1:]
    attrs = dict(*args, **kwargs)
    for name in attrs:
      _TemplateNamespace._check(name)
    jinja2.utils.Namespace.__init__(self, attrs)

  def __setitem__(self, name, value):
    _TemplateNamespace._check(name)
    jinja2.utils.Namespace.__setitem__(self, name, value)

  @staticmethod
  def _check(name):
    if isinstance(name, str) and name.startswith('_'):
      raise jinja2.exceptions.SecurityError(
          f'chat templates cannot set underscore-prefixed namespace attributes ({name!r})')


def _compile(template: str) -> jinja2.Template:
  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[_GenerationTag, jinja2.ext.loopcontrols])
  env.filters['tojson'] = _tojson
  env.globals['raise_exception'] = _raise_exception
  env.globals['strftime_now'] = _strftime_now
  env.globals['dict'] = _TemplateDict()
  env.globals['namespace'] = _TemplateNamespace
  try:
    return env.from_string(template)
  except jinja2.TemplateError as e:
    raise ConfigError(f'the chat template does not compile: {e}') from e
