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
from dlm import main as main_lib
from dlm.errors import ConfigError, DlmError
from dlm import metrics as metrics_lib
from dlm import train

import signals

ROOT = Path(__file__).resolve().parents[1]


def tiny(num_steps, checkpoint_every=4, **sharding):
  c = pretrain.get_config('tiny')
  c.data.builtin_documents = 400
  c.data.vocab_size = 255  # 256 rows with the mask: the tensor=2 meshes below must divide them
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
  original = train.diffusion_objective

  def poisoned(dcfg, mask_id):
    f = original(dcfg, mask_id)

    def loss_fn(model, batch, key, j):
      obj, sums = f(model, batch, key, j)
      return obj * jnp.nan, {**sums, 'loss_sum': sums['loss_sum'] * jnp.nan}
    return loss_fn

  monkeypatch.setattr(train, 'diffusion_objective', poisoned)
  with pytest.raises(train.NonFiniteLossError, match='step 5'):
    train.run(tiny(8), str(tmp_path))
  monkeypatch.undo()
  assert ckpt_lib.Checkpointer(str(tmp_path)).latest_step() == 4
  assert losses(tmp_path) == good


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
  train.run(tiny(4), str(tmp_path))
  for f in (tmp_path / 'checkpoints' / '4' / 'params').rglob('*'):
    if f.is_file():
      f.write_bytes(b'garbage')
  with pytest.raises(ckpt_lib.CheckpointError, match='damaged'):
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


def test_resume_with_a_shape_changing_key_is_one_line_and_changes_nothing(tmp_path):
  """The workdir of a finished run, rerun as a new user would with another d_model."""
  w = tmp_path / 'run'
  train.run(tiny(4), str(w))
  before = {p: p.read_bytes() for p in w.rglob('*') if p.is_file()}
  r = _main('--config.model.d_model=96', '--config.data.builtin_documents=400', workdir=w)
  assert r.returncode == 1 and 'Traceback' not in r.stderr
  errors = [l for l in r.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 1 and 'model.d_model (64 → 96)' in errors[0]
  assert 'damaged' not in errors[0]
  assert {p: p.read_bytes() for p in w.rglob('*') if p.is_file()} == before
  # The same key changed in code: the error names it before anything is restored or written.
  c = tiny(8)
  c.model.n_layers = 3
  with pytest.raises(ckpt_lib.ConfigMismatchError, match=r'model.n_layers \(2 → 3\)'):
    train.run(c, str(w))
  assert {p: p.read_bytes() for p in w.rglob('*') if p.is_file()} == before


def test_main_prints_user_errors_as_one_line_and_keeps_tracebacks_of_bugs(monkeypatch, capsys):
  c = tiny(2)

  def user_problem(cfg, workdir):
    raise ConfigError('data.batch_size=3 must be ≥ 4')

  monkeypatch.setattr(train, 'run', user_problem)
  assert main_lib.dispatch(c, '/nonexistent') == 1
  assert capsys.readouterr().err == 'error: data.batch_size=3 must be ≥ 4\n'

  def bug(cfg, workdir):
    raise ValueError('operands could not be broadcast together')  # a shape bug: not a DlmError

  monkeypatch.setattr(train, 'run', bug)
  with pytest.raises(ValueError, match='broadcast'):
    main_lib.dispatch(c, '/nonexistent')
  assert not issubclass(ValueError, DlmError)


@pytest.mark.parametrize('preset', ['radd_small', 'radd_medium'])
def test_radd_presets_say_what_to_pass_before_any_data_work(preset, tmp_path):
  with pytest.raises(ConfigError, match='text_files.*vocab_size=50257'):
    train.run(pretrain.get_config(preset), str(tmp_path))
  assert not any(tmp_path.iterdir())  # no corpus, no tokenizer, no lock file
  c = pretrain.get_config(preset)
  c.data.update(corpus='text_files', text_files='/a.txt', vocab_size=777)
  with pytest.raises(ConfigError, match='data.vocab_size=777.*50257'):
    train.run(c, str(tmp_path))
  assert not any(tmp_path.iterdir())


def test_accelerators_compute_in_bf16_by_default(monkeypatch):
  from dlm import model as model_lib
  c = pretrain.get_config('radd_small')
  assert c.model.dtype == 'auto' and c.model.param_dtype == 'float32'
  assert model_lib.config_from(c.model).dtype == 'float32'  # this CPU
  monkeypatch.setattr(jax, 'default_backend', lambda: 'tpu')
  assert model_lib.config_from(c.model).dtype == 'bfloat16'


def test_mfu_is_model_flops_over_the_chips_peak(monkeypatch):
  from dlm import metrics as metrics_lib
  from dlm import model as model_lib
  V, d, f, layers, L = 40, 16, 48, 3, 24
  mcfg = model_lib.ModelConfig(num_embeddings=V, mask_id=V - 1, d_model=d, n_layers=layers,
                               n_heads=2, mlp_dim=f, family='llada')
  per_layer = 2 * d + 4 * d * d + 3 * d * f  # two RMSNorms, q/k/v/out, SwiGLU
  matmul_params = layers * per_layer + d + d * V  # + final norm + head (the embedding: a gather)
  want = 6.0 * matmul_params + 12.0 * layers * d * L
  assert metrics_lib.model_flops_per_token(mcfg, L) == want
  monkeypatch.setattr(metrics_lib, 'peak_flops_per_device', lambda: 2e12)
  assert metrics_lib.mfu(1000.0, want, 4) == pytest.approx(1000.0 * want / 8e12)
  monkeypatch.setattr(metrics_lib, 'peak_flops_per_device', lambda: None)  # CPU: not logged
  assert metrics_lib.mfu(1000.0, want, 4) is None


def test_sigterm_saves_the_current_step_exits_0_and_the_rerun_continues(straight, tmp_path):
  """A preempted VM gets SIGTERM: the run finishes the step in flight, checkpoints it, exits 0,
  and the same command resumes there, reproducing the uninterrupted run's losses."""
  import json
  cmd = [sys.executable, '-m', 'dlm.main', '--config=configs/pretrain.py:tiny',
         f'--workdir={tmp_path}', '--config.data.builtin_documents=400',
         '--config.data.vocab_size=255', '--config.train.num_steps=8', '--config.train.log_every=1',
         '--config.train.eval_every=1000', '--config.train.checkpoint_every=4']
  code, out, err = signals.sigterm_when(
      cmd, tmp_path, lambda lines: any(json.loads(l)['step'] >= 1 for l in lines))
  assert code == 0, err[-2000:]
  stopped = ckpt_lib.Checkpointer(str(tmp_path), read_only=True).latest_step()
  assert f'stopped by SIGTERM after step {stopped};' in out and 1 <= stopped < 8
  assert max(losses(tmp_path)) == stopped  # every step up to the checkpoint is logged
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert f'resumed from step {stopped}' in done.stdout
  assert losses(tmp_path) == straight


def test_checkpoints_by_the_clock(tmp_path):
  """train.checkpoint_minutes saves whenever that long has passed since the last save, between
  the step cadence's checkpoints (here: at every step)."""
  c = tiny(3, checkpoint_every=100)
  c.train.checkpoint_minutes = 1e-9
  train.run(c, str(tmp_path))
  assert ckpt_lib.Checkpointer(str(tmp_path), read_only=True).all_steps() == [1, 2, 3]
