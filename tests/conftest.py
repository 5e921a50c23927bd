"""Test setup: 8 forced CPU devices (so sharding is exercised), a persistent compilation cache
and parsed absl flags (grain). The settings go through the environment, so the CLI runs that
tests start as subprocesses share them."""
import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.expanduser('~/.cache/dlm_jax_tests'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()
