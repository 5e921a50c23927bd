"""The RL pipeline end to end on the `tiny` preset: exact resume (also after SIGKILL),
on-policy objective identities in the logs, objectives and off-policy paths, clear errors."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import rl_countdown
from dlm import metrics as metrics_lib
from dlm import rl
from dlm.tasks import countdown

ROOT = Path(__file__).resolve().parents[1]
TIMING = ('rl/rollout_seconds', 'rl/update_seconds')


def tiny(**over):
  c = rl_countdown.get_config('tiny')
  for k, v in over.items():
    section, key = k.split('.')
    c[section][key] = v
  return c


def rows(workdir):
  out = [{k: v for k, v in r.items() if k not in TIMING} for r in metrics_lib.read_metrics(workdir)]
  steps = [(r['step'], tuple(sorted(r))) for r in out]
  assert len(steps) == len(set(steps)), 'a step was logged twice'
  return out


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  w = tmp_path_factory.mktemp('rl_straight')
  rl.run(tiny(), str(w))
  return w


def test_log_has_the_contract_metrics_and_plots(straight):
  r = metrics_lib.read_metrics(straight)
  evals = [x for x in r if 'eval/accuracy' in x]
  assert [x['step'] for x in evals] == [0, 2, 4]
  train = [x for x in r if 'rl/reward_mean' in x]
  assert [x['step'] for x in train] == [1, 2, 3, 4]
  for x in train:
    assert 0 <= x['rl/accuracy'] <= 1 and 0 <= x['rl/reward_mean'] <= 1
    # On-policy BGPO: d_j = 0 so R_lb = A, and group advantages have zero mean.
    assert abs(x['rl/objective']) < 1e-5
  assert (straight / 'plots' / 'rl.png').stat().st_size > 1000


def test_resume_reproduces_the_uninterrupted_run(straight, tmp_path):
  rl.run(tiny(**{'rl.num_steps': 2}), str(tmp_path))
  rl.run(tiny(), str(tmp_path))
  assert rows(tmp_path) == rows(straight)


def test_sigkill_mid_run_then_rerun_reproduces_the_metrics(straight, tmp_path):
  cmd = [sys.executable, '-m', 'dlm.main', '--config=configs/rl_countdown.py:tiny',
         f'--workdir={tmp_path}']
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  metrics = tmp_path / 'metrics.jsonl'
  deadline = time.time() + 240
  # Checkpoints are written asynchronously: wait until step 2's is finalized (orbax renames
  # its temporary folder to `2`) and step 3 is logged, so the kill lands mid-way to step 4.
  while time.time() < deadline and proc.poll() is None:
    if ((tmp_path / 'checkpoints' / '2').is_dir() and metrics.exists() and
        any(json.loads(l)['step'] >= 3 for l in metrics.read_text().split('\n') if l.strip())):
      break
    time.sleep(0.02)
  assert proc.poll() is None, 'the run finished before it could be killed'
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert 'resumed RL from step 2' in done.stdout
  assert rows(tmp_path) == rows(straight)


def synthetic_batch(setup, n):
  """n responses (the SFT targets of training problems) with non-zero, non-centred advantages."""
  sup = setup.enc.supervised(np.arange(n))
  adv = np.linspace(-1.0, 2.0, n).astype(np.float32)
  return setup.learner.batch(sup['tokens'], sup['attend'], adv, jax.random.key(5))


@pytest.mark.parametrize('over', [
    {'rl.objective': 'bgpo', 'rl.num_minibatches': 2, 'rl.num_prompts': 4},
    {'rl.objective': 'vrpo_ol', 'rl.num_minibatches': 2, 'rl.num_prompts': 4},
    {'rl.objective': 'diffu_grpo', 'rl.inner_updates': 2, 'rl.kl_beta': 0.04},
])
def test_off_policy_first_update_sees_theta_equal_theta_old(over, tmp_path):
  """ℓ_old (or log p_old) is computed before the first update from the stored per-response
  keys; at θ = θ_old the objective must then be exactly −mean(A) of the rows it sees — which
  fails if the old and new terms were evaluated on different masks."""
  setup = rl.build(tiny(**over), str(tmp_path))
  learner, trainer = setup.learner, setup.trainer
  n = learner.responses
  batch = synthetic_batch(setup, n)
  state = trainer.init_state()
  old = np.asarray(learner.old_terms(state.params, batch))
  if over['rl.objective'] == 'diffu_grpo':
    b = {**batch, 'iteration': np.zeros((n,), np.int32), 'logp_old_BxT': old[0],
         'logp_ref_BxT': old[0]}
    rows = np.arange(n)
  else:
    rows = np.arange(n).reshape(2, -1)[0]
    b = jax.tree.map(lambda x: x[rows], {**batch, 'ell_old_BxN': old})
  _, m = learner.step(state, b)
  np.testing.assert_allclose(m['objective'], -batch['adv_B'][rows].mean(), rtol=1e-5,
                             atol=1e-6)
  assert m['grad_norm'] > 0


@pytest.mark.parametrize('over', [
    {'rl.num_minibatches': 2, 'rl.num_prompts': 4},
    {'rl.objective': 'diffu_grpo', 'rl.inner_updates': 2, 'rl.kl_beta': 0.04},
])
def test_off_policy_runs_complete_and_checkpoint(over, tmp_path):
  last = rl.run(tiny(**{'rl.num_steps': 3, 'rl.eval_every': 100, 'rl.checkpoint_every': 3,
                        **over}), str(tmp_path))
  assert np.isfinite(last['rl/objective'])
  assert sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir()) == [3]


def test_paper_preset_without_checkpoint_names_the_way_forward(tmp_path):
  with pytest.raises(ValueError, match='rl_countdown.py:cpu'):
    rl.run(rl_countdown.get_config('paper'), str(tmp_path))


def test_bad_rl_values_are_clear_errors(tmp_path):
  with pytest.raises(ValueError, match='group_size'):
    rl.run(tiny(**{'rl.group_size': 1}), str(tmp_path))
  with pytest.raises(ValueError, match='objective'):
    rl.run(tiny(**{'rl.objective': 'ppo'}), str(tmp_path))
  with pytest.raises(ValueError, match='problem_fraction'):
    rl.run(tiny(**{'warmstart.disjoint': True}), str(tmp_path))
  with pytest.raises(ValueError, match='data-parallel'):
    rl.run(tiny(**{'rl.num_minibatches': 2}), str(tmp_path))  # 4 rows over 8 devices


def test_problem_split_partitions_at_random_when_disjoint():
  ws, rl_rows = rl.problem_split(tiny(**{'warmstart.disjoint': True,
                                         'warmstart.problem_fraction': 0.3}), 1000)
  assert len(ws) == 300 and np.intersect1d(ws, rl_rows).size == 0
  np.testing.assert_array_equal(np.union1d(ws, rl_rows), np.arange(1000))
  # Not a positional split: later (rarer, harder) problems land on both sides.
  assert 0.4 < np.mean(ws >= 500) < 0.6
  ws, rl_rows = rl.problem_split(tiny(**{'warmstart.problem_fraction': 0.3}), 1000)
  np.testing.assert_array_equal(ws, np.arange(300))
  np.testing.assert_array_equal(rl_rows, np.arange(1000))


def test_demo_error_replaces_a_seeded_fraction_of_demonstrations(tmp_path):
  def decoded(cfg):
    enc = rl.build(cfg, str(tmp_path)).enc
    return enc, [enc.completion(np.concatenate([enc.train_ids[i], row]))
                 for i, row in enumerate(enc.targets())]

  enc, clean = decoded(tiny(**{'warmstart.demo_error': 0.0}))
  assert all(countdown.reward(c, p.numbers, p.target) == 1.0 for c, p in zip(clean, enc.train))
  enc, noisy = decoded(tiny(**{'warmstart.demo_error': 0.5}))
  lazy = [c == countdown.lazy_answer(p) != countdown.compact_solution(p)
          for c, p in zip(noisy, enc.train)]
  assert 0.35 < np.mean(lazy) < 0.65
  assert all(c == countdown.compact_solution(p) for c, p, l in zip(noisy, enc.train, lazy)
             if not l and c != countdown.lazy_answer(p))
  with pytest.raises(ValueError, match='demo_error'):
    rl.build(tiny(**{'warmstart.demo_error': 1.0}), str(tmp_path))
