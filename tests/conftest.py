"""Test setup: 8 forced CPU devices (so sharding is exercised) and parsed absl flags (grain)."""
import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
from absl import flags  # noqa: E402

jax.config.update('jax_compilation_cache_dir', os.path.expanduser('~/.cache/dlm_jax_tests'))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
flags.FLAGS.mark_as_parsed()
