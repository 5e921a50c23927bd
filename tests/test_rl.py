"""The RL pipeline end to end on the `tiny` presets of Countdown AND Sudoku (one code path):
exact resume (also after SIGKILL), objective identities in the logs, off-policy paths, reward
errors, loading from the workdir alone, the config check on resume, clear errors."""
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

from configs import eval as eval_configs
from configs import rl_countdown, rl_sudoku, sample as sample_configs
from dlm import evaluate
from dlm import generate
from dlm import metrics as metrics_lib
from dlm import rl
from dlm import sft
from dlm import tasks
from dlm import train as train_lib
from dlm import workdir as workdir_lib
from dlm.errors import ConfigError, ConfigMismatchError
from dlm.tasks import countdown, sudoku

import signals

ROOT = Path(__file__).resolve().parents[1]
TIMING = ('rl/rollout_seconds', 'rl/update_seconds')
CONFIGS = {'countdown': rl_countdown, 'sudoku': rl_sudoku}


def tiny(task='countdown', **over):
  c = CONFIGS[task].get_config('tiny')
  for k, v in over.items():
    section, key = k.split('.')
    c[section][key] = v
  return c


def rows(workdir):
  out = [{k: v for k, v in r.items() if k not in TIMING} for r in metrics_lib.read_metrics(workdir)]
  steps = [(r['step'], tuple(sorted(r))) for r in out]
  assert len(steps) == len(set(steps)), 'a step was logged twice'
  return out


def snapshot(root: Path) -> dict:
  return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
          for p in root.rglob('*') if p.is_file()}


@pytest.fixture(scope='module', params=sorted(CONFIGS))
def straight(request, tmp_path_factory):
  """One uninterrupted tiny run per task, shared by the tests of this module (read only)."""
  w = tmp_path_factory.mktemp(f'rl_{request.param}')
  rl.run(tiny(request.param), str(w))
  return request.param, w


def test_log_has_the_contract_metrics_and_plots(straight):
  task, w = straight
  r = metrics_lib.read_metrics(w)
  evals = [x for x in r if 'eval/accuracy' in x]
  assert [x['step'] for x in evals] == [0, 2, 4]
  assert all(0 <= x['eval/reward_mean'] <= 1 for x in evals)
  train = [x for x in r if 'rl/reward_mean' in x]
  assert [x['step'] for x in train] == [1, 2, 3, 4]
  for x in train:
    assert 0 <= x['rl/accuracy'] <= 1 and 0 <= x['rl/reward_mean'] <= 1
    assert x['rl/reward_errors'] == 0
    # On-policy BGPO: d_j = 0 so R_lb = A, and group advantages have zero mean.
    assert abs(x['rl/objective']) < 1e-5
  assert (w / 'plots' / 'rl.png').stat().st_size > 1000
  # The warm start is an SFT run of the one training loop, in its own workdir.
  ws = metrics_lib.read_metrics(w / 'warmstart')
  assert [x['step'] for x in ws if 'train/loss' in x] == [1, 2, 4]
  assert any('eval/loss' in x for x in ws)


def test_resume_reproduces_the_uninterrupted_run(straight, tmp_path):
  task, w = straight
  rl.run(tiny(task, **{'rl.num_steps': 2}), str(tmp_path))
  rl.run(tiny(task), str(tmp_path))
  assert rows(tmp_path) == rows(w)


def test_resume_with_a_changed_key_stops_and_changes_nothing(straight, tmp_path):
  task, w = straight
  before = snapshot(w)
  with pytest.raises(ConfigMismatchError, match=r'rl.num_mc \(2 → 3\)'):
    rl.run(tiny(task, **{'rl.num_mc': 3, 'rl.num_steps': 6}), str(w))
  assert snapshot(w) == before


def test_sample_mode_reads_an_rl_workdir_and_writes_only_samples(straight):
  task, w = straight
  before = snapshot(w)
  s = sample_configs.get_config()
  s.sampler.update(gen_length=16, steps=16, block_length=8)
  s.prompts, s.num_samples, s.batch_size, s.output = ('',), 2, 2, 'samples_test.jsonl'
  records = generate.run(s, str(w))
  assert len(records) == 2 and all(r['step'] == 4 for r in records)
  after = snapshot(w)
  assert set(after) - set(before) == {'samples_test.jsonl'}
  assert {k: v for k, v in after.items() if k != 'samples_test.jsonl'} == before
  (w / 'samples_test.jsonl').unlink()


def test_sft_starts_from_a_checkpoint_alone(straight, tmp_path):
  """SFT (the one training loop) initialised from another run's parameters, tokenizer and
  architecture: with lr 0 the saved parameters equal the source's exactly."""
  task, w = straight
  cfg = rl.sft_config(tiny(task), str(tmp_path))
  cfg.model.d_model = 48  # ignored: the checkpoint decides the architecture
  cfg.init.checkpoint = str(w)
  cfg.train.update(lr=0.0, num_steps=1, checkpoint_every=1, eval_every=1)
  before = snapshot(w)
  train_lib.run(cfg, str(tmp_path / 'sft'))
  src, out = workdir_lib.load(w), workdir_lib.load(tmp_path / 'sft')
  assert out.mcfg == src.mcfg and out.config['model'] == src.config['model']
  assert (tmp_path / 'sft' / 'tokenizer.model').read_bytes() == (w / 'tokenizer.model').read_bytes()
  jax.tree.map(np.testing.assert_array_equal, out.params, src.params)
  assert snapshot(w) == before


def test_eval_mode_reproduces_the_rl_evaluation(straight, tmp_path):
  """configs/eval.py on the RL workdir, with that run's task settings, decodes the same held-out
  problems with the same code: the accuracy and mean reward the RL loop logged at its last step.
  Batched differently (5 prompts a call, the last batch padded), the completions are the same."""
  task_name, w = straight
  rl_cfg = tiny(task_name)
  c = eval_configs.task_eval(eval_configs.base_config(), rl_cfg, rl_cfg.task.train_size)
  c.init.checkpoint, c.eval.batch_size = str(w), rl_cfg.eval_sampler.batch_size
  r = evaluate.run(c, str(tmp_path / 'a'))
  last = [x for x in metrics_lib.read_metrics(w) if 'eval/accuracy' in x][-1]
  assert last['step'] == r['step'] == 4
  assert r['accuracy'] == last['eval/accuracy']
  np.testing.assert_allclose(r['reward_mean'], last['eval/reward_mean'], rtol=1e-6)
  rows = [json.loads(l) for l in (tmp_path / 'a' / 'eval_samples.jsonl').read_text().splitlines()]
  task, _, held_out = sft.task_problems(c, tmp_path / 'a')
  assert len(rows) == r['n'] == len(held_out) == rl_cfg.task.test_size
  for row, p in zip(rows, held_out):
    assert row['reward'] == pytest.approx(task.reward(row['completion'], p))
    assert row['answer'] == task.answer(row['completion'])
  c.eval.batch_size = 5
  evaluate.run(c, str(tmp_path / 'b'))
  assert (tmp_path / 'b' / 'eval_samples.jsonl').read_text() == (
      tmp_path / 'a' / 'eval_samples.jsonl').read_text()


def test_sigkill_mid_run_then_rerun_reproduces_the_metrics(straight, tmp_path):
  task, w = straight
  if task != 'countdown':
    return  # one task suffices: the resume path is task-independent (tested above for both)
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
  assert rows(tmp_path) == rows(w)


def test_sigterm_saves_the_current_step_and_the_rerun_reproduces_the_run(straight, tmp_path):
  task, w = straight
  if task != 'countdown':
    return  # the stop path is task-independent
  cmd = [sys.executable, '-m', 'dlm.main', '--config=configs/rl_countdown.py:tiny',
         f'--workdir={tmp_path}']
  code, out, err = signals.sigterm_when(cmd, tmp_path,
                                        lambda lines: any('rl/reward_mean' in l for l in lines))
  assert code == 0, err[-2000:]
  step = int(out.split('RL: stopped by SIGTERM after step ')[1].split(';')[0])
  assert 1 <= step < 4  # stopped mid-run, at the step in flight: its checkpoint is the latest
  assert workdir_lib.latest_config(tmp_path)[0] == step
  assert max(r['step'] for r in rows(tmp_path) if 'rl/reward_mean' in r) == step
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert f'resumed RL from step {step}' in done.stdout
  assert rows(tmp_path) == rows(w)


def test_reward_errors_are_counted_and_score_zero(tmp_path, monkeypatch):
  original = tasks.get('sudoku').reward
  calls = []

  def flaky(completion, problem):
    calls.append(1)
    if len(calls) % 2:
      raise RuntimeError('a reward bug')
    return original(completion, problem)

  monkeypatch.setattr(tasks.get('sudoku'), 'reward', flaky)
  rl.run(tiny('sudoku', **{'rl.num_steps': 2, 'rl.eval_every': 100}), str(tmp_path))
  train = [x for x in metrics_lib.read_metrics(tmp_path) if 'rl/reward_errors' in x]
  assert [x['rl/reward_errors'] for x in train] == [4.0, 4.0]  # 8 rollouts a step, every 2nd


def synthetic_batch(setup, n):
  """n responses (demonstrations of training problems) with non-zero, non-centred advantages."""
  problems = setup.train[:n]
  ids, attend = setup.enc.prompts(problems)
  resp = setup.enc.responses([setup.task.demonstration(p) for p in problems])
  ex = setup.enc.examples(ids, attend, resp)
  adv = np.linspace(-1.0, 2.0, n).astype(np.float32)
  return setup.learner.batch(ex['tokens'], ex['attend'], adv, jax.random.key(5))


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
  state = trainer.state_from_params(setup.init_params)
  old = np.asarray(learner.old_terms(state.params, batch))
  if over['rl.objective'] == 'diffu_grpo':
    b = {**batch, 'iteration': np.zeros((n,), np.int32), 'logp_old_BxT': old[0],
         'logp_ref_BxT': old[0]}
    idx = np.arange(n)
  else:
    idx = np.arange(n).reshape(2, -1)[0]
    b = jax.tree.map(lambda x: x[idx], {**batch, 'ell_old_BxN': old})
  _, m = learner.step(state, b)
  np.testing.assert_allclose(m['objective'], -batch['adv_B'][idx].mean(), rtol=1e-5,
                             atol=1e-6)
  assert m['grad_norm'] > 0


@pytest.mark.parametrize('over', [
    # Off-policy BGPO whose θ drifts far from θ_old within each rollout batch: the second
    # mini-batch update starts after an unclipped step at a huge learning rate.
    {'rl.num_minibatches': 2, 'rl.num_prompts': 4, 'train.lr': 0.3, 'train.clip_norm': 0.0},
    {'rl.objective': 'diffu_grpo', 'rl.inner_updates': 2, 'rl.kl_beta': 0.04},
])
def test_off_policy_runs_complete_and_checkpoint(over, tmp_path):
  last = rl.run(tiny(**{'rl.num_steps': 3, 'rl.eval_every': 100, 'rl.checkpoint_every': 3,
                        **over}), str(tmp_path))
  assert np.isfinite(last['rl/objective']) and np.isfinite(last['rl/grad_norm'])
  assert sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir()) == [3]


def test_paper_preset_without_checkpoint_names_the_way_forward(tmp_path):
  with pytest.raises(ConfigError, match='rl_countdown.py:cpu'):
    rl.run(rl_countdown.get_config('paper'), str(tmp_path))


def test_bad_rl_values_are_clear_errors(tmp_path):
  with pytest.raises(ConfigError, match='group_size'):
    rl.run(tiny(**{'rl.group_size': 1}), str(tmp_path))
  with pytest.raises(ConfigError, match='objective'):
    rl.run(tiny(**{'rl.objective': 'ppo'}), str(tmp_path))
  with pytest.raises(ConfigError, match='problem_fraction'):
    rl.run(tiny(**{'warmstart.disjoint': True}), str(tmp_path))
  with pytest.raises(ConfigError, match='data-parallel'):
    rl.run(tiny(**{'rl.num_minibatches': 2}), str(tmp_path))  # 4 rows over 8 devices
  with pytest.raises(ConfigError, match='task.name'):
    rl.run(tiny(**{'task.name': 'chess'}), str(tmp_path))
  with pytest.raises(ConfigError, match='demo_error'):
    rl.run(tiny(**{'warmstart.demo_error': 1.0}), str(tmp_path))
  assert not any(tmp_path.iterdir())  # every check ran before any work


def test_problem_split_partitions_at_random_when_disjoint():
  c = tiny(**{'warmstart.disjoint': True, 'warmstart.problem_fraction': 0.3})
  ws, rl_rows = sft.problem_split(c.warmstart, c.seed, 1000)
  assert len(ws) == 300 and np.intersect1d(ws, rl_rows).size == 0
  np.testing.assert_array_equal(np.union1d(ws, rl_rows), np.arange(1000))
  # Not a positional split: later (rarer, harder) problems land on both sides.
  assert 0.4 < np.mean(ws >= 500) < 0.6
  c = tiny(**{'warmstart.problem_fraction': 0.3})
  ws, rl_rows = sft.problem_split(c.warmstart, c.seed, 1000)
  np.testing.assert_array_equal(ws, np.arange(300))
  np.testing.assert_array_equal(rl_rows, np.arange(1000))


@pytest.mark.parametrize('task_name', sorted(CONFIGS))
def test_demo_error_replaces_a_seeded_fraction_of_demonstrations(task_name, tmp_path):
  def demos(demo_error):
    cfg = rl.sft_config(tiny(task_name, **{'warmstart.demo_error': demo_error}), str(tmp_path))
    task, train, _ = sft.task_problems(cfg, tmp_path)
    return task, train, sft.demonstrations(cfg, task, train, np.arange(len(train)))

  task, train, clean = demos(0.0)
  assert all(task.reward(c, p) == 1.0 for c, p in zip(clean, train))
  _, _, noisy = demos(0.5)
  lazy = [c == sft.LAZY[task_name](p) != task.demonstration(p) for c, p in zip(noisy, train)]
  assert 0.35 < np.mean(lazy) < 0.65
  assert all(c == task.demonstration(p) for c, p, l in zip(noisy, train, lazy) if not l)
  # The lazy demonstrator is imperfect but scored above zero.
  scores = [task.reward(sft.LAZY[task_name](p), p) for p in train[:50]]
  assert 0 < np.mean(scores) < 1


def test_lazy_demonstrators_by_hand():
  cd = tasks.get('countdown')
  p = countdown.Problem((16, 1, 13), 3)
  assert sft.LAZY['countdown'](p) == '<answer>16+1+13</answer>'
  assert cd.reward(sft.LAZY['countdown'](p), p) == 0.1  # 30 ≠ 3: right numbers, wrong value
  q = countdown.Problem((2, 3, 4), 9)
  assert cd.reward(sft.LAZY['countdown'](q), q) == 1.0  # the sum happens to be the target
  puzzle = sudoku.Puzzle('3102200002100320', '3142243142131324')
  assert sft.LAZY['sudoku'](puzzle) == '<answer>3112211112111321</answer>'
  # Blanks (positions 2, 5, 6, 7, 8, 11, 12, 15) get '1'; the solution has 1 at 7 and 12 only.
  assert tasks.get('sudoku').reward(sft.LAZY['sudoku'](puzzle), puzzle) == 2 / 8
