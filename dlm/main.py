"""Entry point: `python -m dlm.main --config=configs/<file>.py[:preset] --workdir=W`.

Re-running with the same workdir resumes from its latest checkpoint. With
`--config.dry_run=<slice | local>` the config's training step is compiled ahead of time for that
TPU slice instead of run, and its per-chip memory reported (`dlm.dry_run`; exit code 3: it does
not fit).
"""
import importlib.util
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from dlm.errors import DlmError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'ml-collections config file[:preset]',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'run directory (checkpoints, metrics.jsonl)')
_COORD = flags.DEFINE_string('coordinator_address', None,
                             'multi-process: host:port of process 0 (omit on TPU pods: '
                             'auto-detected) — see launch/')
_NPROC = flags.DEFINE_integer('num_processes', None, 'multi-process: total processes')
_PID = flags.DEFINE_integer('process_id', None, 'multi-process: this process index')
flags.mark_flags_as_required(['config', 'workdir'])

MODES = ('pretrain', 'sft', 'sample', 'rl', 'eval')


def main(argv):
  del argv
  from dlm import storage  # pylint: disable=g-import-not-at-top
  storage.use_emulator_from_env()  # gs:// workdirs: STORAGE_EMULATOR_HOST reaches tensorstore too
  if not flags.FLAGS['verbosity'].present:  # --v=1: debug records (e.g. each process's rows)
    logging.set_verbosity(logging.WARNING)  # keep the progress lines readable
  if (not _COORD.value and not os.environ.get('DLM_DISTRIBUTED') and
      (_NPROC.value is not None or _PID.value is not None)):
    print('error: --num_processes / --process_id need --coordinator_address=host:port (on TPU '
          'pods set DLM_DISTRIBUTED=1 instead); launch/local.sh N -- <args> starts N local '
          'processes', file=sys.stderr)
    sys.exit(1)
  import jax  # pylint: disable=g-import-not-at-top
  if _COORD.value or os.environ.get('DLM_DISTRIBUTED'):
    jax.distributed.initialize(coordinator_address=_COORD.value, num_processes=_NPROC.value,
                               process_id=_PID.value)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
  cfg = _CONFIG.value
  if cfg.mode not in MODES:
    raise app.UsageError(f'config.mode={cfg.mode!r}; valid: {MODES}')
  sys.exit(dispatch(cfg, _WORKDIR.value))


def dispatch(cfg, workdir: str) -> int:
  """Runs the config's mode, or its dry run (`dry_run` set: the exit code says whether the step
  fits); a user-facing problem (DlmError) is printed as one line and gives exit code 1, anything
  else is a bug and keeps its traceback. A run stopped by SIGTERM / SIGINT after checkpointing
  gives 0."""
  import jax  # pylint: disable=g-import-not-at-top
  from dlm import dry_run, evaluate, generate, preemption, rl, train  # pylint: disable=g-import-not-at-top
  try:
    if cfg.get('dry_run'):
      return dry_run.run(cfg, workdir)
    run = {'pretrain': train.run, 'sft': train.run, 'sample': generate.run, 'rl': rl.run,
           'eval': evaluate.run}[cfg.mode]
    run(cfg, workdir)
  except DlmError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  except preemption.Stopped as e:  # SIGTERM / SIGINT: the last step is checkpointed
    if jax.process_index() == 0:  # one line for the run, not one per process
      print(e, flush=True)
  return 0


def check_overrides(argv: list[str]) -> str | None:
  """A message naming the bad key and the valid ones, for an unknown `--config.<key>` override.

  ml_collections would raise a bare AttributeError from inside flag parsing; this reads the same
  config file first so the user gets an actionable message instead.
  """
  spec = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  keys = [a[len('--config.'):].split('=', 1)[0] for a in argv if a.startswith('--config.')]
  if not spec:
    return None
  path, _, preset = spec.partition(':')
  if not os.path.isfile(path):
    return f'config file not found: {path}'
  module_spec = importlib.util.spec_from_file_location('_dlm_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  try:
    cfg = module.get_config(preset) if preset else module.get_config()
  except DlmError as e:
    return str(e)
  for key in keys:
    node, walked = cfg, 'config'
    for part in key.split('.'):
      if not hasattr(node, 'keys') or part not in node:
        valid = sorted(node.keys()) if hasattr(node, 'keys') else []
        return (f'unknown config key {walked}.{part} (from --config.{key}); valid keys under '
                f'{walked}: {", ".join(valid) or "none: it is a value"}')
      node, walked = node[part], f'{walked}.{part}'
  return None


if __name__ == '__main__':
  if (problem := check_overrides(sys.argv[1:])):
    print(f'error: {problem}', file=sys.stderr)
    sys.exit(2)
  app.run(main)
