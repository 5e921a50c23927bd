"""Orbax checkpoints: save, resume with a config check, load parameters alone, reshard.

A step holds separate items — `params`, `ema` (when kept), `opt` (optimizer state and step),
`data` (every process's iterator position) and `config` — so a model can be loaded from its
parameters alone, without the optimizer state.

A run killed during an (asynchronous) save leaves that step unfinished, in orbax's own marking:
a `<step>.orbax-checkpoint-tmp` directory on file systems with an atomic rename, a `<step>`
directory without `commit_success.txt` on gs:// (no rename there). Orbax never lists such a
step; opening a workdir to write names each with a warning and deletes it (a new save of that
step would collide with it), so the run resumes from the previous complete step.

One resume path for pretraining, SFT and RL (`Checkpointer.resume_step`, then `restore`): the
saved config is read first and compared with the current one; a difference in a key that changes shapes or results
stops the run with one line naming each key and both values, before anything is restored or
written. A step is called damaged only when reading it fails for another reason.
"""
import json
import logging
from typing import Any

import orbax.checkpoint as ocp
from etils import epath

from dlm.errors import CheckpointError, ConfigMismatchError, MissingFileError

_logger = logging.getLogger(__name__)

ITEMS = ('params', 'ema', 'opt', 'data', 'config')

# Keys that may change between a run and its resumption: run length, cadences and the mesh
# (a checkpoint restores onto any mesh). Any other difference changes shapes or results.
RESUMABLE = ('train.num_steps', 'train.log_every', 'train.eval_every', 'train.checkpoint_every',
             'train.checkpoint_minutes', 'train.keep_checkpoints', 'rl.num_steps',
             'rl.log_every', 'rl.eval_every', 'rl.checkpoint_every', 'rl.checkpoint_minutes',
             'rl.keep_checkpoints', 'eval_sampler.batch_size', 'sharding',
             # how to run (memory, speed), not what is computed:
             'model.remat', 'model.dtype', 'model.head_chunk', 'model.attention', 'dry_run')


def flatten(tree: dict, prefix: str = '') -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}; values are made JSON-like (tuples become lists)."""
  out = {}
  for k, v in tree.items():
    key = f'{prefix}{k}'
    if isinstance(v, dict):
      out.update(flatten(v, key + '.'))
    else:
      out[key] = json.loads(json.dumps(v))
  return out


def config_changes(saved: dict, current: dict, resumable=RESUMABLE) -> list[str]:
  """'key (saved → current)' for every key that differs and is not resumable."""
  a, b = flatten(saved), flatten(current)
  free = lambda k: any(k == r or k.startswith(r + '.') for r in resumable)
  missing = '<absent>'
  return [f'{k} ({a.get(k, missing)!r} → {b.get(k, missing)!r})'
          for k in sorted(set(a) | set(b)) if not free(k) and a.get(k, missing) != b.get(k, missing)]


def unfinished_steps(directory: epath.Path, temporary_path_class=None) -> list[str]:
  """Names of the step directories in `directory` that a save did not finish, by orbax's own
  test for its file system (see the module docstring); [] when there is no directory."""
  if not directory.exists():
    return []
  return sorted(ocp.path.step.tmp_checkpoints(directory, temporary_path_cls=temporary_path_class))


class Checkpointer:
  """temporary_path_class: orbax's marking of unfinished steps (None: the file system's
  default; tests pass atomicity.CommitFileTemporaryPath to get gs://'s on a local disk)."""

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True,
               read_only: bool = False, temporary_path_class=None):
    self.directory = epath.Path(workdir) / 'checkpoints'
    if read_only and not self.directory.exists():
      raise MissingFileError(f'no checkpoints in {self.directory}')
    # A reader may look at a run that is still writing: only a writer calls a step abandoned.
    leftovers = [] if read_only else unfinished_steps(self.directory, temporary_path_class)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                             read_only=read_only,
                                             enable_async_checkpointing=async_save,
                                             temporary_path_class=temporary_path_class),
        item_names=ITEMS)
    if leftovers:  # deleted here, not by orbax's cleanup_tmp_directories: that runs in a
      # background thread which close() does not wait for (it died at interpreter exit)
      for name in leftovers:
        (self.directory / name).rmtree()
      latest = self.latest_step()
      _logger.warning('checkpoint %s in %s was left unfinished by an interrupted save: deleted; '
                      '%s', ', '.join(leftovers), self.directory,
                      f'the latest complete step is {latest}' if latest is not None else
                      'no complete step: the run starts afresh')

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, items: dict[str, Any], data_state: str, config: dict):
    """items: 'params', 'opt' and optionally 'ema' pytrees; data_state: JSON of iterators."""
    self.manager.save(step, args=_save_args(items, data_state, config, ocp.args.StandardSave))

  def has(self, step: int, item: str) -> bool:
    return (self.directory / str(step) / item).exists()

  def _restore(self, step: int, what: str, **args):
    try:
      return self.manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # orbax raises many types for damaged files
      if 'not compatible with the stored shape' in str(e):
        raise ConfigMismatchError(
            f'checkpoint {self.directory / str(step)} holds {what} of other shapes than this '
            f'config builds ({str(e).splitlines()[0][:200]}); use a new --workdir') from e
      others = [s for s in self.all_steps() if s != step]
      raise CheckpointError(
          f'checkpoint {self.directory / str(step)} is damaged: reading its {what} failed '
          f'({type(e).__name__}: {str(e)[:300]}). Other steps present: {others or "none"}; '
          'move the damaged step directory away to resume from an earlier one.') from e

  def restore_config(self, step: int) -> dict:
    """Only the config a step was written with (to rebuild its model before restoring it)."""
    return self._restore(step, 'config', config=ocp.args.JsonRestore()).config

  def restore_params(self, step: int, abstract_params: Any, use_ema: bool = True) -> Any:
    """The EMA parameters (when kept and asked for) or the raw ones; nothing else is read."""
    item = 'ema' if use_ema and self.has(step, 'ema') else 'params'
    out = self._restore(step, f'{item} parameters',
                        **{item: ocp.args.StandardRestore(abstract_params)})
    return out[item]

  def resume_step(self, config: dict) -> int:
    """The step to resume from (0 in a fresh workdir), after checking that the keys of its
    saved config that change shapes or results equal `config`'s. Restores nothing."""
    step = self.latest_step()
    if not step:
      return 0
    changes = config_changes(self.restore_config(step), config)
    if changes:
      raise ConfigMismatchError(
          f'{self.directory.parent} holds a run with another config: {"; ".join(changes)}. '
          'Rerun with the saved values, or use a new --workdir (nothing was changed).')
    return step

  def restore(self, step: int, abstract_items: dict[str, Any]) -> tuple[dict, str]:
    """(items, data_state) of a step, onto the shardings `abstract_items` carry (any mesh)."""
    args = {k: ocp.args.StandardRestore(v) for k, v in abstract_items.items() if v is not None}
    out = self._restore(step, 'training state', **args, data=ocp.args.JsonRestore())
    return {k: out[k] for k in args}, out.data['iterator']

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def save_uncompressed(workdir: str, step: int, items: dict[str, Any], data_state: str,
                      config: dict) -> None:
  """Writes one step synchronously, as `Checkpointer(workdir, async_save=False).save` does,
  with the arrays stored without zstd compression; the step restores like any other
  (`Checkpointer.restore_params`, `restore`, `dlm.workdir.load`).

  For a large one-off save from host memory (an imported checkpoint): TensorStore then writes
  straight from the arrays' own buffers. Compressed, every array's compressed copy stays
  resident until the item commits (OCDBT gathers the item into one data file), about 0.9× of
  the arrays more at the peak; bounding that (smaller data files, chunks, a limit on bytes in
  flight) still grows with the number of TensorStore threads. The cost is disk: about 8% on
  float32 weights, about 22% on bfloat16. The array items' handler is recorded as orbax's
  PyTreeCheckpointHandler (the one StandardCheckpointHandler wraps; same files)."""
  manager = ocp.CheckpointManager(
      epath.Path(workdir) / 'checkpoints',
      options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False),
      item_handlers={**{k: ocp.PyTreeCheckpointHandler(use_compression=False) for k in items},
                     'data': ocp.JsonCheckpointHandler(), 'config': ocp.JsonCheckpointHandler()})
  try:
    manager.save(step, args=_save_args(items, data_state, config, ocp.args.PyTreeSave))
  finally:
    manager.close()


def _save_args(items: dict[str, Any], data_state: str, config: dict, array_save):
  """One step's items: the array pytrees (saved with `array_save`), iterator state and config."""
  args = {k: array_save(v) for k, v in items.items() if v is not None}
  return ocp.args.Composite(**args, data=ocp.args.JsonSave({'iterator': data_state}),
                            config=ocp.args.JsonSave(json.loads(json.dumps(config))))
