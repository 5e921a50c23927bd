"""launch/: the TPU VM launcher (dry runs, and its commands run against a fake gcloud that runs
the remote commands in a local bash) and sweeps (expansion, names, a real local sweep of the
tiny pretraining preset with a failing run, the summary table and CSV)."""
import csv
import io
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from launch import sweep, tpu_vm  # noqa: E402 pylint: disable=g-import-not-at-top

TRICKY = '--config.data.text_files=/my docs/it\'s "x".txt'  # spaces and both quotes
DLM_ARGS = ['--config=configs/pretrain.py:tiny', '--workdir=gs://bucket/runs/a', TRICKY]
ZONE = '--zone=us-east5-a'


@pytest.fixture(autouse=True)
def _project(monkeypatch):
  """gcloud's own environment variable for the project: no test asks a real gcloud."""
  monkeypatch.setenv('CLOUDSDK_CORE_PROJECT', 'env-project')


def _lines(capsys, argv, module=tpu_vm):
  rc = module.main(argv)
  out, err = capsys.readouterr()
  return rc, out.splitlines(), err


def _shell_words(script: str) -> list[str]:
  """A shell's words and operators (`;`, `&&`, `(`) of a command line."""
  lex = shlex.shlex(script, posix=True, punctuation_chars=True)
  lex.whitespace_split = True
  return list(lex)


def _command(argv: list[str]) -> str:
  return next(a.split('=', 1)[1] for a in argv if a.startswith('--command='))


def test_up_dry_run_prints_pasteable_gcloud_commands(capsys):
  rc, lines, _ = _lines(capsys, ['up', 'dlm-pod', ZONE, '--accelerator_type=v5p-32', '--spot',
                                 '--project=my-proj', '--delete_after', '--dry_run', '--',
                                 *DLM_ARGS])
  assert rc == 0
  cmds = [shlex.split(ln) for ln in lines]
  assert [c[:5] for c in cmds] == [
      ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create'],
      ['git', '-C', str(ROOT), 'archive', '--format=tar.gz'],
      ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp'],
      *[['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh']] * 3,
      ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete']]
  create, _, scp, setup, start, follow, delete = cmds
  assert {'dlm-pod', ZONE, '--project=my-proj', '--accelerator-type=v5p-32',
          '--version=v2-alpha-tpuv5', '--spot'} <= set(create)
  assert '--worker=all' in scp and '--worker=all' in setup and '--worker=all' in start
  assert '--worker=0' in follow and '--quiet' in delete
  assert 'pip install' in _command(setup) and '.[tpu]' in _command(setup)
  # one level of shell unquoting on the worker gives back every dlm.main argument intact
  remote = _shell_words(_command(start))
  assert remote[remote.index('dlm.main') + 1:][:3] == DLM_ARGS
  assert 'DLM_DISTRIBUTED=1' in remote and not any('coordinator' in t for t in remote)
  assert 'tail' in _command(follow) and '--pid=' in _command(follow)


def test_create_v5e_is_spelled_v5litepod(capsys):
  rc, lines, _ = _lines(capsys, ['create', 'small', ZONE, '--accelerator_type=v5e-16',
                                 '--preemptible', '--dry_run'])
  assert rc == 0 and len(lines) == 1
  argv = shlex.split(lines[0])
  assert '--accelerator-type=v5litepod-16' in argv and '--version=v2-alpha-tpuv5-lite' in argv
  assert '--preemptible' in argv and '--spot' not in argv


@pytest.mark.parametrize('argv, message', [
    (['create', 'x', ZONE, '--accelerator_type=v5p-30'], 'multiple of 8'),
    (['create', 'x', ZONE, '--accelerator_type=tpu-32'], 'GENERATION-SIZE'),
    (['create', 'x', ZONE, '--accelerator_type=v6e-12'], 'counts chips'),
    (['create', 'x', '--accelerator_type=v5p-8'], 'required: --zone'),
    (['create', 'x', '--zone=us-east5', '--accelerator_type=v5p-8'], 'is not a zone'),
    (['create', 'Bad_Name', ZONE, '--accelerator_type=v5p-8'], 'lowercase'),
    (['create', 'x', ZONE, '--accelerator_type=v5p-8', '--spot', '--preemptible'], 'exclude'),
    (['run', 'x', ZONE], 'no dlm.main arguments'),
    (['run', 'x', ZONE, '--', '--config=configs/pretrain.py:tiny'], '--workdir'),
    (['run', 'x', ZONE, '--', '--config=configs/pretrain.py:tiny', '--workdir=/tmp/w'],
     'gs://'),
    (['run', 'x', ZONE, '--', '--config=/elsewhere/c.py', '--workdir=gs://b/w'],
     'inside the repository'),
    (['run', 'x', ZONE, '--', '--config=configs/pretrain.py:tiny', '--workdir=gs://b/w',
      '--config.train.nm=3'], 'unknown config key config.train.nm'),
    (['delete', 'x', ZONE, '--', '--workdir=gs://b/w'], 'takes no dlm.main arguments'),
])
def test_bad_arguments_are_one_line_errors(capsys, argv, message):
  rc, lines, err = _lines(capsys, argv + ['--dry_run'] if '--' not in argv else
                          argv[:argv.index('--')] + ['--dry_run'] + argv[argv.index('--'):])
  assert rc == 1 and lines == []  # nothing printed to paste, nothing run
  assert err.startswith('error: ') and message in err and err.count('\n') == 1


def test_cli_exit_code_and_message():
  p = subprocess.run([sys.executable, 'launch/tpu_vm.py', 'create', 'x', ZONE,
                      '--accelerator_type=v5p-12', '--dry_run'], cwd=ROOT, capture_output=True,
                     text=True, timeout=60)
  assert p.returncode == 1 and p.stdout == ''
  assert p.stderr.startswith('error: --accelerator_type=v5p-12')


def _fake_cloud(tmp_path, monkeypatch):
  """A `gcloud` on PATH that logs its arguments, copies scp'd files into a fake worker home and
  runs ssh commands there with bash; the worker's `uv` and venv Python are fakes too."""
  home, bin_dir = tmp_path / 'home', tmp_path / 'bin'
  (home / '.local' / 'bin').mkdir(parents=True)
  bin_dir.mkdir()
  (bin_dir / 'gcloud').write_text(f'''#!{sys.executable}
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
if args[0] == 'config':  # config get-value project
  print(os.environ.get('FAKE_PROJECT', ''))
  sys.exit(0)
with open(os.environ['FAKE_GCLOUD_LOG'], 'a') as f:
  f.write(json.dumps(args) + '\\n')
if args[3] == os.environ.get('FAKE_GCLOUD_FAIL'):
  sys.exit(7)
home = os.environ['HOME']
if args[3] == 'scp':
  shutil.copy(args[4], os.path.join(home, args[5].split(':', 1)[1]))
elif args[3] == 'ssh':
  cmd = next(a.split('=', 1)[1] for a in args if a.startswith('--command='))
  sys.exit(subprocess.run(['bash', '-c', cmd], cwd=home).returncode)
''')
  (home / 'fake_python').write_text(f'''#!{sys.executable}
import json, os, sys
with open(os.path.join(os.environ['HOME'], 'worker.json'), 'w') as f:
  json.dump({{'argv': sys.argv[1:], 'cwd': os.getcwd(),
             'distributed': os.environ.get('DLM_DISTRIBUTED')}}, f)
print('worker says: step 1 | loss 1.0', flush=True)
sys.exit(int(os.environ.get('FAKE_RUN_RC', '0')))
''')
  (home / '.local' / 'bin' / 'uv').write_text('''#!/bin/bash
echo "$PWD $*" >> "$HOME/uv.log"
if [ "$1" = venv ]; then
  mkdir -p "$HOME/dlm-venv/bin" && cp "$HOME/fake_python" "$HOME/dlm-venv/bin/python"
fi
''')
  for f in (bin_dir / 'gcloud', home / 'fake_python', home / '.local' / 'bin' / 'uv'):
    f.chmod(0o755)
  monkeypatch.setenv('PATH', f'{bin_dir}{os.pathsep}{os.environ["PATH"]}')
  monkeypatch.setenv('HOME', str(home))
  monkeypatch.setenv('FAKE_GCLOUD_LOG', str(tmp_path / 'gcloud.log'))
  monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path))
  return home, lambda: [json.loads(ln) for ln in (tmp_path / 'gcloud.log').read_text().splitlines()]


def test_up_runs_the_printed_commands(tmp_path, monkeypatch, capfd):
  home, calls = _fake_cloud(tmp_path, monkeypatch)
  argv = ['up', 'test-vm', ZONE, '--accelerator_type=v4-8', '--delete_after']
  assert tpu_vm.main(argv + ['--dry_run', '--', *DLM_ARGS]) == 0
  printed = [shlex.split(ln) for ln in capfd.readouterr().out.splitlines()]
  monkeypatch.setenv('FAKE_RUN_RC', '3')
  assert tpu_vm.main(argv + ['--', *DLM_ARGS]) == 3  # worker 0's exit code
  out = capfd.readouterr().out
  assert 'worker says: step 1' in out  # worker 0's log streamed
  assert [['gcloud', *c] for c in calls()] == [p for p in printed if p[0] == 'gcloud']
  assert calls()[-1][3] == 'delete'  # deleted after the failed run, as asked
  assert (home / 'dlm' / 'setup.py').is_file()  # the archive arrived and was unpacked
  assert f'{home}/dlm pip install --python {home}/dlm-venv/bin/python -e .[tpu]' in (
      home / 'uv.log').read_text()
  worker = json.loads((home / 'worker.json').read_text())
  assert worker == {'argv': ['-m', 'dlm.main', *DLM_ARGS], 'cwd': str(home / 'dlm'),
                    'distributed': '1'}


def test_up_keeps_a_vm_it_did_not_create(tmp_path, monkeypatch, capfd):
  _, calls = _fake_cloud(tmp_path, monkeypatch)
  monkeypatch.setenv('FAKE_GCLOUD_FAIL', 'create')
  assert tpu_vm.main(['up', 'test-vm', ZONE, '--accelerator_type=v4-8', '--delete_after',
                      '--', *DLM_ARGS]) == 7
  assert [c[3] for c in calls()] == ['create']
  assert 'gcloud exited with 7' in capfd.readouterr().err


def test_project_comes_from_gcloud_or_is_an_error(tmp_path, monkeypatch, capsys):
  _fake_cloud(tmp_path, monkeypatch)
  monkeypatch.delenv('CLOUDSDK_CORE_PROJECT', raising=False)
  argv = ['delete', 'test-vm', ZONE, '--dry_run']
  monkeypatch.setenv('FAKE_PROJECT', 'configured-proj')
  rc, lines, _ = _lines(capsys, argv)
  assert rc == 0 and '--project=configured-proj' in shlex.split(lines[0])
  monkeypatch.setenv('FAKE_PROJECT', '')
  rc, lines, err = _lines(capsys, argv)
  assert rc == 1 and lines == [] and err.startswith('error: no GCP project')
  rc, lines, err = _lines(capsys, argv + ['--project=Bad Project'])
  assert rc == 1 and 'not a GCP project id' in err


def test_parse_sweep_is_the_cartesian_product():
  runs = sweep.parse_sweep("rl.objective=bgpo,vrpo_ol --config.rl.num_mc=4,16")
  assert runs == [{'rl.objective': 'bgpo', 'rl.num_mc': '4'},
                  {'rl.objective': 'bgpo', 'rl.num_mc': '16'},
                  {'rl.objective': 'vrpo_ol', 'rl.num_mc': '4'},
                  {'rl.objective': 'vrpo_ol', 'rl.num_mc': '16'}]
  names = sweep.run_names(runs)
  assert names[0] == 'rl.objective=bgpo,rl.num_mc=4' and len(set(names)) == 4
  for bad in ('rl.objective', 'rl.objective=', 'a=1,,2', 'a=1 a=2', '', 'a b=1'):
    with pytest.raises(tpu_vm.LaunchError):
      sweep.parse_sweep(bad)


def test_run_names_are_path_safe_and_distinct():
  runs = [{'init.checkpoint': 'gs://b/x y'}, {'init.checkpoint': 'gs://b/x_y'},
          {'task.chat_template': "it's {prompt}" * 20}, {}]
  names = sweep.run_names(runs)
  assert len(set(names)) == 4 and names[-1] == 'base'
  assert all(re.fullmatch(r'[A-Za-z0-9._=,+-]{1,120}', n) for n in names)
  with pytest.raises(tpu_vm.LaunchError, match='twice'):
    sweep.run_names([{'a': '1'}, {'a': '1'}])


def test_sweep_file_form(tmp_path):
  f = tmp_path / 's.py'
  f.write_text("def sweep():\n  return [{'rl.objective': 'bgpo', 'rl.num_mc': 4},\n"
               "          {'task.num_numbers': (3,), 'rl.kl_beta': 0.01, 'x.flag': True}]\n")
  assert sweep.load_sweep_file(str(f)) == [
      {'rl.objective': 'bgpo', 'rl.num_mc': '4'},
      {'task.num_numbers': '(3,)', 'rl.kl_beta': '0.01', 'x.flag': 'True'}]
  f.write_text('sweep = 3\n')
  with pytest.raises(tpu_vm.LaunchError, match='sweep()'):
    sweep.load_sweep_file(str(f))
  f.write_text('def sweep():\n  return {"a": 1}\n')
  with pytest.raises(tpu_vm.LaunchError, match='list'):
    sweep.load_sweep_file(str(f))


def test_sweep_dry_runs_local_and_tpu(tmp_path, capsys):
  common = ['run', '--config=configs/rl_countdown.py:tiny',
            '--sweep=rl.objective=bgpo,vrpo_ol rl.num_mc=4,16', '--dry_run']
  rc, lines, _ = _lines(capsys, [*common, f'--root={tmp_path}/r', '--',
                                 '--config.rl.num_steps=1'], sweep)
  assert rc == 0 and len(lines) == 4 and not (tmp_path / 'r').exists()
  cmds = [shlex.split(ln) for ln in lines]
  assert all(c[1:3] == ['-m', 'dlm.main'] and c[-1] == '--config.rl.num_steps=1' for c in cmds)
  workdirs = {tpu_vm.flag_value(c, 'workdir') for c in cmds}
  assert workdirs == {f'{tmp_path}/r/rl.objective={o},rl.num_mc={n}'
                      for o in ('bgpo', 'vrpo_ol') for n in (4, 16)}
  rc, lines, _ = _lines(capsys, [*common, '--root=gs://bucket/sw', '--tpu=my-pod', ZONE], sweep)
  assert rc == 0 and len(lines) == 4
  for ln in lines:
    c = shlex.split(ln)
    name = c[c.index('--') - 1].removeprefix('--log=')
    assert c[1:4] == [str(ROOT / 'launch' / 'tpu_vm.py'), 'run', 'my-pod'] and ZONE in c
    assert tpu_vm.flag_value(c, 'workdir') == f'gs://bucket/sw/{name}'
  for argv, message in [([*common, f'--root={tmp_path}/r', '--tpu=my-pod', ZONE], 'gs://'),
                        ([*common[:2], '--sweep=rl.objectivee=bgpo', f'--root={tmp_path}/r'],
                         'unknown config key config.rl.objectivee'),
                        ([*common, f'--root={tmp_path}/r', '--', '--workdir=/x'], 'sets it')]:
    rc, lines, err = _lines(capsys, argv, sweep)
    assert rc == 1 and lines == [] and message in err and err.startswith('error: ')
  assert not (tmp_path / 'r').exists()


def _cli(*args):
  return subprocess.run([sys.executable, 'launch/sweep.py', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=600)


def test_local_sweep_runs_reports_failures_and_summarises(tmp_path):
  spec = tmp_path / 'lr_sweep.py'
  spec.write_text("def sweep():\n  return [{'train.lr': 0.003}, {'train.lr': 0.001},\n"
                  "          {'diffusion.loss': 'nope'}]\n")
  root = tmp_path / 'sw'
  run = ['run', f'--root={root}', '--config=configs/pretrain.py:tiny', f'--sweep_file={spec}',
         '--', '--config.train.num_steps=2']
  p = _cli(*run)
  assert p.returncode == 1, p.stderr[-2000:]
  assert "failed: diffusion.loss=nope: error: diffusion.loss='nope'" in p.stderr  # dlm's line
  assert '2 of 3 runs finished' in p.stderr
  state = {r['name']: r for r in json.loads((root / 'sweep.json').read_text())['runs']}
  assert {n: r['status'] for n, r in state.items()} == {
      'train.lr=0.003': 'done', 'train.lr=0.001': 'done', 'diffusion.loss=nope': 'failed'}
  last = {}
  for name in ('train.lr=0.003', 'train.lr=0.001'):
    rows = [json.loads(ln) for ln in (root / name / 'metrics.jsonl').read_text().splitlines()]
    last[name] = [r for r in rows if 'train/loss' in r][-1]['train/loss']
  assert last['train.lr=0.003'] != last['train.lr=0.001']

  csv_path = tmp_path / 'summary.csv'
  p = _cli('summary', f'--root={root}', f'--csv={csv_path}')
  assert p.returncode == 0, p.stderr
  table = {ln.split()[0]: ln.split() for ln in p.stdout.splitlines()}
  assert table['run'] == ['run', 'status', 'step', 'train/loss', 'eval/loss']
  for name, loss in last.items():
    assert table[name][:3] == [name, 'done', '2'] and float(table[name][3]) == pytest.approx(loss)
  assert table['diffusion.loss=nope'][1:] == ['failed', '-', '-', '-']
  rows = {r['run']: r for r in csv.DictReader(io.StringIO(csv_path.read_text()))}
  for name, loss in last.items():
    assert float(rows[name]['train/loss']) == loss and rows[name]['step'] == '2'
  assert rows['train.lr=0.003']['train.lr'] == '0.003'
  assert rows['diffusion.loss=nope']['train/loss'] == ''

  before = {n: (root / n / 'metrics.jsonl').read_text() for n in last}
  spec.write_text("def sweep():\n  return [{'train.lr': 0.003}, {'train.lr': 0.001}]\n")
  p = _cli(*run)  # again, without the failing run: both finished runs are skipped
  assert p.returncode == 0, p.stderr[-2000:]
  assert all(f'skip {n}: finished' in p.stderr for n in last) and '[1/' not in p.stderr
  assert before == {n: (root / n / 'metrics.jsonl').read_text() for n in last}
  state = json.loads((root / 'sweep.json').read_text())['runs']
  assert [r['status'] for r in state] == ['done', 'done', 'failed']  # the earlier run stays


def test_tpu_sweep_on_gcs_goes_through_tpu_vm_and_summarises(tmp_path, monkeypatch):
  """--tpu with a gs:// root: each run is a `tpu_vm.py run` (fake gcloud, fake worker writing
  its metrics to the bucket), sweep.json lives in the bucket, summary reads it back from there."""
  import gcs_emulator  # pylint: disable=g-import-not-at-top  # gs:// on a loopback emulator
  home, calls = _fake_cloud(tmp_path, monkeypatch)
  (home / 'dlm').mkdir()
  worker = home / 'dlm-venv' / 'bin' / 'python'
  worker.parent.mkdir(parents=True)
  worker.write_text(f'''#!{sys.executable}
import json, sys
from etils import epath
args = dict(a[2:].split('=', 1) for a in sys.argv[3:])
row = {{'step': 3, 'rl/reward_mean': float(args['config.rl.num_mc']) / 8}}
(epath.Path(args['workdir']) / 'metrics.jsonl').write_text(json.dumps(row) + '\\n')
''')
  worker.chmod(0o755)
  with gcs_emulator.running() as gcs:
    root = f'gs://{gcs.bucket}/sweep'
    p = subprocess.run([sys.executable, 'launch/sweep.py', 'run', f'--root={root}',
                        '--config=configs/rl_countdown.py:tiny', '--sweep=rl.num_mc=2,4',
                        '--tpu=test-vm', ZONE], cwd=ROOT, env=gcs.env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert [(c[3], c[5]) for c in calls()] == [('ssh', '--zone=us-east5-a')] * 4
    state = json.loads(gcs.fs.cat(f'{gcs.bucket}/sweep/sweep.json'))
    assert {r['name']: r['status'] for r in state['runs']} == {'rl.num_mc=2': 'done',
                                                               'rl.num_mc=4': 'done'}
    p = subprocess.run([sys.executable, 'launch/sweep.py', 'summary', f'--root={root}',
                        f'--csv={root}/summary.csv'], cwd=ROOT, env=gcs.env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    table = {ln.split()[0]: ln.split()[1:] for ln in p.stdout.splitlines()}
    assert table['rl.num_mc=2'] == ['done', '3', '0.25'] and table['rl.num_mc=4'][2] == '0.5'
    rows = list(csv.DictReader(io.StringIO(gcs.fs.cat(f'{gcs.bucket}/sweep/summary.csv')
                                           .decode())))
    assert [(r['rl.num_mc'], float(r['rl/reward_mean'])) for r in rows] == [('2', 0.25),
                                                                              ('4', 0.5)]
