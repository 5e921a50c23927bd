#!/usr/bin/env python3
"""Sweeps: one dlm config over a grid (or a list) of `--config.<key>=<value>` overrides, each run
in its own workdir under one root (local or gs://), and a table of their final metrics.

  python launch/sweep.py run --root=/tmp/sweep --config=configs/rl_countdown.py:cpu \\
      --sweep='rl.objective=bgpo,vrpo_ol rl.num_mc=4,16' [-- --config.rl.num_steps=20]
  python launch/sweep.py run --root=... --config=... --sweep_file=my_sweep.py
  python launch/sweep.py summary --root=/tmp/sweep [--csv=/tmp/sweep.csv] [--metrics=k1,k2]

--sweep takes space-separated axes `key=v1,v2,…` and runs their Cartesian product; a sweep file
defines `sweep()` returning a list of {key: value} dicts, one per run. Each run's workdir is
ROOT/<name>, the name spelled from its overrides (`rl.objective=bgpo,rl.num_mc=4`). `run` checks
every key first (dlm.main's message), writes ROOT/sweep.json (the runs: overrides, workdir,
command, status) and runs them one after another with `python -m dlm.main`, going on past a
failed run and naming it at the end (exit code 1). Run again, it skips the runs that finished with
the same command and resumes the others. With --tpu=NAME --zone=Z the runs go, one after another,
to that TPU VM (`launch/tpu_vm.py run`; ROOT must be gs://). --dry_run prints the commands, one
per line, and writes nothing.
"""
import argparse
import contextlib
import csv
import hashlib
import io
import itertools
import json
import os
import re
import runpy
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python launch/sweep.py` from a checkout that is not installed
  sys.path.insert(0, str(REPO))

from etils import epath  # noqa: E402 pylint: disable=g-import-not-at-top

from dlm.errors import DlmError  # noqa: E402 pylint: disable=g-import-not-at-top
from launch import tpu_vm  # noqa: E402 pylint: disable=g-import-not-at-top
from launch.tpu_vm import LaunchError  # noqa: E402 pylint: disable=g-import-not-at-top

KEY = re.compile(r'[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*')
# The final metrics `summary` shows unless --metrics says otherwise (those some run logged).
DEFAULT_METRICS = ('eval/accuracy', 'eval/reward_mean', 'rl/reward_mean', 'rl/accuracy',
                   'train/loss', 'eval/loss')


def _key(key: str) -> str:
  key = key.removeprefix('--config.')
  if not KEY.fullmatch(key):
    raise LaunchError(f'{key!r} is not a config key (e.g. rl.objective)')
  return key


def format_value(value) -> str:
  """A sweep-file value as dlm.main's flag parser reads it: strings as they are, the rest by
  repr (4, 0.001, True, (3, 4))."""
  return value if isinstance(value, str) else repr(value)


def parse_sweep(spec: str) -> list[dict[str, str]]:
  """'a=1,2 b=x,y' -> the 4 override sets of the Cartesian product, first axis slowest."""
  axes = {}
  for axis in shlex.split(spec):
    key, eq, values = axis.partition('=')
    if not eq or not values or '' in values.split(','):
      raise LaunchError(f'--sweep axis {axis!r}: expected key=value1,value2,…')
    if _key(key) in axes:
      raise LaunchError(f'--sweep names {key} twice')
    axes[_key(key)] = values.split(',')
  if not axes:
    raise LaunchError('--sweep is empty: expected e.g. --sweep="rl.objective=bgpo,vrpo_ol"')
  return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def load_sweep_file(path: str) -> list[dict[str, str]]:
  """The override sets a sweep file's `sweep()` returns: a list of {key: value} dicts."""
  if not os.path.isfile(path):
    raise LaunchError(f'sweep file not found: {path}')
  fn = runpy.run_path(path).get('sweep')
  if not callable(fn):
    raise LaunchError(f'{path} defines no sweep() function returning a list of {{key: value}} '
                      f'dicts')
  runs = fn()
  if not isinstance(runs, (list, tuple)) or not runs or not all(isinstance(r, dict) for r in runs):
    raise LaunchError(f'{path}: sweep() must return a non-empty list of {{key: value}} dicts, '
                      f'got {runs!r:.200}')
  return [{_key(k): format_value(v) for k, v in r.items()} for r in runs]


def run_names(sweep: list[dict[str, str]]) -> list[str]:
  """Readable, distinct directory names, safe on local disks and in gs:// object names:
  `key=value` pairs joined by commas, other characters as `_`; a hash of the overrides where
  that collides or grows long."""
  texts = [','.join(f'{k}={v}' for k, v in r.items()) or 'base' for r in sweep]
  if len(set(texts)) < len(texts):
    dup = next(t for t in texts if texts.count(t) > 1)
    raise LaunchError(f'the sweep lists the same overrides twice: {dup}')
  names = [re.sub(r'[^A-Za-z0-9._=,+-]', '_', t) for t in texts]
  digest = lambda t: hashlib.sha1(t.encode()).hexdigest()[:8]  # noqa: E731
  return [f'{n[:100]}-{digest(t)}' if len(n) > 120 or names.count(n) > 1 else n
          for n, t in zip(names, texts)]


def _join(root: str, name: str) -> str:
  return f'{root.rstrip("/")}/{name}'


def plan(a, sweep: list[dict[str, str]], extra: list[str]) -> list[dict]:
  """One entry per run: name, overrides, workdir and the exact command (local or TPU)."""
  runs = []
  for name, overrides in zip(run_names(sweep), sweep):
    workdir = _join(a.root, name)
    dlm_args = [f'--config={a.config}', f'--workdir={workdir}',
                *(f'--config.{k}={v}' for k, v in overrides.items()), *extra]
    if a.tpu:
      cmd = [sys.executable, str(REPO / 'launch' / 'tpu_vm.py'), 'run', a.tpu, f'--zone={a.zone}',
             *([f'--project={a.project}'] if a.project else []), f'--log={name}', '--', *dlm_args]
    else:
      cmd = [sys.executable, '-m', 'dlm.main', *dlm_args]
    runs.append({'name': name, 'overrides': overrides, 'workdir': workdir, 'command': cmd,
                 'status': 'pending'})
  return runs


def check(a, sweep: list[dict[str, str]], extra: list[str]) -> None:
  """Every key of every run and of the extra arguments, before anything runs or is written."""
  from dlm.main import check_overrides  # pylint: disable=g-import-not-at-top
  for flag in ('config', 'workdir'):
    if any(x == f'--{flag}' or x.startswith(f'--{flag}=') for x in extra):
      raise LaunchError(f'--{flag} after -- : the sweep sets it (--config before --, workdirs '
                        f'under --root)')
  keys = list(dict.fromkeys(k for r in sweep for k in r))
  overrides = [f'--config.{k}=' for k in keys] + [x for x in extra if x.startswith('--config.')]
  if a.tpu:
    if not a.root.startswith('gs://'):
      raise LaunchError(f'--root={a.root}: with --tpu the runs write to gs:// (the VM and this '
                        f'machine share no disk): pass --root=gs://BUCKET/PATH')
    tpu_vm.resolve_project(a)
    tpu_vm.check_dlm_args([f'--config={a.config}', f'--workdir={_join(a.root, "x")}', *overrides])
  elif (problem := check_overrides([f'--config={a.config}', *overrides])):
    raise LaunchError(problem)


@contextlib.contextmanager
def _storage(path, verb: str):
  """Storage problems (credentials, network, a missing bucket) as one-line errors."""
  try:
    yield
  except OSError as e:
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise LaunchError(f'cannot {verb} {path}: {first}') from e


def _load_state(root: str) -> dict:
  path = epath.Path(root) / 'sweep.json'
  with _storage(path, 'read'):
    return json.loads(path.read_text()) if path.exists() else {'runs': []}


def _save_state(root: str, runs: list[dict]) -> None:
  path = epath.Path(root) / 'sweep.json'
  with _storage(path, 'write'):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({'runs': runs}, indent=1) + '\n')


def execute(cmd: list[str]) -> tuple[int, str]:
  """Runs one command, its output passing through; returns the exit code and the last line it
  wrote to stderr (dlm's one-line `error: …`, or a traceback's last line)."""
  proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, errors='replace')
  last = ''
  try:
    for line in proc.stderr:
      sys.stderr.write(line)
      last = line.strip() or last
  except KeyboardInterrupt:  # dlm checkpoints on the same Ctrl-C: let it finish
    proc.wait()
    raise
  return proc.wait(), last


def cmd_run(a, extra: list[str]) -> int:
  if bool(a.sweep) == bool(a.sweep_file):
    raise LaunchError('give one of --sweep="key=v1,v2 …" and --sweep_file=FILE.py')
  if bool(a.tpu) != bool(a.zone):
    raise LaunchError('--tpu=NAME and --zone=ZONE go together (runs on that TPU VM)')
  if not a.root.startswith('gs://'):
    a.root = os.path.abspath(a.root)
  sweep = parse_sweep(a.sweep) if a.sweep else load_sweep_file(a.sweep_file)
  check(a, sweep, extra)
  runs = plan(a, sweep, extra)
  if a.dry_run:  # every run's command; reads and writes nothing
    print('\n'.join(shlex.join(r['command']) for r in runs))
    return 0
  previous = {r['name']: r for r in _load_state(a.root)['runs']}
  for r in runs:
    old = previous.pop(r['name'], None)
    if old and old['status'] == 'done' and old['command'] == r['command']:
      r.update(status='done', seconds=old.get('seconds'))
      print(f'skip {r["name"]}: finished (same command)', file=sys.stderr)
  todo = [r for r in runs if r['status'] != 'done']
  runs += previous.values()  # runs of earlier sweeps in this root stay listed
  for i, r in enumerate(todo, 1):
    print(f'[{i}/{len(todo)}] {r["name"]}: {shlex.join(r["command"])}', file=sys.stderr,
          flush=True)
    r['status'] = 'running'
    _save_state(a.root, runs)
    start = time.time()
    try:
      rc, last = execute(r['command'])
    except KeyboardInterrupt:
      r['status'] = 'interrupted'
      _save_state(a.root, runs)
      print(f'{r["name"]}: interrupted; run the same command again to resume', file=sys.stderr)
      return 130
    r.update(status='done' if rc == 0 else 'failed', returncode=rc,
             seconds=round(time.time() - start, 1), **({'error': last} if rc else {}))
    _save_state(a.root, runs)
    print(f'{r["name"]}: ' + (f'done in {r["seconds"]:.0f} s' if rc == 0 else
                              f'FAILED (exit {rc}): {last}'), file=sys.stderr, flush=True)
  if not todo:
    _save_state(a.root, runs)
  failed = [r for r in todo if r['status'] == 'failed']
  done = sum(r['status'] == 'done' for r in runs)
  print(f'sweep: {done} of {len(runs)} runs finished under {a.root}'
        + ''.join(f'\n  failed: {r["name"]}: {r["error"]}' for r in failed), file=sys.stderr)
  return 1 if failed else 0


def collect(root: str) -> list[dict]:
  """Each run of ROOT (sweep.json, else every */metrics.jsonl) with the last logged value of
  each metric and the last step."""
  from dlm.metrics import read_metrics  # pylint: disable=g-import-not-at-top
  base = epath.Path(root)
  runs = _load_state(root)['runs']
  if not runs:
    with _storage(base, 'list'):
      runs = [{'name': p.parent.name, 'overrides': {}, 'status': '-'}
              for p in sorted(base.glob('*/metrics.jsonl'))]
  if not runs:
    raise LaunchError(f'no runs under {root}: no sweep.json and no */metrics.jsonl')
  rows = []
  for r in runs:
    workdir = base / r['name']  # not r['workdir']: ROOT may have moved
    last = {}
    with _storage(workdir / 'metrics.jsonl', 'read'):
      try:
        if (workdir / 'metrics.jsonl').exists():
          for row in read_metrics(os.fspath(workdir)):
            last.update(row)
      except json.JSONDecodeError:
        last, r = {}, {**r, 'status': 'bad metrics.jsonl'}
    rows.append({'run': r['name'], 'status': r['status'], 'overrides': r['overrides'],
                 'workdir': os.fspath(workdir), 'metrics': last})
  return rows


def _fmt(v) -> str:
  if v is None:
    return '-'
  return f'{v:.6g}' if isinstance(v, float) else str(v)


def table(rows: list[dict], metrics: list[str]) -> str:
  header = ['run', 'status', 'step', *metrics]
  body = [[r['run'], r['status'], *(_fmt(r['metrics'].get(k)) for k in ['step', *metrics])]
          for r in rows]
  widths = [max(len(x) for x in col) for col in zip(header, *body)]
  line = lambda cells: '  '.join(  # noqa: E731  text left, numbers right
      c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
  return '\n'.join(line(cells).rstrip() for cells in [header, *body])


def to_csv(rows: list[dict], metrics: list[str]) -> str:
  keys = list(dict.fromkeys(k for r in rows for k in r['overrides']))
  out = io.StringIO()
  w = csv.writer(out)
  w.writerow(['run', 'status', 'step', *keys, *metrics, 'workdir'])
  for r in rows:
    m = r['metrics']
    w.writerow([r['run'], r['status'], m.get('step', ''),
                *(r['overrides'].get(k, '') for k in keys),
                *(repr(m[k]) if isinstance(m.get(k), float) else m.get(k, '') for k in metrics),
                r['workdir']])
  return out.getvalue()


def cmd_summary(a, extra: list[str]) -> int:
  del extra
  rows = collect(a.root)
  seen = {k for r in rows for k in r['metrics'] if k != 'step'}
  if a.metrics:
    metrics = [m.strip() for m in a.metrics.split(',') if m.strip()]
    if seen and (missing := [m for m in metrics if m not in seen]):
      raise LaunchError(f'--metrics: {", ".join(missing)} logged by no run; logged: '
                        f'{", ".join(sorted(seen))}')
  else:
    metrics = [m for m in DEFAULT_METRICS if m in seen] or sorted(seen)
  print(table(rows, metrics))
  if a.csv:
    with _storage(a.csv, 'write'):
      epath.Path(a.csv).parent.mkdir(parents=True, exist_ok=True)
      epath.Path(a.csv).write_text(to_csv(rows, metrics))
    print(f'wrote {a.csv}', file=sys.stderr)
  return 0


class _Parser(argparse.ArgumentParser):
  def error(self, message):
    raise LaunchError(message)


def parser() -> argparse.ArgumentParser:
  p = _Parser(prog='python launch/sweep.py', description=__doc__.split('\n\n')[0])
  sub = p.add_subparsers(dest='command', required=True, parser_class=_Parser)
  r = sub.add_parser('run', help='run every configuration of a sweep (extra dlm.main args '
                     'after --)')
  r.add_argument('--root', required=True, help='directory (or gs:// path) of the runs')
  r.add_argument('--config', required=True, help='dlm config file[:preset]')
  r.add_argument('--sweep', help="axes 'key=v1,v2 key2=a,b': their Cartesian product")
  r.add_argument('--sweep_file', help='Python file whose sweep() returns [{key: value}, …]')
  r.add_argument('--dry_run', action='store_true', help='print the commands, write nothing')
  r.add_argument('--tpu', help='run on this TPU VM (launch/tpu_vm.py run) instead of here')
  r.add_argument('--zone', type=tpu_vm.zone, help='the TPU VM zone')
  r.add_argument('--project', type=tpu_vm.project,
                 help="the TPU VM project (default: gcloud's configured one)")
  r.set_defaults(func=cmd_run, takes_args=True)
  s = sub.add_parser('summary', help="a table of each run's final metrics")
  s.add_argument('--root', required=True, help='directory (or gs:// path) of the runs')
  s.add_argument('--csv', help='also write the table (with each override) as CSV here')
  s.add_argument('--metrics', help='comma-separated metrics (default: those of '
                 f'{", ".join(DEFAULT_METRICS)} some run logged)')
  s.set_defaults(func=cmd_summary, takes_args=False)
  return p


def main(argv: list[str] | None = None) -> int:
  own, extra = tpu_vm.split_args(sys.argv[1:] if argv is None else argv)
  try:
    a = parser().parse_args(own)
    if extra and not a.takes_args:
      raise LaunchError(f'`{a.command}` takes no dlm.main arguments')
    return a.func(a, extra)
  except DlmError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1


if __name__ == '__main__':
  sys.exit(main())
