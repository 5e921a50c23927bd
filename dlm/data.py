"""Input pipeline: corpora as tfds data sources (array_record, no TensorFlow), grain iterators on top.

Corpora (`config.data.corpus`):
  'builtin'     templated English + arithmetic generated offline from a fixed seed, written as text
                files under <workdir>/corpus/ and then treated exactly like 'text_files';
  'text_files'  local or gs:// files/globs; documents are blocks separated by blank lines (a file
                without blank lines is one document); built once into a tfds dataset whose config
                name is a hash of (paths, sizes, mtimes), so edited files trigger a rebuild;
  'tfds'        an already prepared tfds dataset with a 'text' feature ('validation' split, else
                'test', is held out).

Training stream: the global batch is `streams` independent input streams side by side (stream s:
documents `[s::streams]`, shuffled with the seed and reshuffled every epoch, tokenized, EOS
appended, concatenated and split into rows of exactly seq_len; global_batch // streams rows of
the batch each). A process reads only its own contiguous block of streams, so with a stream
count fixed by the config (`input_streams`) every process count dividing it assembles the same
global batches. The held-out batches are one ordered stream; each process keeps its rows. The
iterator is a grain DatasetIterator whose state round-trips through JSON (`iterator_state` /
`restore_iterator`).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import logging
import math
import os
import re
from collections.abc import Sequence
from typing import Any, Callable, NamedTuple

from etils import epath
import grain
import jax
import numpy as np
import tensorflow_datasets as tfds

from dlm import storage  # gs:// form of _workdir_lock
from dlm.errors import ConfigError, DataError, MissingFileError
from dlm.tokenizer import Tokenizer

_HELD_OUT_PER_MILLE = 20  # 2 % of documents, chosen by a hash of their text (duplicates stay together)
_BUILTIN_SEED = 1234  # the builtin corpus is a fixed dataset, independent of the training seed
_BUILTIN_DOCS_PER_FILE = 5000
_TOKENIZER_TRAIN_DOCS = 100_000  # strided sample of the train split used to fit the tokenizer


class Data(NamedTuple):
  """What the training loop reads, for pretraining and SFT (`dlm.sft`) alike."""
  tokenizer: Tokenizer
  iterator: grain.DatasetIterator  # checkpointable
  to_batch: Callable[[Any], dict]  # iterator element → this process's batch {tokens, …}
  eval_batches: list  # this process's held-out batches
  tokens_per_step: int  # global


# ------------------------------------------------------------------------------------------------
# Text files -> tfds dataset


def split_documents(text: str) -> list[str]:
  """Documents of a text file: blocks separated by one or more blank lines, stripped."""
  blocks = re.split(r'\n[ \t]*\n', text.replace('\r\n', '\n'))
  return [b.strip() for b in blocks if b.strip()]


def _held_out(text: str) -> bool:
  digest = hashlib.sha1(text.encode('utf-8')).digest()
  return int.from_bytes(digest[:8], 'little') % 1000 < _HELD_OUT_PER_MILLE


def expand_paths(patterns: str | Sequence[str]) -> list[epath.Path]:
  """Comma-separated paths/globs -> files, in the given order (each glob sorted)."""
  if isinstance(patterns, str):
    patterns = [p.strip() for p in patterns.split(',') if p.strip()]
  if not patterns:
    raise ConfigError('data.text_files is empty; give comma-separated paths or globs')
  files = []
  for pattern in patterns:
    if not any(c in pattern for c in '*?['):
      path = epath.Path(pattern)
      if not path.is_file():
        raise MissingFileError(f'text file not found: {pattern}')
      files.append(path)
      continue
    parts = pattern.split('/')
    first_glob = next(i for i, p in enumerate(parts) if any(c in p for c in '*?['))
    root = epath.Path('/'.join(parts[:first_glob]) or '.')
    matches = sorted(p for p in root.glob('/'.join(parts[first_glob:])) if p.is_file())
    if not matches:
      raise MissingFileError(f'no files match: {pattern}')
    files.extend(matches)
  return files


def _fingerprint(files: Sequence[epath.Path]) -> str:
  """Changes whenever a file is added, removed, reordered, resized or touched."""
  entries = []
  for f in files:
    st = f.stat()
    entries.append([str(f), st.length, st.mtime])
  return hashlib.sha1(json.dumps(entries).encode()).hexdigest()[:16]


class LocalDatasetInfo(tfds.core.DatasetInfo):
  """The DatasetInfo of dlm's builders, whose data is made locally and never lies in tfds'
  bucket: tfds would look there (GCS is off by default) before the data is prepared and leave
  an empty `/tmp/tmp…tfds` directory behind on every such look."""

  def initialize_from_bucket(self) -> None:
    pass


class TextFiles(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Local text files as a tfds dataset: feature 'text', splits 'train' / 'validation'.

  One builder config per file fingerprint (`files_<hash>`): unchanged files reuse the prepared
  array_record files, changed files get a fresh directory.
  """
  name = 'dlm_text_files'
  VERSION = tfds.core.Version('1.0.0')
  # Nothing to download, so no checksums file to find; without this tfds locates the module via
  # the `importlib_resources` package, which is not installed (ModuleNotFoundError).
  code_path = None

  def __init__(self, *, files: Sequence[epath.Path], data_dir, **kwargs):
    self._files = list(files)
    config = tfds.core.BuilderConfig(name=f'files_{_fingerprint(self._files)}')
    super().__init__(config=config, data_dir=data_dir, file_format='array_record', **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    # Built here, with builder=self: a builder defined in code has no metadata directory to read.
    return LocalDatasetInfo(
        builder=self, description='Blank-line separated documents from local text files.',
        features=tfds.features.FeaturesDict({'text': tfds.features.Text()}),
        disable_shuffling=True)  # keep file order; training shuffles in grain anyway

  def _documents(self):
    for i, path in enumerate(self._files):
      for j, doc in enumerate(split_documents(path.read_text())):
        yield f'{i}:{j}', doc

  def _split_generators(self, dl_manager):
    del dl_manager
    # Never leave the held-out split empty: if no document hashes into it, take the last one.
    forced = None
    if not any(_held_out(doc) for _, doc in self._documents()):
      keys = [key for key, _ in self._documents()]
      forced = keys[-1] if len(keys) >= 2 else None
    return {'train': self._generate_examples(False, forced),
            'validation': self._generate_examples(True, forced)}

  def _generate_examples(self, held_out: bool, forced: str | None):
    for key, doc in self._documents():
      if (_held_out(doc) or key == forced) == held_out:
        yield key, {'text': doc}


# ------------------------------------------------------------------------------------------------
# The builtin corpus


_NAMES = ('alice bob carol dave emma frank grace henry ivy jack kate leo mia noah olive paul '
          'rosa sam tom uma').split()
_ANIMALS = 'cat dog bird fish horse cow duck frog mouse rabbit goat sheep'.split()
_COLORS = 'red blue green yellow black white brown pink'.split()
_FOODS = 'apples bread cheese rice soup cake eggs milk carrots grapes'.split()
_PLACES = 'park school market river garden library beach farm forest city'.split()
_STORY = (
    '{n} has a {c} {a}.', 'the {a} is {c}.', '{n} likes {f}.', 'the {a} likes {f} too.',
    '{n} and {m} went to the {p}.', 'at the {p}, the {a} ate some {f}.',
    '{m} said that the {a} was very {c}.', 'every day {n} walks the {a} to the {p}.',
    '{m} does not like {f}.', 'then {n} and the {a} went home.',
)


def builtin_document(rng: np.random.Generator) -> str:
  """One document with learnable structure: a consistent little story, sums/products, or counting."""
  kind = rng.choice(3, p=[0.5, 0.35, 0.15])
  if kind == 0:
    n, m = rng.choice(_NAMES, 2, replace=False)
    slots = dict(n=n, m=m, a=rng.choice(_ANIMALS), c=rng.choice(_COLORS), f=rng.choice(_FOODS),
                 p=rng.choice(_PLACES))
    order = np.sort(rng.choice(len(_STORY), rng.integers(3, 7), replace=False))
    return ' '.join(_STORY[i].format(**slots) for i in order)
  if kind == 1:
    facts = []
    for _ in range(rng.integers(3, 7)):
      op = rng.integers(3)
      if op == 2:
        a, b = rng.integers(0, 13, 2)
        facts.append(f'{a} times {b} is {a * b}.')
      else:
        a, b = rng.integers(0, 50, 2)
        a, b = (a, b) if op == 0 or a >= b else (b, a)
        facts.append(f'{a} plus {b} is {a + b}.' if op == 0 else f'{a} minus {b} is {a - b}.')
    return ' '.join(facts)
  start, step = rng.integers(0, 90), rng.integers(1, 4)
  count = rng.integers(5, 12)
  return f'count from {start} by {step}: ' + ' '.join(
      str(start + k * step) for k in range(count)) + '.'


def write_builtin_corpus(directory, num_documents: int, seed: int = _BUILTIN_SEED) -> list[epath.Path]:
  """Writes (once) `num_documents` generated documents as text files; returns the file paths.

  Existing files are reused untouched so their mtimes, hence the tfds fingerprint, stay stable.
  """
  directory = epath.Path(directory)
  num_files = max(1, -(-num_documents // _BUILTIN_DOCS_PER_FILE))
  files = [directory / f'builtin-{seed}-{num_documents}-{i:03d}-of-{num_files:03d}.txt'
           for i in range(num_files)]
  if all(f.exists() for f in files):
    return files
  directory.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  docs = [builtin_document(rng) for _ in range(num_documents)]
  for i, f in enumerate(files):
    chunk = docs[i * _BUILTIN_DOCS_PER_FILE:(i + 1) * _BUILTIN_DOCS_PER_FILE]
    tmp = f.with_name(f.name + '.tmp')
    tmp.write_text('\n\n'.join(chunk) + '\n')
    tmp.replace(f)
  return files


# ------------------------------------------------------------------------------------------------
# prepare: data sources + tokenizer


@contextlib.contextmanager
def _workdir_lock(workdir: epath.Path):
  """Serialises `prepare` across the processes sharing a workdir: an fcntl lock on local disk;
  on object storage (no locks there) process 0 prepares first and the others then find the
  corpus, tfds data and tokenizer done (`dlm.storage.process_zero_first`)."""
  if storage.is_remote(workdir):
    with storage.process_zero_first('prepare'):
      yield
    return
  workdir.mkdir(parents=True, exist_ok=True)
  with open(workdir / '.data.lock', 'a') as f:  # 'a': the lock file's mtime stays
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _text_files_sources(files, data_dir):
  if not TextFiles(files=files, data_dir=data_dir).is_prepared():
    logging.info('building tfds text dataset in %s from %d files', data_dir, len(files))
  builder = storage.prepared_builder(
      lambda d: TextFiles(files=files, data_dir=d), data_dir,
      download_config=tfds.download.DownloadConfig(
          try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return builder.as_data_source('train'), builder.as_data_source('validation')


def _tfds_sources(name: str, data_dir):
  if not name:
    raise ConfigError("data.corpus='tfds' needs data.tfds_name")
  builder = tfds.builder(name, data_dir=data_dir)
  if 'text' not in builder.info.features:
    raise DataError(f'tfds dataset {name} has no "text" feature: {builder.info.features}')
  held_out = next((s for s in ('validation', 'test') if s in builder.info.splits), None)
  if 'train' not in builder.info.splits or held_out is None:
    raise DataError(f'tfds dataset {name} needs a train and a validation or test split; '
                     f'has {list(builder.info.splits)}')
  return builder.as_data_source('train'), builder.as_data_source(held_out)


def example_text(example) -> str:
  """The document of a data-source record (tfds gives bytes; other sources may give str)."""
  text = example['text']
  return text.decode('utf-8') if isinstance(text, bytes) else str(text)


def prepare(data_cfg, workdir):
  """Builds or loads the corpus and the tokenizer. Returns (tokenizer, train_source, eval_source).

  Idempotent: a second call reuses the corpus files, the prepared tfds dataset and
  <workdir>/tokenizer.model, so a resumed run sees identical data and ids.
  """
  workdir = epath.Path(workdir)
  data_dir = epath.Path(data_cfg.tfds_data_dir or workdir / 'tfds')
  with _workdir_lock(workdir):
    if data_cfg.corpus == 'builtin':
      files = write_builtin_corpus(workdir / 'corpus', data_cfg.builtin_documents)
      train, held_out = _text_files_sources(files, data_dir)
    elif data_cfg.corpus == 'text_files':
      train, held_out = _text_files_sources(expand_paths(data_cfg.text_files), data_dir)
    elif data_cfg.corpus == 'tfds':
      train, held_out = _tfds_sources(data_cfg.tfds_name, data_dir)
    else:
      raise ConfigError(f"data.corpus must be 'builtin', 'text_files' or 'tfds', "
                       f'got {data_cfg.corpus!r}')
    if len(train) == 0 or len(held_out) == 0:
      raise DataError(f'corpus needs documents in both splits; got {len(train)} train and '
                       f'{len(held_out)} held-out')
    if (workdir / 'tokenizer.model').exists():
      tokenizer = Tokenizer.load(workdir / 'tokenizer.model')
    elif data_cfg.tokenizer:  # copied in: the workdir alone must load the model later
      tokenizer = Tokenizer.load(data_cfg.tokenizer)
      tokenizer.save(workdir / 'tokenizer.model')
    else:
      step = max(1, len(train) // _TOKENIZER_TRAIN_DOCS)
      indices = range(0, len(train), step)
      texts = (example_text(train[i]) for i in indices)
      tokenizer = Tokenizer.train(texts, data_cfg.vocab_size, workdir / 'tokenizer.model')
  return tokenizer, train, held_out


# ------------------------------------------------------------------------------------------------
# grain pipelines


class Tokenize(grain.transforms.Map):
  """{'text': bytes} -> {'tokens': int32[n + 1]}: the document's ids followed by EOS."""

  def __init__(self, tokenizer: Tokenizer):
    self.tokenizer = tokenizer

  def map(self, example):
    ids = self.tokenizer.encode(example_text(example))
    ids.append(self.tokenizer.eos_id)
    return {'tokens': np.asarray(ids, np.int32)}


class TokensOnly(grain.transforms.Map):
  """Drops the segment ids / positions that packing adds: the model sees one long stream."""

  def map(self, packed):
    return packed['tokens']


_MAX_STREAMS = 64  # input streams of a pretraining batch: gcd(global batch, this)


def input_streams(global_batch: int) -> int:
  """The pretraining batch's stream count: fixed by the batch size alone, so 1 process × 8
  devices and 2 processes × 4 devices read the same global batches (any process count dividing
  it works)."""
  return math.gcd(global_batch, _MAX_STREAMS)


class Concat(grain.transforms.Map):
  """The rows of several streams (a tuple of [rows, L] arrays) as one batch, in stream order."""

  def map(self, parts):
    return np.concatenate(parts)


def _process(process_index, process_count, global_batch) -> tuple[int, int, int]:
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if global_batch % count:
    raise ConfigError(f'global batch {global_batch} is not divisible by the {count} processes')
  if not 0 <= index < count:
    raise ValueError(f'process_index {index} outside [0, {count})')
  return index, count, global_batch // count


def _packed_batches(source, tokenizer, *, seq_len, rows, index, count, seed, threads=16):
  """Stream `index` of `count`: its documents, (shuffled,) repeated forever, tokenized, packed
  and batched."""
  docs = grain.MapDataset.source(source)[index::count]
  if len(docs) == 0:
    raise DataError(f'input stream {index} of {count} has no documents ({len(source)} in the '
                    'split)')
  if seed is not None:
    if not 0 <= seed < 2**32:
      raise ValueError(f'seed must be in [0, 2**32), got {seed}')
    docs = docs.shuffle(seed)  # before repeat: each epoch gets its own permutation
  docs = docs.repeat().map(Tokenize(tokenizer))
  read = grain.ReadOptions(num_threads=max(1, min(threads, os.cpu_count() or 1)),
                          prefetch_buffer_size=max(256, rows * seq_len // 64))  # ~2 batches of docs
  stream = docs.to_iter_dataset(read)
  rows_ds = grain.experimental.ConcatThenSplitIterDataset(stream, length_struct={'tokens': seq_len})
  return rows_ds.map(TokensOnly()).batch(rows, drop_remainder=True)


def make_train_iterator(source, tokenizer: Tokenizer, *, seq_len: int, global_batch: int,
                        seed: int, process_index: int | None = None,
                        process_count: int | None = None,
                        streams: int | None = None) -> grain.DatasetIterator:
  """Endless checkpointable iterator of int32[global_batch // process_count, seq_len] batches:
  rows [index·b, (index+1)·b) of every global batch, b = global_batch // process_count.
  `streams` (default: one per process) must be a multiple of the process count and divide the
  global batch; the global batches depend on it, not on the process count."""
  index, count, _ = _process(process_index, process_count, global_batch)
  streams = count if streams is None else streams
  if streams % count or global_batch % streams:
    raise ConfigError(f'{count} processes need a stream count ({streams}) that they divide and '
                      f'that divides the global batch {global_batch}')
  mine = range(index * streams // count, (index + 1) * streams // count)
  # Tokenization runs ahead on grain's reader threads; packing and batching are cheap numpy work
  # done on `next`, which overlaps the device step anyway since jax dispatch is asynchronous.
  parts = [_packed_batches(source, tokenizer, seq_len=seq_len, rows=global_batch // streams,
                           index=s, count=streams, seed=seed, threads=16 // len(mine))
           for s in mine]
  return iter(parts[0] if len(parts) == 1 else
              grain.experimental.ZipIterDataset(parts).map(Concat()))


def eval_batches(source, tokenizer: Tokenizer, *, seq_len: int, global_batch: int,
                 num_batches: int, process_index: int | None = None,
                 process_count: int | None = None) -> list[np.ndarray]:
  """This process's rows of the first `num_batches` packed held-out batches, in source order
  (wrapping if short): one ordered stream, the same global batches for any process count."""
  index, _, rows = _process(process_index, process_count, global_batch)
  it = iter(_packed_batches(source, tokenizer, seq_len=seq_len, rows=global_batch, index=0,
                            count=1, seed=None))
  try:
    return [b[index * rows:(index + 1) * rows] for b in itertools.islice(it, num_batches)]
  finally:
    it.close()


def iterator_state(it: grain.DatasetIterator) -> str:
  """The iterator position as JSON (this process's)."""
  return json.dumps(it.get_state())


def all_iterator_states(it: grain.DatasetIterator) -> str:
  """Every process's iterator position (each may read its own documents), gathered into one
  JSON list for the checkpoint: the one format pretraining, SFT and RL save."""
  mine = iterator_state(it)
  if jax.process_count() == 1:
    return json.dumps([mine])
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  raw = np.frombuffer(mine.encode(), np.uint8)
  n = int(np.max(multihost_utils.process_allgather(np.array([raw.size]))))
  padded = np.zeros(n, np.uint8)
  padded[:raw.size] = raw
  rows = multihost_utils.process_allgather(padded)
  return json.dumps([bytes(r).rstrip(b'\0').decode() for r in np.asarray(rows).reshape(-1, n)])


def restore_process_iterator(it: grain.DatasetIterator, saved: str) -> None:
  """Inverse of `all_iterator_states` for this process."""
  states = json.loads(saved)
  if len(states) != jax.process_count():
    raise ConfigError(f'the checkpoint was written by {len(states)} processes; its data '
                      f'position cannot be split over {jax.process_count()}')
  restore_iterator(it, states[jax.process_index()])


def restore_iterator(it: grain.DatasetIterator, state: str) -> None:
  """Inverse of `iterator_state`.

  JSON turns tuples into lists; grain's packing state compares slices with tuples, so lists are
  turned back into tuples (a list-valued slice would read as a pending remainder and corrupt the
  restored stream).
  """
  it.set_state(_lists_to_tuples(json.loads(state)))


def _lists_to_tuples(x):
  if isinstance(x, dict):
    return {k: _lists_to_tuples(v) for k, v in x.items()}
  if isinstance(x, list):
    return tuple(_lists_to_tuples(v) for v in x)
  return x
