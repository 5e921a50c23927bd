"""End-to-end pretraining: exact resume, sharding equivalence, resharding restore, bad input."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import pretrain
from dlm import checkpoint as ckpt_lib
from dlm import metrics as metrics_lib
from dlm import train

ROOT = Path(__file__).resolve().parents[1]


def tiny(num_steps, checkpoint_every=4, **sharding):
  c = pretrain.get_config('tiny')
  c.data.builtin_documents = 400
  c.train.update(num_steps=num_steps, log_every=1, eval_every=1000,
                 checkpoint_every=checkpoint_every)
  c.sharding.update(sharding)
  return c


def losses(workdir):
  rows = [r for r in metrics_lib.read_metrics(workdir) if 'train/loss' in r]
  steps = [r['step'] for r in rows]
  assert steps == sorted(set(steps)), f'duplicate or unordered steps: {steps}'
  return {r['step']: r['train/loss'] for r in rows}


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  """One uninterrupted 8-step run on 8 devices (fsdp=8)."""
  w = tmp_path_factory.mktemp('straight')
  train.run(tiny(8), str(w))
  return losses(w)


def test_resume_is_bit_exact_and_metrics_are_not_duplicated(straight, tmp_path):
  train.run(tiny(4), str(tmp_path))
  assert ckpt_lib.Checkpointer(str(tmp_path)).latest_step() == 4
  train.run(tiny(8), str(tmp_path))
  resumed = losses(tmp_path)
  assert [resumed[s] for s in range(5, 9)] == [straight[s] for s in range(5, 9)]
  # A run killed after logging step 8 but before its checkpoint: rerun replays 5..8 exactly once.
  shutil.rmtree(tmp_path / 'checkpoints' / '8')
  train.run(tiny(8), str(tmp_path))
  assert losses(tmp_path) == resumed


def test_sharding_equivalence(tmp_path):
  runs = {
      '1 device': dict(devices=jax.devices()[:1], sharding={}),
      'fsdp=8': dict(devices=None, sharding=dict(fsdp=8)),
      'data=2,fsdp=2,tensor=2': dict(devices=None, sharding=dict(data=2, fsdp=2, tensor=2)),
  }
  out = {}
  for name, r in runs.items():
    w = tmp_path / name.replace(',', '_').replace('=', '').replace(' ', '')
    train.run(tiny(5, checkpoint_every=100, **r['sharding']), str(w), devices=r['devices'])
    out[name] = losses(w)
  ref = out['1 device']
  assert sorted(ref) == [1, 2, 3, 4, 5]
  for name, l in out.items():
    np.testing.assert_allclose([l[s] for s in ref], [ref[s] for s in ref], rtol=1e-5,
                               err_msg=name)


def test_restore_onto_a_different_mesh(straight, tmp_path):
  train.run(tiny(4), str(tmp_path))  # saved from an fsdp=8 mesh
  train.run(tiny(8, data=2, fsdp=2, tensor=2), str(tmp_path))
  l = losses(tmp_path)
  np.testing.assert_allclose([l[s] for s in range(5, 9)], [straight[s] for s in range(5, 9)],
                             rtol=1e-5)


def test_non_finite_loss_stops_without_touching_good_checkpoints(tmp_path, monkeypatch):
  train.run(tiny(4), str(tmp_path))
  good = losses(tmp_path)
  original = train.pretrain_loss

  def poisoned(dcfg, mask_id):
    f = original(dcfg, mask_id)

    def loss_fn(model, tokens, key, j):
      obj, sums = f(model, tokens, key, j)
      return obj * jnp.nan, {**sums, 'loss_sum': sums['loss_sum'] * jnp.nan}
    return loss_fn

  monkeypatch.setattr(train, 'pretrain_loss', poisoned)
  with pytest.raises(train.NonFiniteLossError, match='step 5'):
    train.run(tiny(8), str(tmp_path))
  monkeypatch.undo()
  assert ckpt_lib.Checkpointer(str(tmp_path)).latest_step() == 4
  assert losses(tmp_path) == good


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
  train.run(tiny(4), str(tmp_path))
  for f in (tmp_path / 'checkpoints' / '4' / 'state').rglob('*'):
    if f.is_file():
      f.write_bytes(b'garbage')
  with pytest.raises(ckpt_lib.CheckpointError, match='could not be restored'):
    train.run(tiny(8), str(tmp_path))


def _main(*args, workdir):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  return subprocess.run([sys.executable, '-m', 'dlm.main', '--config=configs/pretrain.py:tiny',
                         f'--workdir={workdir}', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def test_cli_rejects_unknown_config_key(tmp_path):
  r = _main('--config.no_such_key=1', workdir=tmp_path)
  assert r.returncode != 0
  assert 'no_such_key' in r.stderr and 'valid keys under config: data, diffusion' in r.stderr
  r = _main('--config.train.lrr=1', workdir=tmp_path)
  assert r.returncode != 0 and 'lrr' in r.stderr and 'warmup_steps' in r.stderr


def test_cli_reports_missing_text_file(tmp_path):
  missing = tmp_path / 'nope.txt'
  r = _main('--config.data.corpus=text_files', f'--config.data.text_files={missing}',
            workdir=tmp_path / 'w')
  assert r.returncode != 0
  assert str(missing) in r.stderr and 'Traceback' not in r.stderr


def test_bad_values_are_clear_errors(tmp_path):
  c = tiny(2)
  c.diffusion.loss = 'elbo'
  with pytest.raises(ValueError, match='lambda_dce'):
    train.run(c, str(tmp_path))
  c = tiny(2)
  c.train.microbatches = 3
  with pytest.raises(ValueError, match='microbatches'):
    train.run(c, str(tmp_path))
  c = tiny(2, data=3)
  with pytest.raises(ValueError, match='devices'):
    train.run(c, str(tmp_path))
