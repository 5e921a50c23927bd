"""Orbax checkpoints of {training state, data-iterator position, config}: save, resume, reshard.

Orbax writes each step to a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous step as the latest; a damaged step is reported with the steps that
remain, never silently skipped.
"""
import json
from typing import Any

import orbax.checkpoint as ocp
from etils import epath


class CheckpointError(RuntimeError):
  pass


class Checkpointer:

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
    self.directory = epath.Path(workdir) / 'checkpoints'
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=async_save),
        item_names=('state', 'data', 'config'))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: str, config: dict):
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave({'iterator': data_state}),
        config=ocp.args.JsonSave(json.loads(json.dumps(config)))))

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, str, dict]:
    """Restores onto the shardings carried by `abstract_state` (any mesh: orbax reshards)."""
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          data=ocp.args.JsonRestore(),
          config=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types for damaged files
      others = [s for s in self.manager.all_steps() if s != step]
      raise CheckpointError(
          f'checkpoint {self.directory / str(step)} could not be restored ({type(e).__name__}: '
          f'{e}). Other steps present: {others or "none"}. Move the damaged step directory away '
          'to resume from an earlier one.') from e
    return out.state, out.data['iterator'], out.config

  def restore_config(self, step: int) -> dict:
    """Only the config a step was written with (to rebuild its model before restoring it)."""
    return self.manager.restore(
        step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()
