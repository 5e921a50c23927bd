"""Workdirs on object storage (`gs://bucket/path`): what local files do that objects cannot.

Every layer reaches GCS through its own client: etils.epath through fsspec's gcsfs (metrics,
tokenizer, plots, corpus files, tfds metadata), orbax through epath for its directories and
tensorstore's `gcs` kvstore for arrays, tfds' array_record shards through google-cloud-cpp
(riegeli's GcsReader; the writer reaches local files only, hence `prepared_builder`). TensorBoard
events are written locally and copied up (`dlm.metrics`). Objects have no append and no
advisory locks: writers rewrite whole objects (`is_remote` tells them when), and processes
take turns by a barrier instead of a lock file (`process_zero_first`).

An emulator (tests, offline work) is named once, by STORAGE_EMULATOR_HOST=http://host:port:
gcsfs reads it itself; `use_emulator_from_env` points tensorstore and google-cloud-cpp at it
too (they read other variables, see `emulator_env`).
"""
import collections
import contextlib
import os
import shutil
import tempfile

from etils import epath

EMULATOR = 'STORAGE_EMULATOR_HOST'
_entries = collections.Counter()  # per name: every process enters in the same order


def is_remote(path) -> bool:
  """True for object-storage paths (gs://, s3://, …): no append, no fcntl."""
  return '://' in os.fspath(path)


def write_atomic(path, data: bytes | str) -> None:
  """Writes a file a reader never sees half-written: a temporary file renamed over it on local
  disk; an object directly (an upload appears whole or not at all; a rename would copy it)."""
  path = epath.Path(path)
  target = path if is_remote(path) else path.with_name(path.name + '.tmp')
  if isinstance(data, str):
    target.write_text(data, encoding='utf-8')
  else:
    target.write_bytes(data)
  if target != path:
    target.replace(path)


@contextlib.contextmanager
def staged_dir(directory):
  """A local directory to write `directory`'s files into, copied up on success when it is
  remote (writers that reach local files only: array_record's C++ writer, under tfds'
  download_and_prepare); a local `directory` is yielded as it is."""
  directory = epath.Path(directory)
  if not is_remote(directory):
    yield directory
    return
  local = tempfile.mkdtemp(prefix='dlm_stage_')
  try:
    yield epath.Path(local)
    for root, _, names in os.walk(local):
      for name in names:
        target = directory / os.path.relpath(os.path.join(root, name), local)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(epath.Path(root, name).read_bytes())
  finally:
    shutil.rmtree(local, ignore_errors=True)


def prepared_builder(make_builder, data_dir, **prepare_kwargs):
  """`make_builder(data_dir)`, a tfds builder, with its dataset prepared. On object storage an
  unprepared dataset is built into a local staging directory and copied up: tfds writes the
  array_record shards with array_record's C++ writer, which reaches local files only (its
  reader reads gs:// through google-cloud-cpp)."""
  builder = make_builder(data_dir)
  if is_remote(data_dir) and not builder.is_prepared():
    with staged_dir(data_dir) as local:
      make_builder(local).download_and_prepare(**prepare_kwargs)
    builder = make_builder(data_dir)
  builder.download_and_prepare(**prepare_kwargs)  # prepared: only checks
  return builder


def emulator_env(url: str) -> dict[str, str]:
  """The environment that points every GCS client dlm uses at an emulator at `url`.

  tensorstore needs its own URL variable and a token (it would otherwise look for Google
  credentials and the metadata server); array_record's reader (google-cloud-cpp) reads
  CLOUD_STORAGE_EMULATOR_ENDPOINT; gcsfs' bucket-layout probe is a gRPC call that emulators do
  not serve, so it is switched off (it is read when gcsfs is imported)."""
  return {EMULATOR: url, 'TENSORSTORE_GCS_HTTP_URL': url, 'CLOUD_STORAGE_EMULATOR_ENDPOINT': url,
          'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator',
          'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
          'GOOGLE_CLOUD_PROJECT': os.environ.get('GOOGLE_CLOUD_PROJECT', 'emulator')}


def use_emulator_from_env() -> None:
  """With STORAGE_EMULATOR_HOST set, fills in the rest of `emulator_env` (values already set
  win). Call before anything imports gcsfs or opens a tensorstore."""
  url = os.environ.get(EMULATOR)
  if url:
    url = url if url.startswith(('http://', 'https://')) else f'http://{url}'
    for k, v in emulator_env(url).items():
      os.environ.setdefault(k, v)


@contextlib.contextmanager
def process_zero_first(name: str, timeout_s: float = 6 * 3600.0):
  """Runs the body on process 0 first and on the others once it is done (one process: as is).

  The `gs://` form of a lock around work that later processes only need to find done (data
  preparation): object storage has no advisory locks, and GCS' create-if-absent
  (ifGenerationMatch=0) is not honoured by emulators, so the order comes from a barrier of the
  jax.distributed runtime instead. Every process must make the same sequence of calls. If
  process 0 fails, the others still run the body after it (and meet the same error); a wait
  longer than `timeout_s` is an error."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  barrier = ocp.multihost.get_barrier_sync_fn()  # a no-op with one process
  _entries[name] += 1
  key = f'dlm_{name}_{_entries[name]}'
  wait = lambda: barrier(key=key, timeout_ms=int(timeout_s * 1000))
  first = jax.process_index() == 0
  if not first:
    wait()
  try:
    yield
  finally:
    if first:
      wait()
