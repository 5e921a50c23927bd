"""dlm.host_memory: XLA:CPU's per-execution buffers are reused, not mapped afresh each call."""
import os
import subprocess
import sys

# A jitted program with a 128 MB temporary (the reversed sin(x) feeds a dot); prints the median
# minor page faults per call after warm-up (the heap grows for the first few calls): a buffer
# mapped afresh each call faults in every page again.
PROBE = """
import resource, statistics
import dlm  # noqa: F401  (applies the malloc settings on import)
import jax, jax.numpy as jnp
f = jax.jit(lambda x: (jnp.sin(x)[::-1] @ jnp.ones((x.shape[1], 8))).sum())
x = jnp.ones((8192, 4096), jnp.float32)
faults = []
for _ in range(20):
  r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
print(statistics.median(faults[10:]))
"""


def faults_per_call(**env) -> float:
  out = subprocess.run([sys.executable, '-c', PROBE], env={**os.environ, **env}, check=True,
                       capture_output=True, text=True).stdout
  return float(out.split()[-1])


def test_large_buffers_are_reused_across_calls():
  tuned, system = faults_per_call(), faults_per_call(DLM_MALLOC_TUNING='0')
  # 128 MB is 32 768 small pages (64 huge ones): glibc's own settings map it afresh per call.
  assert system >= 64, system
  assert tuned <= 8, (tuned, system)
