"""glibc malloc settings that let XLA:CPU reuse its per-execution buffers instead of mapping
fresh pages on every call.

XLA:CPU allocates each execution's temporaries (saved activations, gradients: ~100 MB for the
CPU Countdown warm-start step) with malloc from its worker threads. glibc serves a worker
thread from a secondary arena, whose heaps cannot exceed 64 MB, so such a buffer is mmapped and
unmapped on every step, and the kernel faults in and zeroes every page again: a quarter of the
step's CPU time on a 2-core host (BENCHMARKS.md). One arena, and mmap / trim thresholds of
`LIMIT`, keep buffers below that size in the heap, reused from step to step. Buffers above it
(a large checkpoint's host arrays) are still mapped and returned to the system when freed.

Applied once, when `dlm` is imported (before JAX starts its threads), on glibc only; set
`DLM_MALLOC_TUNING=0` to leave malloc as the system configured it. `resident_bytes` reads this
process's own resident memory, for the reports that measure it.
"""
import ctypes
import ctypes.util
import os

LIMIT = 1 << 30  # bytes: buffers up to this size stay in the heap; top free memory kept ≤ this
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # glibc's mallopt parameters


def tune() -> bool:
  """Applies the settings; True when glibc accepted all of them."""
  if os.environ.get('DLM_MALLOC_TUNING', '1') == '0':
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
  except OSError:
    return False
  if not hasattr(libc, 'gnu_get_libc_version'):  # not glibc (macOS, musl): other parameters
    return False
  return all(libc.mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, LIMIT), (_M_TRIM_THRESHOLD, LIMIT)))


def resident_bytes() -> tuple[int, int] | None:
  """(resident now, peak resident) of this program (Linux's VmRSS, VmHWM); None without /proc.
  Not `ru_maxrss`: Linux carries the launching process's peak across exec into it."""
  try:
    with open('/proc/self/status') as f:
      status = dict(line.split(':', 1) for line in f if ':' in line)
  except OSError:
    return None
  kb = lambda key: int(status[key].split()[0]) * 1024
  return kb('VmRSS'), kb('VmHWM')
