"""A Google Cloud Storage emulator on loopback for tests of `gs://` workdirs.

    with gcs_emulator.running() as gcs:
      subprocess.run([... f'--workdir=gs://{gcs.bucket}/run'], env=gcs.env)

`gcp-storage-emulator` (in memory) serves the JSON API on 127.0.0.1 from a thread of the test
process; `gcs.env` is os.environ plus what points every layer at it (`dlm.storage.EMULATOR_ENV`):
gcsfs (etils.epath's gs:// backend) and google-cloud-storage read STORAGE_EMULATOR_HOST,
tensorstore (orbax's arrays) reads TENSORSTORE_GCS_HTTP_URL. `gcs.fs` lists and reads objects.

The emulator leaves out one thing real GCS does that tensorstore needs: a media download carries
the object's generation in `x-goog-generation` (OCDBT reads its manifest back before rewriting
it: "Malformed StorageGeneration" without it); `_add_generation_header` adds it. It also
ignores preconditions (ifGenerationMatch): fine for one writer per object, as dlm has.
"""
import contextlib
import logging
import os
import sys
import socket
from typing import NamedTuple


class Emulator(NamedTuple):
  url: str  # http://127.0.0.1:PORT
  bucket: str
  env: dict  # environment for subprocesses (and `applied` for this process)
  fs: object  # a gcsfs.GCSFileSystem on the emulator


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _add_generation_header():
  """Makes the emulator's downloads carry x-goog-generation, as GCS' do (idempotent)."""
  from gcp_storage_emulator import server  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator.handlers import objects  # pylint: disable=g-import-not-at-top
  original = objects.download
  if getattr(original, 'adds_generation', False):
    return

  def download(request, response, storage, *args, **kwargs):
    original(request, response, storage, *args, **kwargs)
    if response.status.value < 300:
      obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
      response['x-goog-generation'] = str(obj['generation'])
      response['x-goog-metageneration'] = str(obj.get('metageneration', '1'))

  download.adds_generation = True
  objects.download = download  # objects.get (…?alt=media) calls it by this name
  for _, handlers in server.HANDLERS:
    for method, fn in handlers.items():
      if fn is original:
        handlers[method] = download


@contextlib.contextmanager
def running(bucket: str = 'dlm-test'):
  """Starts an in-memory emulator with `bucket` on a free loopback port; stops it on exit."""
  from gcp_storage_emulator.server import create_server  # pylint: disable=g-import-not-at-top
  from dlm import storage  # pylint: disable=g-import-not-at-top
  _add_generation_header()
  logging.getLogger('gcp_storage_emulator').setLevel(logging.CRITICAL)  # 404s are expected
  url = f'http://127.0.0.1:{_free_port()}'
  server = create_server('127.0.0.1', int(url.rsplit(':', 1)[1]), in_memory=True,
                         default_bucket=bucket)
  server.start()
  server._api._httpd.handle_error = lambda *_: None  # clients closing early: not our business
  try:
    env = {**os.environ, **storage.emulator_env(url)}
    with applied(env):
      import gcsfs  # pylint: disable=g-import-not-at-top
      fs = gcsfs.GCSFileSystem(token='anon', endpoint_url=url, skip_instance_cache=True)
    yield Emulator(url, bucket, env, fs)
  finally:
    server.stop()


@contextlib.contextmanager
def applied(env: dict):
  """Sets `env` in this process (for in-process epath / orbax calls), restoring it afterwards.

  Cached gcsfs filesystems are dropped on the way in and out; GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT
  only counts if gcsfs was not imported before."""
  saved = dict(os.environ)
  os.environ.update(env)
  _forget_filesystems()
  try:
    yield
  finally:
    os.environ.clear()
    os.environ.update(saved)
    _forget_filesystems()


def _forget_filesystems():
  """Drops the gcsfs instances epath and fsspec cached (they hold an emulator's URL)."""
  from etils.epath import backend  # pylint: disable=g-import-not-at-top
  backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  if 'gcsfs' in sys.modules:
    sys.modules['gcsfs'].GCSFileSystem.clear_instance_cache()
