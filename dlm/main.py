"""Entry point: `python -m dlm.main --config=configs/<file>.py[:preset] --workdir=W`.

Re-running with the same workdir resumes from its latest checkpoint.
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'ml-collections config file[:preset]',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'run directory (checkpoints, metrics.jsonl)')
_COORD = flags.DEFINE_string('coordinator_address', None,
                             'multi-process: host:port of process 0 (omit on TPU pods: '
                             'auto-detected) — see launch/')
_NPROC = flags.DEFINE_integer('num_processes', None, 'multi-process: total processes')
_PID = flags.DEFINE_integer('process_id', None, 'multi-process: this process index')
flags.mark_flags_as_required(['config', 'workdir'])

MODES = ('pretrain',)


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  if _COORD.value or os.environ.get('DLM_DISTRIBUTED'):
    jax.distributed.initialize(coordinator_address=_COORD.value, num_processes=_NPROC.value,
                               process_id=_PID.value)
  logging.set_verbosity(logging.WARNING)  # keep the progress lines readable
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
  cfg = _CONFIG.value
  if cfg.mode not in MODES:
    raise app.UsageError(f'config.mode={cfg.mode!r}; valid: {MODES}')
  from dlm import train  # pylint: disable=g-import-not-at-top
  try:
    train.run(cfg, _WORKDIR.value)
  except (ValueError, FileNotFoundError, train.NonFiniteLossError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
