"""Multi-process runs: each process reads its own block of every global batch, and 2 processes ×
4 CPU devices (launch/local.sh, loopback) train exactly as 1 process × 8 devices — pretraining
and RL. The launcher itself (device split, failure, SIGTERM) is checked with a stand-in python."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from configs import pretrain
from dlm import data
from dlm import metrics as metrics_lib
from dlm.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / 'launch' / 'local.sh'
SEQ, BATCH, STREAMS = 32, 8, 4


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  """200 distinct documents, their tokenizer and tfds splits."""
  root = tmp_path_factory.mktemp('mp_text')
  words = 'apple river stone cloud tiger lemon piano forest candle rocket'.split()
  rng = np.random.default_rng(0)
  docs = [f'doc {i}: ' + ' '.join(rng.choice(words, rng.integers(3, 12))) + '.'
          for i in range(200)]
  (root / 'docs.txt').write_text('\n\n'.join(docs) + '\n')
  cfg = pretrain.get_config('tiny').data
  cfg.update(corpus='text_files', text_files=str(root / 'docs.txt'))
  return data.prepare(cfg, root / 'work')


def _stream_documents(batches, rows_per_stream, eos_id, tok):
  """Complete documents of each input stream: stream s owns rows [s·r, (s+1)·r) of every
  batch, and its rows in order are one packed token stream."""
  docs = set()
  for s in range(batches[0].shape[0] // rows_per_stream):
    stream = np.concatenate([b[s * rows_per_stream:(s + 1) * rows_per_stream].reshape(-1)
                             for b in batches]).tolist()
    cuts = [i for i, t in enumerate(stream) if t == eos_id]
    docs |= {tok.decode(stream[a + 1:b]) for a, b in zip(cuts, cuts[1:])}
  return docs


def test_two_processes_read_disjoint_halves_of_the_global_batch(corpus):
  tok, train, held_out = corpus
  kw = dict(seq_len=SEQ, global_batch=BATCH, seed=3, streams=STREAMS)
  one = data.make_train_iterator(train, tok, process_index=0, process_count=1, **kw)
  whole = [next(one) for _ in range(10)]
  halves = []
  for p in (0, 1):
    it = data.make_train_iterator(train, tok, process_index=p, process_count=2, **kw)
    halves.append([next(it) for _ in range(10)])
  for g, a, b in zip(whole, *halves):
    assert a.shape == b.shape == (BATCH // 2, SEQ)
    np.testing.assert_array_equal(np.concatenate([a, b]), g)  # together: the global batch
  r = BATCH // STREAMS
  seen = [_stream_documents(h, r, tok.eos_id, tok) for h in halves]
  texts = {data.example_text(train[i]) for i in range(len(train))}
  assert len(seen[0]) > 10 and len(seen[1]) > 10 and not seen[0] & seen[1]
  assert seen[0] | seen[1] <= texts
  # held-out batches: one ordered stream, each process its half
  ev = dict(seq_len=SEQ, global_batch=BATCH, num_batches=2)
  full = data.eval_batches(held_out, tok, process_index=0, process_count=1, **ev)
  parts = [data.eval_batches(held_out, tok, process_index=p, process_count=2, **ev)
           for p in (0, 1)]
  for g, a, b in zip(full, *parts):
    np.testing.assert_array_equal(np.concatenate([a, b]), g)
  with pytest.raises(ConfigError, match='stream count'):
    data.make_train_iterator(train, tok, process_index=0, process_count=8, **kw)


def test_resuming_a_process_share_is_exact(corpus):
  tok, train, _ = corpus
  make = lambda: data.make_train_iterator(train, tok, seq_len=SEQ, global_batch=BATCH, seed=1,
                                          streams=STREAMS, process_index=1, process_count=2)
  it = make()
  for _ in range(3):
    next(it)
  state = data.iterator_state(it)
  expected = [next(it) for _ in range(3)]
  restored = make()
  next(restored)
  data.restore_iterator(restored, state)
  assert all((a == b).all() for a, b in zip(expected, [next(restored) for _ in range(3)]))


def test_stream_count_ignores_process_and_device_counts():
  assert data.input_streams(16) == 16 and data.input_streams(512) == 64
  assert data.input_streams(24) == 8


# ------------------------------------------------------------------------------------------------
# launch/local.sh with a stand-in interpreter (no JAX): device split, failures, signals


FAKE = textwrap.dedent('''\
    #!/usr/bin/env bash
    # Stand-in for python: records its arguments and devices, then acts as FAKE_MODE says.
    id=${!#}; id=${id#--process_id=}
    echo "$id $JAX_NUM_CPU_DEVICES $*" >> "$FAKE_LOG"
    case $FAKE_MODE in
      ok) echo "out $id"; echo "err $id" >&2 ;;
      fail1) if [ "$id" = 1 ]; then sleep 1; exit 3; fi; exec sleep 30 ;;
      term) trap 'echo "term $id" >> "$FAKE_LOG"; exit 0' TERM; echo ready >> "$FAKE_LOG"
            for _ in $(seq 300); do sleep 0.1; done ;;
    esac
    ''')


def _fake(tmp_path, mode, **env):
  script = tmp_path / 'fake_python'
  script.write_text(FAKE)
  script.chmod(0o755)
  log = tmp_path / 'log'
  full = {**os.environ, 'DLM_PYTHON': str(script), 'FAKE_LOG': str(log), 'FAKE_MODE': mode,
          **env}
  full.pop('JAX_NUM_CPU_DEVICES', None)
  return full, log


def test_launcher_splits_devices_and_separates_logs(tmp_path):
  env, log = _fake(tmp_path, 'ok', DLM_LOCAL_DEVICES='8')
  done = subprocess.run([str(LAUNCH), '2', '--', '--config=x.py', '--workdir=w'], env=env,
                        capture_output=True, text=True, timeout=60)
  assert done.returncode == 0, done.stderr
  lines = sorted(log.read_text().splitlines())
  assert [ln.split()[:2] for ln in lines] == [['0', '4'], ['1', '4']]
  port = {ln.split('--coordinator_address=127.0.0.1:')[1].split()[0] for ln in lines}
  assert len(port) == 1 and port.pop().isdigit()
  assert all('--num_processes=2' in ln and '--config=x.py --workdir=w' in ln for ln in lines)
  assert done.stdout.splitlines() == ['out 0']  # only process 0 on stdout
  assert sorted(done.stderr.splitlines()) == ['[1] err 1', '[1] out 1', 'err 0']
  # default: the device count the environment gives one process, split
  (tmp_path / 'b').mkdir()
  env, log = _fake(tmp_path / 'b', 'ok', XLA_FLAGS='--xla_force_host_platform_device_count=6')
  env.pop('DLM_LOCAL_DEVICES', None)
  assert subprocess.run([str(LAUNCH), '3', '--', 'a'], env=env, capture_output=True,
                        timeout=60).returncode == 0
  assert {ln.split()[1] for ln in log.read_text().splitlines()} == {'2'}
  bad = subprocess.run([str(LAUNCH), '3', '--', 'a'], env={**env, 'DLM_LOCAL_DEVICES': '8'},
                       capture_output=True, text=True, timeout=60)
  assert bad.returncode == 2 and 'do not split over 3' in bad.stderr
  usage = subprocess.run([str(LAUNCH), 'two', '--', 'a'], env=env, capture_output=True,
                         text=True, timeout=60)
  assert usage.returncode == 2 and 'usage' in usage.stderr


def test_launcher_stops_all_when_one_fails_and_returns_its_code(tmp_path):
  env, log = _fake(tmp_path, 'fail1', DLM_LOCAL_DEVICES='2')
  t0 = time.time()
  done = subprocess.run([str(LAUNCH), '2', '--', 'a'], env=env, capture_output=True, text=True,
                        timeout=60)
  assert done.returncode == 3 and time.time() - t0 < 20  # process 0 was stopped, not awaited
  assert 'exited with code 3' in done.stderr


def test_launcher_forwards_sigterm_to_every_process(tmp_path):
  env, log = _fake(tmp_path, 'term', DLM_LOCAL_DEVICES='2')
  proc = subprocess.Popen([str(LAUNCH), '2', '--', 'a'], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 30
  while (not log.exists() or log.read_text().count('ready') < 2) and time.time() < deadline:
    time.sleep(0.1)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=30) == 0
  assert sorted(ln for ln in log.read_text().splitlines() if ln.startswith('term')) == [
      'term 0', 'term 1']


# ------------------------------------------------------------------------------------------------
# The real thing: 2 processes × 4 devices against 1 process × 8 devices


# Imported by every process of the RL runs (PYTHONPATH): a reward that depends on the sampled
# text, so the tiny policy gets non-zero, varied rewards (and a few that raise) and the updates
# do something; the stock reward scores the untrained policy 0 everywhere.
SITE = textwrap.dedent('''\
    import hashlib
    from dlm.tasks import countdown

    def reward(self, completion, problem):
      h = hashlib.sha1(completion.encode()).digest()[0]
      if h % 5 == 0:
        raise ValueError('a raising reward')
      return (h % 11) / 10

    countdown.CountdownTask.reward = reward
    ''')


def _run(args, workdir, processes, env=None):
  env = {**os.environ, **(env or {}), 'JAX_PLATFORMS': 'cpu'}
  env.pop('JAX_NUM_CPU_DEVICES', None)
  cmd = [sys.executable, '-m', 'dlm.main'] if processes == 1 else [str(LAUNCH), str(processes),
                                                                   '--']
  if processes > 1:
    env['DLM_LOCAL_DEVICES'] = '8'
  done = subprocess.run(cmd + args + [f'--workdir={workdir}', '--v=1'], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  records = [json.loads(ln.split('dlm-rows ', 1)[1]) for ln in done.stderr.splitlines()
             if 'dlm-rows ' in ln]
  return metrics_lib.read_metrics(workdir), records


def _check_shares(one, two, what, steps):
  """Each process of `two` read a distinct half of every global batch, and together the rows
  of `one`'s global batch (by digest, in order)."""
  for s in steps:
    (whole,) = [r for r in one if r['what'] == what and r['step'] == s]
    parts = sorted((r for r in two if r['what'] == what and r['step'] == s),
                   key=lambda r: r['rows'])
    n = len(whole['digests'])
    assert [(r['process'], r['rows']) for r in parts] == [(0, [0, n // 2]), (1, [n // 2, n])]
    assert not set(parts[0]['digests']) & set(parts[1]['digests'])
    assert parts[0]['digests'] + parts[1]['digests'] == whole['digests'], (what, s)


def _close(one, two, keys, rtol=1e-5, atol=0.0):
  for a, b in zip(one, two, strict=True):
    assert a['step'] == b['step']
    for k in keys:
      if k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=rtol, atol=atol, err_msg=f'{k} {a["step"]}')


def test_pretraining_two_processes_equal_one(tmp_path):
  """… also across a 2-process resume: steps 1–3, checkpoint (every process's data position),
  then 4–5 in a second launch."""
  args = ['--config=configs/pretrain.py:tiny', '--config.train.log_every=1',
          '--config.data.builtin_documents=400']
  m1, r1 = _run(args + ['--config.train.num_steps=5'], tmp_path / 'one', 1)
  _, first = _run(args + ['--config.train.num_steps=3'], tmp_path / 'two', 2)
  m2, second = _run(args + ['--config.train.num_steps=5'], tmp_path / 'two', 2)
  assert [m['step'] for m in m1 if 'train/loss' in m] == [1, 2, 3, 4, 5]
  assert sorted({r['step'] for r in second}) == [4, 5]  # resumed, not restarted
  _close(m1, [m for m in m2 if m['step'] != 3 or 'eval/loss' not in m],
         ['train/loss', 'train/grad_norm', 'eval/loss'])
  _check_shares(r1, first + second, 'pretrain', range(1, 6))
  assert (tmp_path / 'two' / 'checkpoints' / '5').is_dir()


def test_rl_two_processes_equal_one(tmp_path):
  site = tmp_path / 'site'
  site.mkdir()
  (site / 'sitecustomize.py').write_text(SITE)
  env = {'PYTHONPATH': os.pathsep.join([str(site), str(ROOT)])}
  args = ['--config=configs/rl_countdown.py:tiny', '--config.rl.num_steps=3']
  m1, r1 = _run(args, tmp_path / 'one', 1, env)
  m2, r2 = _run(args, tmp_path / 'two', 2, env)
  rl_rows = [m for m in m1 if 'rl/reward_mean' in m]
  assert [m['step'] for m in rl_rows] == [1, 2, 3]
  assert all(0 < m['rl/reward_mean'] < 1 and m['rl/grad_norm'] > 0 for m in rl_rows)
  assert sum(m['rl/reward_errors'] for m in rl_rows) > 0  # counted over both processes' rows
  _close(m1, m2, ['rl/reward_mean', 'rl/accuracy', 'rl/reward_errors', 'rl/grad_norm',
                  'eval/accuracy', 'eval/reward_mean'])
  _close(m1, m2, ['rl/objective'], atol=1e-6)  # on-policy BGPO: ≈ 0 (mean advantage 0)
  _check_shares(r1, r2, 'sft', range(1, 5))  # the warm start
  _check_shares(r1, r2, 'rl', range(1, 4))  # rollouts: prompt and sampled response per row
  assert (tmp_path / 'two' / 'checkpoints' / '3').is_dir()
  ws1, ws2 = (metrics_lib.read_metrics(tmp_path / w / 'warmstart') for w in ('one', 'two'))
  _close(ws1, ws2, ['train/loss', 'eval/loss'])


def test_rl_groups_split_over_processes_is_one_line_before_any_work(tmp_path):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'DLM_LOCAL_DEVICES': '8'}
  done = subprocess.run(
      [str(LAUNCH), '2', '--', '--config=configs/rl_countdown.py:tiny',
       '--config.rl.num_prompts=1', '--config.rl.group_size=8', f'--workdir={tmp_path / "w"}'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 1
  errors = [ln for ln in done.stderr.splitlines() if ln.startswith('error:')]  # process 0's
  assert len(errors) == 1 and errors[0].startswith(
      'error: each of 2 processes holds 4 of the 8 responses'), done.stderr[-2000:]
  assert not (tmp_path / 'w' / 'warmstart').exists()  # no warm start was trained


def test_process_flags_without_a_coordinator_are_one_line(tmp_path):
  done = subprocess.run([sys.executable, '-m', 'dlm.main', '--config=configs/pretrain.py:tiny',
                         f'--workdir={tmp_path / "w"}', '--num_processes=2', '--process_id=1'],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert done.returncode == 1 and done.stderr.startswith('error: --num_processes / --process_id')
  assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / 'w').exists()
