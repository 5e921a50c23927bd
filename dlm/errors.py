"""The project's error types for problems a user can fix: a config key or value, a data file, a
checkpoint, an input. `dlm.main` prints these as one line and exits with code 1; any other
exception is a bug and keeps its traceback.

Each also derives from the matching built-in (ValueError, FileNotFoundError, …), so callers that
catch the built-in keep working.
"""


class DlmError(Exception):
  """A user-facing problem with an actionable message."""


class ConfigError(DlmError, ValueError):
  """A config key or value (or a combination of them) that cannot work."""


class ConfigMismatchError(ConfigError):
  """A workdir holds a run whose saved config differs in keys that change shapes or results."""


class DataError(DlmError, ValueError):
  """Input data that cannot be used (malformed file, empty split, too few problems, …)."""


class MissingFileError(DlmError, FileNotFoundError):
  """A file or directory the run needs does not exist."""


class CheckpointError(DlmError, RuntimeError):
  """A checkpoint that exists but cannot be read (I/O or format damage)."""


class NonFiniteLossError(DlmError, FloatingPointError):
  """A step produced a non-finite loss or gradient; nothing was saved for it."""
