"""Generated Countdown problems as a tfds dataset (array_record), so grain reads them like any corpus.

Kept apart from `countdown.py` so the reward path never imports tfds. The splits are exactly
`countdown.generate` outputs, in order: test = generate(test_size, seed=test_seed, exclude=exclude),
train = generate(train_size, seed=train_seed, exclude=test + exclude). Each distinct configuration
gets its own builder config (named by a hash of the settings), so changing any setting rebuilds
instead of silently reusing stale files.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds

from dlm import data
from dlm import storage
from dlm.tasks import countdown


class Countdown(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Features: numbers int32[k] (k may vary with `num_numbers`), target int32. Splits train/test."""
  name = 'dlm_countdown'
  VERSION = tfds.core.Version('1.0.0')
  # Nothing to download, hence no checksums file; without this tfds looks the module up through
  # `importlib_resources`, which is not installed.
  code_path = None

  def __init__(self, *, data_dir, train_size: int = 50_000, test_size: int = 1_000,
               train_seed: int = 0, test_seed: int = 1, num_numbers: int | Sequence[int] = (3, 4),
               low: int = 1, high: int = 100, exclude: Sequence[countdown.Problem] = (), **kwargs):
    counts = [num_numbers] if isinstance(num_numbers, int) else list(num_numbers)
    self._settings = dict(train_size=train_size, test_size=test_size, train_seed=train_seed,
                          test_seed=test_seed, num_numbers=counts, low=low, high=high)
    self._exclude = list(exclude)
    fingerprint = json.dumps([self._settings, sorted(p.key for p in self._exclude)])
    config = tfds.core.BuilderConfig(
        name=f'cd_{hashlib.sha1(fingerprint.encode()).hexdigest()[:16]}',
        description=json.dumps(self._settings))
    super().__init__(config=config, data_dir=data_dir, file_format='array_record', **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    # Built here with builder=self: a builder defined in code has no metadata directory to read.
    return data.LocalDatasetInfo(
        builder=self, description='Generated Countdown problems (dlm.tasks.countdown.generate).',
        features=tfds.features.FeaturesDict({
            'numbers': tfds.features.Tensor(shape=(None,), dtype=np.int32),
            'target': tfds.features.Scalar(dtype=np.int32),
        }),
        disable_shuffling=True)  # keep generation order, so the source equals `generate`

  def splits(self) -> dict[str, list[countdown.Problem]]:
    s = self._settings
    common = dict(num_numbers=s['num_numbers'], low=s['low'], high=s['high'])
    test = countdown.generate(s['test_size'], seed=s['test_seed'], exclude=self._exclude, **common)
    train = countdown.generate(s['train_size'], seed=s['train_seed'],
                               exclude=test + self._exclude, **common)
    return {'train': train, 'test': test}

  def _split_generators(self, dl_manager):
    del dl_manager
    return {name: self._generate_examples(problems) for name, problems in self.splits().items()}

  def _generate_examples(self, problems):
    for i, p in enumerate(problems):
      yield i, {'numbers': np.asarray(p.numbers, np.int32), 'target': np.int32(p.target)}


def problem(example) -> countdown.Problem:
  """A data-source record back as a `countdown.Problem`."""
  return countdown.Problem(tuple(int(x) for x in example['numbers']), int(example['target']))


def data_source(data_dir, split: str, **settings):
  """The prepared (built on first use) random-access source of one split; `settings` go to
  `Countdown` (train_size, test_size, seeds, num_numbers, low, high, exclude)."""
  builder = storage.prepared_builder(
      lambda d: Countdown(data_dir=d, **settings), data_dir,
      download_config=tfds.download.DownloadConfig(
          try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return builder.as_data_source(split)
