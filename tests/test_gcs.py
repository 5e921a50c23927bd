"""`gs://` workdirs against a GCS emulator on loopback (tests/gcs_emulator.py): pretraining
writes its checkpoints, metrics, TensorBoard events and tokenizer into the bucket and resumes
from there; the pieces that objects make different (no append, no locks) in isolation."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dlm import metrics as metrics_lib
from dlm import storage
from dlm import tokenizer as tokenizer_lib
from dlm import train

import gcs_emulator

ROOT = Path(__file__).resolve().parents[1]
TINY = ['--config=configs/pretrain.py:tiny', '--config.data.builtin_documents=400',
        '--config.data.vocab_size=255', '--config.train.log_every=1',
        '--config.train.eval_every=1000', '--config.train.checkpoint_every=2']


@pytest.fixture(scope='module')
def gcs():
  with gcs_emulator.running() as emulator:
    yield emulator


def pretrain(gcs, workdir, steps, tfds_dir):
  cmd = [sys.executable, '-m', 'dlm.main', *TINY, f'--workdir={workdir}',
         f'--config.train.num_steps={steps}', f'--config.data.tfds_data_dir={tfds_dir}']
  done = subprocess.run(cmd, cwd=ROOT, env=gcs.env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout


def losses(rows):
  return {r['step']: r['train/loss'] for r in rows if 'train/loss' in r}


def test_pretraining_in_a_bucket_checkpoints_logs_and_resumes_bit_exactly(gcs, tmp_path):
  from configs import pretrain as pretrain_cfg  # pylint: disable=g-import-not-at-top
  run = f'gs://{gcs.bucket}/run'
  tfds_dir = tmp_path / 'tfds'  # array_record shards cannot be written to gs:// (README)
  pretrain(gcs, run, 4, tfds_dir)
  objects = {p.split('/', 2)[2] for p in gcs.fs.find(f'{gcs.bucket}/run')}
  assert {'checkpoints/2/commit_success.txt', 'checkpoints/4/commit_success.txt',
          'metrics.jsonl', 'tokenizer.model'} <= objects
  assert any(o.startswith('tensorboard/events.out.tfevents') for o in objects)
  first = [json.loads(ln) for ln in gcs.fs.cat(f'{gcs.bucket}/run/metrics.jsonl').splitlines()]
  assert sorted(losses(first)) == [1, 2, 3, 4]

  out = pretrain(gcs, run, 6, tfds_dir)
  assert f'resumed from step 4 in {run}/checkpoints' in out
  rows = [json.loads(ln) for ln in gcs.fs.cat(f'{gcs.bucket}/run/metrics.jsonl').splitlines()]
  resumed = losses(rows)
  assert [r['step'] for r in rows if 'train/loss' in r] == [1, 2, 3, 4, 5, 6]  # no duplicates
  assert {s: resumed[s] for s in range(1, 5)} == losses(first)

  # The same 6 steps uninterrupted on local disk (in this process: same 8 devices).
  c = pretrain_cfg.get_config('tiny')
  c.data.update(builtin_documents=400, vocab_size=255, tfds_data_dir=str(tmp_path / 'tfds2'))
  c.train.update(num_steps=6, log_every=1, eval_every=1000, checkpoint_every=2)
  train.run(c, str(tmp_path / 'local'))
  assert resumed == losses(metrics_lib.read_metrics(str(tmp_path / 'local')))


def test_sweep_of_the_tiny_rl_preset_into_a_bucket(gcs):
  """launch/sweep.py: a 2×2 grid of the tiny Countdown RL preset, each run's workdir an object
  prefix; the summary names the four runs, each done at its last step."""
  root = f'gs://{gcs.bucket}/sweep'
  sweep = [sys.executable, 'launch/sweep.py']
  run = subprocess.run(
      [*sweep, 'run', f'--root={root}', '--config=configs/rl_countdown.py:tiny',
       '--sweep=rl.objective=bgpo,vrpo_ol rl.num_mc=2,4', '--', '--config.rl.num_steps=1',
       '--config.warmstart.steps=1', '--config.rl.eval_every=1000'],
      cwd=ROOT, env=gcs.env, capture_output=True, text=True, timeout=900)
  assert run.returncode == 0, run.stderr[-3000:]
  summary = subprocess.run([*sweep, 'summary', f'--root={root}'], cwd=ROOT, env=gcs.env,
                           capture_output=True, text=True, timeout=300)
  assert summary.returncode == 0, summary.stderr[-3000:]
  rows = {ln.split()[0]: ln.split()[1:3] for ln in summary.stdout.splitlines()[1:] if ln.strip()}
  assert rows == {f'rl.objective={o},rl.num_mc={n}': ['done', '1']
                  for o in ('bgpo', 'vrpo_ol') for n in (2, 4)}
  assert gcs.fs.exists(f'{gcs.bucket}/sweep/rl.objective=bgpo,rl.num_mc=2/plots/rl.png')


def test_metrics_on_objects_are_rewritten_and_truncated_on_resume(gcs):
  """No append on objects: rows are buffered and the object rewritten (at most every
  flush_seconds, and on close); a resume from step 2 drops rows logged past it."""
  workdir = f'gs://{gcs.bucket}/metrics'
  with gcs_emulator.applied(gcs.env):
    w = metrics_lib.MetricsWriter(workdir, 0, flush_seconds=3600)
    for s in (1, 2, 3):
      w.write(s, {'train/loss': float(s)})
    assert not gcs.fs.exists(f'{gcs.bucket}/metrics/metrics.jsonl')  # buffered, not appended
    w.flush()
    assert [r['step'] for r in metrics_lib.read_metrics(workdir)] == [1, 2, 3]
    w.write(4, {'train/loss': 4.0})
    w.close()
    assert [r['step'] for r in metrics_lib.read_metrics(workdir)] == [1, 2, 3, 4]
    events = gcs.fs.glob(f'{gcs.bucket}/metrics/tensorboard/events.out.tfevents*')
    assert len(events) == 1 and gcs.fs.size(events[0]) > 100  # written locally, copied up
    w = metrics_lib.MetricsWriter(workdir, 2, flush_seconds=0)  # resume from checkpoint 2
    assert [r['step'] for r in metrics_lib.read_metrics(workdir)] == [1, 2]
    w.write(3, {'train/loss': 30.0})  # flush_seconds=0: every row reaches the object
    assert metrics_lib.read_metrics(workdir)[-1] == {'step': 3, 'train/loss': 30.0}
    w.close()


def test_tokenizer_round_trips_through_a_bucket(gcs):
  with gcs_emulator.applied(gcs.env):
    tok = tokenizer_lib.Tokenizer.train(['alice has a red cat. bob has 12 dogs.'] * 50, 40,
                                        f'gs://{gcs.bucket}/tok/tokenizer.model')
    assert gcs.fs.ls(f'{gcs.bucket}/tok', detail=False) == [f'{gcs.bucket}/tok/tokenizer.model']
    back = tokenizer_lib.Tokenizer.load(f'gs://{gcs.bucket}/tok/tokenizer.model')
    assert back.encode('bob has a cat') == tok.encode('bob has a cat')


def test_emulator_url_alone_reaches_tensorstore(monkeypatch):
  """STORAGE_EMULATOR_HOST is the one variable a user sets; tensorstore gets its own from it."""
  for k in storage.emulator_env('x'):
    monkeypatch.delenv(k, raising=False)
  monkeypatch.setenv('STORAGE_EMULATOR_HOST', '127.0.0.1:9023')
  monkeypatch.setenv('TENSORSTORE_GCS_HTTP_URL', 'http://elsewhere:1')  # set by the user: kept
  storage.use_emulator_from_env()
  import os  # pylint: disable=g-import-not-at-top
  assert os.environ['TENSORSTORE_GCS_HTTP_URL'] == 'http://elsewhere:1'
  assert os.environ['GOOGLE_AUTH_TOKEN_FOR_TESTING']
  monkeypatch.delenv('TENSORSTORE_GCS_HTTP_URL')
  storage.use_emulator_from_env()
  assert os.environ['TENSORSTORE_GCS_HTTP_URL'] == 'http://127.0.0.1:9023'


def test_tfds_shards_built_locally_are_read_from_the_bucket(gcs, tmp_path):
  """array_record's writer reaches local files only: an unprepared dataset is built in a
  staging directory and copied up (`storage.prepared_builder`); its reader (google-cloud-cpp)
  reads gs://."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from dlm import data as data_lib  # pylint: disable=g-import-not-at-top
  files = data_lib.write_builtin_corpus(tmp_path / 'corpus', 200)
  remote = f'gs://{gcs.bucket}/tfds'
  make = lambda d: data_lib.TextFiles(files=files, data_dir=d)
  config = tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP)
  with gcs_emulator.applied(gcs.env):
    with pytest.raises(RuntimeError, match='open'):  # why the staging exists
      make(f'gs://{gcs.bucket}/direct').download_and_prepare(download_config=config)
    builder = storage.prepared_builder(make, remote, download_config=config)
    assert str(builder.data_dir).startswith(remote)
    shards = gcs.fs.glob(f'{gcs.bucket}/tfds/**/*.array_record-*')
    assert len(shards) == 2  # train and validation
    train_src = builder.as_data_source('train')
    docs = {data_lib.example_text(train_src[i]) for i in range(len(train_src))}
    assert storage.prepared_builder(make, remote, download_config=config).is_prepared()
  assert 150 < len(docs) <= 200
  assert docs <= set(sum((data_lib.split_documents(f.read_text()) for f in files), []))


_TURNS = '''
import os, sys, time
import jax
jax.config.update('jax_num_cpu_devices', 1)
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                           process_id=int(sys.argv[2]))
from dlm import storage
log = sys.argv[3]
for turn in range(2):  # the same name twice: each call is a barrier of its own
  with storage.process_zero_first('prepare'):
    with open(log, 'a') as f:
      f.write(f'{turn} start {jax.process_index()}\\n')
    time.sleep(1.0 if jax.process_index() == 0 else 0.0)
    with open(log, 'a') as f:
      f.write(f'{turn} end {jax.process_index()}\\n')
'''


def test_process_zero_prepares_before_the_others_enter(tmp_path):
  """The gs:// form of the data-preparation lock: two jax.distributed processes (loopback);
  process 1 enters only after process 0 has left, at every call."""
  port = gcs_emulator._free_port()  # pylint: disable=protected-access
  log = tmp_path / 'turns.log'
  env = {**gcs_emulator.os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}
  procs = [subprocess.Popen([sys.executable, '-c', _TURNS, f'127.0.0.1:{port}', str(i), str(log)],
                            cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
           for i in (1, 0)]  # process 1 starts first: it must still wait
  for p in procs:
    assert p.wait(timeout=120) == 0, p.stderr.read()[-2000:]
  lines = log.read_text().splitlines()
  assert sorted(lines) == sorted(f'{t} {e} {i}' for t in (0, 1) for e in ('start', 'end')
                                 for i in (0, 1))
  for turn in (0, 1):  # process 0 sleeps 1 s inside: without the order process 1 starts first
    assert lines.index(f'{turn} end 0') < lines.index(f'{turn} start 1')
