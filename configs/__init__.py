"""ml-collections configs: each file has `base_config()`, preset functions and `get_config`."""
import ml_collections

from dlm.errors import ConfigError


def from_preset(presets: dict, preset: str, base: ml_collections.ConfigDict):
  """Apply a named preset to the base config and lock it (a typo'd key is then an error)."""
  if preset not in presets:
    raise ConfigError(f'unknown preset {preset!r}; choose one of {sorted(presets)}')
  c = presets[preset](base)
  c.lock()
  return c
