"""Faults: a save left unfinished by a kill is skipped, checkpoints restore onto other meshes
(pretraining and RL) with the same eval loss, jax's preemption sync point stops a multi-process
run, and the faults bench counts what it claims."""
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import orbax.checkpoint as ocp

from configs import pretrain, rl_countdown
from dlm import checkpoint as ckpt_lib
from dlm import metrics as metrics_lib
from dlm import preemption
from dlm import rl
from dlm import sharding
from dlm import train
from dlm.bench import faults

ROOT = Path(__file__).resolve().parents[1]

MESHES = {  # name: (devices, sharding section) a checkpoint written with fsdp=8 restores onto
    'fsdp=8': (None, dict(data=1, fsdp=8, tensor=1)),
    'data=1,fsdp=1,tensor=2': (2, dict(data=1, fsdp=1, tensor=2)),
    '1 device': (1, dict(data=1, fsdp=1, tensor=1)),
}


def tiny(num_steps, checkpoint_every=2, **shard):
  c = pretrain.get_config('tiny')
  c.data.builtin_documents = 400
  c.data.vocab_size = 255  # 256 rows with the mask: tensor=2 must divide them
  c.train.update(num_steps=num_steps, log_every=1, eval_every=1000,
                 checkpoint_every=checkpoint_every)
  c.sharding.update(shard)
  return c


def losses(workdir):
  return {r['step']: r['train/loss'] for r in metrics_lib.read_metrics(workdir)
          if 'train/loss' in r}


def devices(n):
  return None if n is None else jax.devices()[:n]


def test_unfinished_save_is_skipped_with_a_warning_and_the_run_resumes_exactly(tmp_path, caplog):
  """A kill during the async save of step 6 leaves `6.orbax-checkpoint-tmp` (orbax renames
  the folder only once every item is written): the rerun names it, resumes from step 4 and
  reproduces the uninterrupted run; saving step 6 again replaces the leftover."""
  straight = tmp_path / 'straight'
  train.run(tiny(8), str(straight))
  w = tmp_path / 'killed'  # the same run, as a kill during step 6's save leaves it
  shutil.copytree(straight, w)
  ckpts = w / 'checkpoints'
  shutil.rmtree(ckpts / '8')
  leftover = ckpts / '6.orbax-checkpoint-tmp'
  (ckpts / '6').rename(leftover)  # items partly written, no commit marker, not renamed
  (leftover / 'commit_success.txt').unlink()
  shutil.rmtree(leftover / 'opt')
  assert ckpt_lib.Checkpointer(str(w), read_only=True).all_steps() == [4]
  with caplog.at_level(logging.WARNING, logger='dlm.checkpoint'):
    train.run(tiny(8), str(w))
  warned = [r.getMessage() for r in caplog.records if r.name == 'dlm.checkpoint']
  assert len(warned) == 1 and '6.orbax-checkpoint-tmp' in warned[0], warned
  assert 'latest complete step is 4' in warned[0]
  assert not leftover.exists()
  assert ckpt_lib.Checkpointer(str(w), read_only=True).all_steps() == [4, 6, 8]
  assert (ckpts / '6' / 'opt').is_dir()
  assert losses(w) == losses(straight)  # bit for bit, every step logged once
  assert sorted(losses(w)) == list(range(1, 9))


def test_unfinished_step_without_commit_file_gs_style(tmp_path, caplog):
  """On gs:// orbax writes into `<step>` and marks it complete with commit_success.txt last
  (here: its CommitFileTemporaryPath on a local disk). A step without it is not listed; a
  reader leaves it alone (the run may still be writing it); a writer warns and deletes it, and
  the step is written afresh when it comes again."""
  commit_file = ocp.path.atomicity.CommitFileTemporaryPath
  c = ckpt_lib.Checkpointer(str(tmp_path), temporary_path_class=commit_file)
  for s in (1, 2):
    c.save(s, {'params': {'w': np.full(4, s, np.float32)}, 'opt': {'step': np.int32(s)}},
           '{}', {'seed': 0})
  c.wait()
  c.close()
  ckpts = tmp_path / 'checkpoints'
  assert (ckpts / '2' / 'commit_success.txt').exists()  # the marking this test relies on
  shutil.copytree(ckpts / '2', ckpts / '3')
  (ckpts / '3' / 'commit_success.txt').unlink()
  reader = ckpt_lib.Checkpointer(str(tmp_path), read_only=True, temporary_path_class=commit_file)
  assert reader.all_steps() == [1, 2] and (ckpts / '3').exists()
  with caplog.at_level(logging.WARNING, logger='dlm.checkpoint'):
    c = ckpt_lib.Checkpointer(str(tmp_path), temporary_path_class=commit_file)
  assert c.latest_step() == 2 and not (ckpts / '3').exists()  # the writer deleted it
  assert any('checkpoint 3 in' in r.getMessage() and 'latest complete step is 2' in r.getMessage()
             for r in caplog.records)
  abstract = {'params': {'w': jax.ShapeDtypeStruct((4,), np.float32)},
              'opt': {'step': jax.ShapeDtypeStruct((), np.int32)}}
  items, _ = c.restore(c.latest_step(), abstract)
  np.testing.assert_array_equal(items['params']['w'], np.full(4, 2, np.float32))
  c.save(3, {'params': {'w': np.full(4, 7, np.float32)}, 'opt': {'step': np.int32(3)}}, '{}',
         {'seed': 0})
  c.wait()
  assert c.all_steps() == [1, 2, 3] and (ckpts / '3' / 'commit_success.txt').exists()
  items, _ = c.restore(3, abstract)
  np.testing.assert_array_equal(items['params']['w'], np.full(4, 7, np.float32))
  c.close()


def _restored_everywhere(make_setup, eval_loss):
  """{mesh name: (restored items on the host, eval loss)} for every mesh in MESHES."""
  out = {}
  for name, (n, shard) in MESHES.items():
    trainer, ckpt, start, extra = make_setup(devices(n), shard)
    assert dict(trainer.mesh.shape) == {'data': shard['data'], 'fsdp': shard['fsdp'],
                                        'tensor': shard['tensor']}
    items, _ = ckpt.restore(start, trainer.abstract_items())
    ckpt.close()
    spec = jax.tree.leaves(items['params'])[0].sharding
    assert spec.mesh.size == trainer.mesh.size, name  # placed on the target mesh
    state = trainer.from_items(items)
    out[name] = (jax.device_get(items), eval_loss(trainer, state, extra))
  ref_items, ref_loss = out['fsdp=8']
  for name, (items, loss) in out.items():
    jax.tree.map(np.testing.assert_array_equal, items, ref_items)  # a restore moves, exactly
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=0, err_msg=name)
  return out


def _trainer_eval_loss(trainer, params, tokens_BxL, dcfg, seed=0):
  """The training loop's held-out loss (`train.make_eval_step`: the trainer's activation
  sharding, a fixed key) on fixed tokens."""
  shard = sharding.batch_shardings({'tokens': tokens_BxL}, trainer.mesh, trainer.rules)
  step = train.make_eval_step(trainer, dcfg, shard)
  sums = step(params, sharding.global_batch({'tokens': tokens_BxL}, shard),
              jax.random.key(seed))
  return float(sums['loss_sum'] / sums['tokens'])


def test_pretraining_checkpoint_restores_onto_other_meshes(tmp_path):
  """Written with fsdp=8; restored by the resume path (train.setup) with
  data=1,fsdp=1,tensor=2 on 2 devices and on 1 device: identical arrays, eval loss within 1e-5."""
  cfg = tiny(3, checkpoint_every=3, fsdp=8)
  train.run(cfg, str(tmp_path))

  def make_setup(devs, shard):
    c, start, data, trainer, ckpt, _ = train.setup(tiny(3, checkpoint_every=3, **shard),
                                                   str(tmp_path), devs)
    assert start == 3
    return trainer, ckpt, start, (np.asarray(data.eval_batches[0]['tokens']), c.diffusion)

  def eval_loss(trainer, state, extra):
    return _trainer_eval_loss(trainer, state.ema, *extra)

  out = _restored_everywhere(make_setup, eval_loss)
  assert len(out) == 3 and np.isfinite(out['1 device'][1])


def test_rl_checkpoint_restores_onto_other_meshes(tmp_path):
  """The same for RL (rl.build: the RL resume path), on the policy's parameters."""
  def rl_cfg(**shard):
    c = rl_countdown.get_config('tiny')
    c.rl.update(num_steps=2, eval_every=100, checkpoint_every=2)
    c.model.update(num_embeddings=50, mask_id=48)  # 48 pieces + mask, padded: tensor=2 divides
    c.sharding.update(shard)
    return c

  rl.run(rl_cfg(data=1, fsdp=8, tensor=1), str(tmp_path))
  dcfg = SimpleNamespace(loss='lambda_dce', schedule='loglinear', eps=1e-3)

  def make_setup(devs, shard):
    s = rl.build(rl_cfg(**shard), str(tmp_path), devs)
    assert s.start == 2
    rows = np.random.default_rng(0).integers(0, s.trainer.mcfg.mask_id, (8, s.enc.P + s.enc.R))
    return s.trainer, s.ckpt, s.start, rows.astype(np.int32)

  def eval_loss(trainer, state, tokens):
    return _trainer_eval_loss(trainer, state.params, tokens, dcfg)

  _restored_everywhere(make_setup, eval_loss)


def test_jax_preemption_sync_point_stops_a_multiprocess_run(monkeypatch):
  """With jax's preemption service (multi-process) the Stopper leaves SIGTERM to jax's
  notifier and stops at the step jax's sync point names; SIGINT stays its own."""
  from jax.experimental import multihost_utils
  monkeypatch.setattr(preemption, 'preemption_service', lambda: True)
  calls = []

  def sync_point(step):
    calls.append(step)
    return len(calls) == 3

  monkeypatch.setattr(multihost_utils, 'reached_preemption_sync_point', sync_point)
  before = signal.getsignal(signal.SIGTERM)
  with preemption.Stopper() as stopper:
    assert signal.getsignal(signal.SIGTERM) is before
    assert signal.getsignal(signal.SIGINT) == stopper._handle  # pylint: disable=protected-access
    answers = [stopper.poll(s)[0] for s in (41, 42, 43)]
  assert answers == [False, False, True] and stopper.name == 'SIGTERM'
  assert calls == [41, 42, 43]  # the training steps, as orbax reports them on each save
  monkeypatch.setattr(preemption, 'preemption_service', lambda: False)
  with preemption.Stopper() as stopper:  # one process: its own handler
    assert signal.getsignal(signal.SIGTERM) == stopper._handle  # pylint: disable=protected-access


def test_bench_counts_mismatches_and_lost_steps():
  """faults.compare: a step of the uninterrupted run missing after the restarts is lost, a step
  whose values differ (any bit) or that only the interrupted run logged is a mismatch."""
  straight = [{'step': 1, 'a': 1.0}, {'step': 2, 'a': 2.0}, {'step': 2, 'e': 5.0},
              {'step': 3, 'a': 3.0}]
  assert faults.compare(straight, list(straight)) == (0, 0)
  resumed = [{'step': 1, 'a': 1.0}, {'step': 2, 'a': 2.0 + 1e-12}, {'step': 3, 'a': 3.0},
             {'step': 4, 'a': 4.0}]
  assert faults.compare(straight, resumed) == (2, 1)  # step 2's 'a' and step 4; step 2's 'e'
  assert faults.compare(straight, resumed + [{'step': 2, 'e': 5.0}]) == (2, 0)
  # Timing keys are not results; two logs of one step (a replay) count as a mismatch.
  assert faults.compare([{'step': 1, 'a': 1.0, 'rl/rollout_seconds': 1.0}],
                        [{'step': 1, 'a': 1.0, 'rl/rollout_seconds': 9.0}]) == (0, 0)
  assert faults.compare(straight, straight + [straight[0]]) == (1, 0)


WORKER = '''
import sys, time
from pathlib import Path
import jax
pid, port, ready = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
jax.distributed.initialize(f'localhost:{port}', num_processes=2, process_id=pid)
from dlm import preemption
with preemption.Stopper() as stopper:
  for step in range(1, 2000):
    time.sleep(0.02)
    stop, _ = stopper.poll(1000 + step)  # the training step of a run resumed from 1000
    if step == 10:
      (ready / str(pid)).touch()
    if stop:
      print(f'stopped at {1000 + step} by {stopper.name} service={stopper.service}', flush=True)
      break
'''


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
  """Two jax.distributed processes on CPU: SIGTERM to one reaches jax's preemption notifier
  (the Stopper leaves it SIGTERM), and both stop at the one step its sync point names."""
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  procs = [subprocess.Popen([sys.executable, '-c', WORKER, str(i), str(port), str(tmp_path)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for i in range(2)]
  deadline = time.time() + 120
  while time.time() < deadline and not all((tmp_path / str(i)).exists() for i in range(2)):
    assert all(p.poll() is None for p in procs), procs[0].communicate()[1][-2000:]
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)
  outs = [p.communicate(timeout=120) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outs]
  lines = [o.strip().splitlines()[-1] for o, _ in outs]
  assert lines[0] == lines[1] and lines[0].endswith('by SIGTERM service=True'), lines
