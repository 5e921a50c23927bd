"""Dry run (`--config.dry_run=…`, dlm.dry_run): the configured step compiled ahead of time from
abstract inputs, per-chip bytes and a JSON line, exit code 0 (fits) / 3 (does not fit).

`local` runs on the 8 forced CPU devices of conftest; the TPU topologies need libtpu, which the
`test` extra installs (setup.py), so they run here and in CI with tiny models (seconds each).
TPU dry runs go through subprocesses: libtpu is initialised there, never in the test process.
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from configs import pretrain, rl_countdown
from dlm import dry_run
from dlm import main as main_lib
from dlm import rl
from dlm.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
KEYS = {'topology', 'chips', 'hbm_bytes', 'argument_bytes', 'temp_bytes', 'total_bytes', 'fits'}


def cli(config: str, *overrides: str, tmp_path) -> tuple[int, dict, str]:
  """(exit code, the last line as JSON, stdout) of `python -m dlm.main … --config.dry_run`."""
  p = subprocess.run([sys.executable, '-m', 'dlm.main', f'--config={ROOT / "configs" / config}',
                      f'--workdir={tmp_path / "w"}', *overrides], cwd=ROOT, capture_output=True,
                     text=True, timeout=600)
  lines = p.stdout.strip().splitlines()
  assert lines, p.stderr[-3000:]
  return p.returncode, json.loads(lines[-1]), p.stdout


def in_process(cfg, capsys) -> tuple[int, dict]:
  code = dry_run.run(cfg, '')
  return code, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_local_pretrain_fits_and_prints_per_chip_bytes(tmp_path):
  code, out, stdout = cli('pretrain.py:tiny', '--config.dry_run=local', tmp_path=tmp_path)
  assert code == 0 and out['fits'] is True
  assert KEYS <= set(out)
  assert out['topology'] == 'local' and out['chips'] == 8 and out['mode'] == 'pretrain'
  assert 0 < out['argument_bytes'] < out['total_bytes'] <= out['hbm_bytes']
  assert out['total_bytes'] >= out['argument_bytes'] + out['temp_bytes']
  for row in ('parameters', 'optimizer state', 'temporaries', 'total', 'memory'):
    assert f'  {row}' in stdout
  assert not (tmp_path / 'w').exists()  # nothing read or written: no corpus, no tokenizer


def test_over_budget_exits_3(tmp_path):
  code, out, _ = cli('pretrain.py:tiny', '--config.dry_run=local@1MB', tmp_path=tmp_path)
  assert code == 3 and out['fits'] is False and out['hbm_bytes'] == 1_000_000


def test_an_8b_model_is_compiled_without_allocating_its_weights(tmp_path):
  """LLaDA-8B pretraining: 32 GB of float32 parameters (128 GB with EMA and Adam moments) on a
  24 GB machine; the dry run's own peak is a small fraction of one copy of the weights."""
  code, out, _ = cli('pretrain.py:llada_8b', '--config.dry_run=local',
                     '--config.data.batch_size=8', '--config.data.seq_len=128', tmp_path=tmp_path)
  assert out['parameter_bytes'] * out['chips'] > 32e9  # 8.0B float32 parameters, fsdp over 8
  assert code == 3 and out['fits'] is False  # 16 GB of state per device > the host's share
  assert out['host_peak_bytes'] < 3e9


def test_host_peak_is_the_dry_runs_own_not_its_launchers():
  """A launcher holding 1 GB starts a process that reports `host_peak_bytes`: the report is that
  process's own peak (Linux's ru_maxrss would carry the launcher's 1 GB across exec)."""
  child = 'from dlm import dry_run; print(dry_run.host_peak_bytes())'
  launcher = ('import subprocess, sys, numpy as np\n'
              'held = np.ones(1 << 27)  # 1 GiB, every page touched\n'
              f'print(subprocess.run([sys.executable, "-c", {child!r}], check=True, '
              'capture_output=True, text=True).stdout.split()[-1])\n')
  out = subprocess.run([sys.executable, '-c', launcher], cwd=ROOT, check=True,
                       capture_output=True, text=True, timeout=300).stdout
  assert 10e6 < int(out.split()[-1]) < 0.8e9


@pytest.mark.parametrize('objective,overrides', [
    ('bgpo', {}),
    ('bgpo', {'rl.num_prompts': 8, 'rl.num_minibatches': 2, 'train.microbatches': 2}),
    ('vrpo_ol', {}),
    ('diffu_grpo', {'rl.inner_updates': 2, 'rl.kl_beta': 0.04}),
])
def test_rl_objectives_compile(objective, overrides, capsys):
  cfg = rl_countdown.get_config('tiny')
  cfg.update_from_flattened_dict({'dry_run': 'local', 'rl.objective': objective, **overrides})
  code, out = in_process(cfg, capsys)
  assert code == 0 and out['fits'] and out['mode'] == 'rl' and out['chips'] == 8


def test_rl_monte_carlo_samples_are_the_configured_ones(capsys):
  """The compiled update is the objective's own: VRPO-OL's temporaries grow with n_t, BGPO's
  (lax.scan over samples) do not."""
  temp = {}
  for objective in ('bgpo', 'vrpo_ol'):
    for n in (2, 8):
      cfg = rl_countdown.get_config('tiny')
      cfg.update_from_flattened_dict({'dry_run': 'local', 'rl.objective': objective,
                                      'rl.num_mc': n})
      temp[objective, n] = in_process(cfg, capsys)[1]['temp_bytes']
  assert temp['vrpo_ol', 8] > 2 * temp['vrpo_ol', 2]
  assert temp['bgpo', 8] <= 1.1 * temp['bgpo', 2]


def test_sft_step_compiles(capsys):
  cfg = rl.sft_config(rl_countdown.get_config('tiny'), '')
  cfg.unlock()
  cfg.dry_run = 'local'
  code, out = in_process(cfg, capsys)
  assert code == 0 and out['fits'] and out['mode'] == 'sft'


def test_user_errors_exit_1(tmp_path, capsys):
  cfg = pretrain.get_config('tiny')
  cfg.dry_run = 'v9-8'
  assert main_lib.dispatch(cfg, str(tmp_path)) == 1
  assert 'unknown topology' in capsys.readouterr().err
  with pytest.raises(ConfigError, match='training step'):
    dry_run.run(dict_config(mode='sample', dry_run='local'), '')
  with pytest.raises(ConfigError, match='dry_run size'):
    dry_run.parse_size('lots')


def dict_config(**kw):
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict(kw)


def test_topology_table():
  def chips(name):
    return math.prod(int(d) for d in dry_run.TOPOLOGIES[name][0].split(':')[1].split('x'))

  assert chips('v5p-8') == 4 and chips('v5p-32') == 16 and chips('v4-8') == 4  # TensorCores / 2
  assert chips('v5e-8') == 8 and chips('v6e-8') == 8 and chips('v5e-1') == 1  # chips
  assert dry_run.TOPOLOGIES['v5p-32'][:3] == ('v5p:2x2x4', 'megacore', (2, 2, 1))
  assert dry_run.TOPOLOGIES['v5e-8'][:3] == ('v5e:2x4', 'default', (2, 4, 1))
  assert dry_run.parse_size('48GB') == 48e9 and dry_run.parse_size('2GiB') == 2 << 30


def test_refusal_messages_are_parsed():
  msg = ('RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO '
         'temporaries (122.44G) exceeds available HBM (95.74G).')
  assert dry_run.parse_refusal(msg) == (int(122.44 * 2**30), int(95.74 * 2**30))
  msg = 'RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 20.50G of 15.75G hbm.'
  assert dry_run.parse_refusal(msg) == (int(20.5 * 2**30), int(15.75 * 2**30))
  assert dry_run.parse_refusal('INTERNAL: something else') is None


def test_tpu_slice_compiles_ahead_of_time(tmp_path):
  """v5e-8 from libtpu's topology description: 8 chips, bfloat16 compute, TPU memory figures."""
  code, out, stdout = cli('pretrain.py:tiny', '--config.dry_run=v5e-8', tmp_path=tmp_path)
  assert code == 0 and out['fits'] is True and out['chips'] == 8
  assert out['hbm_bytes'] == dry_run.TOPOLOGIES['v5e-8'][3]
  assert 'TPU v5 lite' in stdout and 'bfloat16 compute' in stdout


def test_tpu_refusal_is_reported_not_raised(tmp_path):
  """A step larger than one v5e chip's HBM: XLA:TPU refuses to compile; its figures come back
  with exit code 3."""
  code, out, stdout = cli('pretrain.py:tiny', '--config.dry_run=v5e-1',
                          '--config.data.batch_size=1024', '--config.data.seq_len=2048',
                          tmp_path=tmp_path)
  assert code == 3 and out['fits'] is False and out['refused'] is True
  assert out['hbm_bytes'] == int(15.75 * 2**30) and out['total_bytes'] > out['hbm_bytes']
  assert 'XLA refused to compile' in stdout and 'Traceback' not in stdout
