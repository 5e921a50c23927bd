"""Stop cleanly on SIGTERM / SIGINT, and checkpoint by the clock: a preempted TPU VM gets SIGTERM
and some seconds of grace, and a run that saves every 10 000 steps would lose hours.

The training loops run inside `Stopper(checkpoint_minutes)`: a signal only sets a flag; after each
step the loop calls `poll()`, which says whether to stop (save a checkpoint at that step, wait for
it, raise `Stopped`, which `dlm.main` reports with exit code 0; rerunning the same command resumes
exactly there; an enclosing run, e.g. RL around its warm start, stops too) and whether a
checkpoint is due by time. With several processes both answers are agreed on by all
(process 0's clock; any process signalled stops every process at the same step), since every
process must take part in a checkpoint.

Multi-process runs (`jax.distributed`, e.g. a TPU pod slice) with jax's preemption service on
(its default) use it, as orbax's CheckpointManager does: jax's notifier receives SIGTERM on every
host and `multihost_utils.reached_preemption_sync_point` names one step, the same on all, at
which to save; the Stopper then leaves SIGTERM to it. A single process keeps its own handler.
"""
import signal
import threading
import time

import jax
import numpy as np

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def preemption_service() -> bool:
  """Whether jax's preemption sync manager runs here (it then owns SIGTERM)."""
  return (jax.distributed.is_initialized() and jax.process_count() > 1
          and bool(jax.config.jax_enable_preemption_service))


def reached_sync_point(step: int) -> bool:
  """jax's preemption sync point at `step` (False where the service is off)."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  try:
    return multihost_utils.reached_preemption_sync_point(step)
  except RuntimeError:  # the service is disabled (jax_enable_preemption_service=False)
    return False


class Stopped(Exception):
  """A run stopped on a signal after checkpointing its last step (not an error: exit code 0)."""


class Stopper:
  """Context manager installing the handlers (main thread only; elsewhere it never stops)."""

  def __init__(self, checkpoint_minutes: float = 0.0):
    self.signal: int | None = None
    self.minutes = checkpoint_minutes
    self.service = preemption_service()
    self._previous = {}
    self.saved()

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for s in SIGNALS:
        if not (self.service and s == signal.SIGTERM):
          self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc):
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    return False

  def _handle(self, signum, frame):
    del frame
    if self.signal is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop now
      raise KeyboardInterrupt
    self.signal = signum

  def saved(self) -> None:
    """Restart the clock of time-based checkpoints (call after every save)."""
    self._last_save = time.monotonic()

  def poll(self, step: int) -> tuple[bool, bool]:
    """(stop now, a checkpoint is due by time), the same on every process (call at the same
    point of every step on every process, with the training step: the one checkpoints are
    saved under, which orbax also reports to jax's preemption sync point)."""
    if self.service and reached_sync_point(step) and self.signal is None:
      self.signal = signal.SIGTERM  # a preemption notice, agreed on by every process
    flags = np.asarray([self.signal is not None,
                        self.minutes > 0 and time.monotonic() - self._last_save >= 60 * self.minutes])
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      every = np.asarray(multihost_utils.process_allgather(flags)).reshape(-1, 2)
      flags = np.asarray([every[:, 0].any(), every[0, 1]])
    return bool(flags[0]), bool(flags[1])

  @property
  def name(self) -> str:
    return signal.Signals(self.signal).name if self.signal is not None else 'a signal'
