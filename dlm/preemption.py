"""Stop cleanly on SIGTERM / SIGINT, and checkpoint by the clock: a preempted TPU VM gets SIGTERM
and some seconds of grace, and a run that saves every 10 000 steps would lose hours.

The training loops run inside `Stopper(checkpoint_minutes)`: a signal only sets a flag; after each
step the loop calls `poll()`, which says whether to stop (save a checkpoint at that step, wait for
it, raise `Stopped`, which `dlm.main` reports with exit code 0; rerunning the same command resumes
exactly there; an enclosing run, e.g. RL around its warm start, stops too) and whether a
checkpoint is due by time. With several processes both answers are agreed on by all
(process 0's clock; any process signalled stops every process at the same step), since every
process must take part in a checkpoint.
"""
import signal
import threading
import time

import jax
import numpy as np

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(Exception):
  """A run stopped on a signal after checkpointing its last step (not an error: exit code 0)."""


class Stopper:
  """Context manager installing the handlers (main thread only; elsewhere it never stops)."""

  def __init__(self, checkpoint_minutes: float = 0.0):
    self.signal: int | None = None
    self.minutes = checkpoint_minutes
    self._previous = {}
    self.saved()

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for s in SIGNALS:
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

  def poll(self) -> tuple[bool, bool]:
    """(stop now, a checkpoint is due by time), the same on every process (call at the same
    point of every step on every process)."""
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
