"""SIGKILL a run at random moments, restart it each time, and compare with an uninterrupted run.

`python -m dlm.bench.faults [--pipelines=pretrain,rl] [--rl_preset=tiny|cpu] [--kills=5]
[--seed=0] [--scratch_dir=/tmp/dlm_faults]`

Each pipeline (`python -m dlm.main` as a subprocess: the tiny pretraining, the RL preset with its
warm start) runs once uninterrupted, then again in a fresh workdir, killed with SIGKILL `kills`
times and restarted after each kill with the same command until it exits 0. Kill moments are
seeded: a random progress point (a count of metrics lines still ahead) plus a random delay. A
kill lands during a checkpoint write when the step's unfinished directory (orbax's
`<step>.orbax-checkpoint-tmp`) is there after it; if no kill has by a seeded position among
them, that kill waits for a new such directory to appear and fires at once (repeated until one
does). The pipelines use a short checkpoint cadence so that writes happen during the run.

Counted, summed over pipelines (the last line of output is this JSON):
- kills: SIGKILLs that hit a running process.
- resumed: restarts that resumed from a checkpoint (their log says `resumed … from step N`).
- mismatched_metrics: (step, metric) values of the final metrics files (each workdir's
  metrics.jsonl; RL's warm start's too) that differ in any bit from the uninterrupted run's, or
  that it does not have, or that appear twice. Timing metrics (seconds, tokens/s, MFU) are not
  results and are left out. Bit for bit holds because both runs use the same device count.
- lost_steps: steps of work lost beyond what the checkpoint cadence implies: (a) for every
  restart, the latest complete checkpoint step at the moment of the kill minus the step the
  restart resumed from (a restart must resume from the latest complete checkpoint: the steps
  after it are the recomputation the cadence implies, not counted), plus (b) steps of the
  uninterrupted run's metrics missing from the final ones.
Also printed, not counted as faults: `replayed` (steps recomputed: the progress logged beyond
the checkpoint a restart resumed from) and the wall time.
"""
import itertools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags

from dlm.checkpoint import unfinished_steps

_PIPELINES = flags.DEFINE_list('pipelines', ['pretrain', 'rl'], 'pretrain and/or rl')
_RL_PRESET = flags.DEFINE_enum('rl_preset', 'tiny', ['tiny', 'cpu'],
                               'preset of configs/rl_countdown.py (cpu: ~10 min per run)')
_KILLS = flags.DEFINE_integer('kills', 5, 'SIGKILLs per pipeline (≥ 1 during a checkpoint write)')
_SEED = flags.DEFINE_integer('seed', 0, 'seed of the kill moments')
_SCRATCH = flags.DEFINE_string('scratch_dir', '/tmp/dlm_faults', 'scratch directory (emptied)')

ROOT = Path(__file__).resolve().parents[2]
TIMING = re.compile(r'(_seconds|tokens_per_sec|/mfu)$')
TIMEOUT = 1800  # seconds one run may take


def pipelines(rl_preset: str) -> dict:
  """name: (dlm.main arguments, [(checkpoint dir, resume-line pattern)], metrics files), all
  relative to the workdir. The first checkpoint dir holding a complete step at a kill is the one
  the restart must resume from (RL's own, else its warm start's)."""
  rl_args = ['--config=configs/rl_countdown.py:' + rl_preset]
  if rl_preset == 'tiny':  # long enough for several kills, with a checkpoint every 2 steps
    rl_args += ['--config.rl.num_steps=10', '--config.rl.eval_every=5',
                '--config.warmstart.steps=8']
  return {
      'pretrain': (['--config=configs/pretrain.py:tiny', '--config.train.num_steps=120',
                    '--config.train.log_every=5', '--config.train.eval_every=40',
                    '--config.train.checkpoint_every=20'],
                   [('checkpoints', r'resumed from step (\d+)')], ['metrics.jsonl']),
      'rl': (rl_args, [('checkpoints', r'resumed RL from step (\d+)'),
                       ('warmstart/checkpoints', r'resumed from step (\d+)')],
             ['metrics.jsonl', 'warmstart/metrics.jsonl']),
  }


def read_rows(path: Path) -> list[dict]:
  """The metric rows of a metrics.jsonl; a line still being written is skipped."""
  if not path.exists():
    return []
  rows = []
  for line in path.read_text().splitlines():
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      pass
  return rows


def compare(straight: list[dict], resumed: list[dict]) -> tuple[int, int]:
  """(mismatched metrics, lost steps) of a resumed run's metric rows against the uninterrupted
  run's; timing metrics are skipped."""
  def values(rows):
    out, dup = {}, 0
    for r in rows:
      for k, v in r.items():
        if k == 'step' or TIMING.search(k):
          continue
        dup += (r['step'], k) in out
        out[(r['step'], k)] = v
    return out, dup

  want, _ = values(straight)
  got, dup = values(resumed)
  mismatched = dup + sum(1 for sk, v in got.items() if sk not in want or want[sk] != v)
  lost = len({s for s, k in want if (s, k) not in got})
  return mismatched, lost


def complete_steps(directory: Path) -> list[int]:
  """Steps orbax lists as complete: `<step>` directories that no unfinished save left."""
  if not directory.exists():
    return []
  unfinished = set(unfinished_steps(directory))
  return sorted(int(p.name) for p in directory.iterdir()
                if p.name.isdigit() and p.is_dir() and p.name not in unfinished)


def progress(workdir: Path, metrics: list[str]) -> int:
  return sum(len(read_rows(workdir / m)) for m in metrics)


def start(args: list[str], workdir: Path, log) -> subprocess.Popen:
  """`python -m dlm.main` in its own process group (a kill takes any helper process with it)."""
  return subprocess.Popen([sys.executable, '-m', 'dlm.main', *args, f'--workdir={workdir}'],
                          cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def kill(proc: subprocess.Popen) -> bool:
  """SIGKILL the run's process group; whether the run was still running."""
  if proc.poll() is not None:
    return False
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  return True


def wait_for(proc, cond, timeout=TIMEOUT) -> bool:
  """Poll until cond() or the process ends; whether cond() held with the process running."""
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if cond():
      return proc.poll() is None
    time.sleep(0.002)
  return False


def run_pipeline(name: str, spec, kills: int, rng: random.Random, root: Path) -> dict:
  args, ckpt_dirs, metrics = spec
  straight, faulty = root / name / 'straight', root / name / 'faulty'
  t0 = time.time()
  with open(root / name / 'straight.log', 'w') as log:
    code = start(args, straight, log).wait(TIMEOUT)
  if code != 0:
    raise SystemExit(f'{name}: the uninterrupted run failed (exit {code}); see '
                     f'{root / name / "straight.log"}')
  total = progress(straight, metrics)
  t_straight = time.time() - t0
  at_write = rng.randrange(kills)  # by this kill one must have cut a checkpoint write
  out = {'kills': 0, 'resumed': 0, 'lost_steps': 0, 'replayed': 0, 'during_write': 0,
         'restarts': 0}
  t0 = time.time()
  expected = None  # (checkpoint dir index, step) the next restart must resume from
  for attempt in itertools.count():
    log_path = root / name / f'faulty_{attempt}.log'
    before = progress(faulty, metrics)
    leftovers = unfinished(faulty, ckpt_dirs)  # a restart removes them first
    with open(log_path, 'w') as log:
      proc = start(args, faulty, log)
      killed = False
      if out['kills'] < kills or not out['during_write']:
        if out['kills'] >= at_write and not out['during_write']:
          hit = wait_for(proc, lambda: bool(unfinished(faulty, ckpt_dirs) - leftovers))
        else:
          remaining = max(1, kills - out['kills'])
          target = rng.randint(before + 1, before + max(1, (total - 1 - before) // remaining))
          hit = wait_for(proc, lambda: progress(faulty, metrics) >= target)
          time.sleep(rng.uniform(0, 0.3))
        if hit:
          last = latest_complete(faulty, ckpt_dirs)
          killed = kill(proc)
        if killed:
          out['kills'] += 1
          out['during_write'] += bool(unfinished(faulty, ckpt_dirs) - leftovers)
      code = proc.wait(TIMEOUT)
    text = log_path.read_text()
    if attempt:  # a restart: it must resume from the latest complete checkpoint at the kill
      out['restarts'] += 1
      resumed = resumed_step(text, ckpt_dirs, expected)
      out['resumed'] += resumed is not None
      out['lost_steps'] += max(0, (expected[1] if expected else 0) - (resumed or 0))
    if not killed:
      if code != 0:
        raise SystemExit(f'{name}: run {attempt} failed with exit {code}; see {log_path}')
      break
    expected = last
    out['replayed'] += replayed(faulty, metrics, ckpt_dirs, expected)
  out['seconds_straight'], out['seconds_faulty'] = round(t_straight), round(time.time() - t0)
  out['mismatched_metrics'] = 0
  for m in metrics:
    mism, lost = compare(read_rows(straight / m), read_rows(faulty / m))
    out['mismatched_metrics'] += mism
    out['lost_steps'] += lost
  return out


def unfinished(workdir: Path, ckpt_dirs) -> set[tuple]:
  """The unfinished checkpoint steps now, each with the identity of its directory (a restart
  removes a leftover and may write the same step again: that is a new write)."""
  out = set()
  for d, _ in ckpt_dirs:
    for n in unfinished_steps(workdir / d):
      try:
        st = (workdir / d / n).stat()
      except FileNotFoundError:  # finished (renamed) or removed meanwhile
        continue
      out.add((f'{d}/{n}', st.st_ino, st.st_ctime_ns))
  return out


def latest_complete(workdir: Path, ckpt_dirs) -> tuple[int, int] | None:
  """(index of the checkpoint dir, its latest complete step) a restart must resume from."""
  for i, (d, _) in enumerate(ckpt_dirs):
    steps = complete_steps(workdir / d)
    if steps:
      return i, steps[-1]
  return None


def resumed_step(text: str, ckpt_dirs, expected) -> int | None:
  """The step a restart's log says it resumed from, in the checkpoint dir it had to use (any
  dir when none was complete: then every resume is a gain, not a loss)."""
  pats = [ckpt_dirs[expected[0]][1]] if expected else [p for _, p in ckpt_dirs]
  for p in pats:
    m = re.search(p, text)
    if m:
      return int(m.group(1))
  return None


def replayed(workdir: Path, metrics, ckpt_dirs, expected) -> int:
  """Steps the restart will compute again: those logged past the checkpoint it resumes from
  (in that checkpoint's phase; all logged steps when there is no checkpoint yet)."""
  def last_step(m):
    return max((r['step'] for r in read_rows(workdir / m)), default=0)
  if expected is None:
    return sum(last_step(m) for m in metrics)
  i, step = expected
  own = [m for m in metrics if Path(m).parent == Path(ckpt_dirs[i][0]).parent]
  return max(0, last_step(own[0]) - step)


def main(argv):
  del argv
  root = Path(_SCRATCH.value)
  rng = random.Random(_SEED.value)
  specs = pipelines(_RL_PRESET.value)
  bad = [n for n in _PIPELINES.value if n not in specs]
  if bad or _KILLS.value < 1:
    raise SystemExit(f'error: --pipelines={",".join(_PIPELINES.value)} --kills={_KILLS.value}: '
                     f'pipelines are {sorted(specs)}, kills ≥ 1')
  results = {}
  for name in _PIPELINES.value:
    d = root / name
    if d.exists():
      shutil.rmtree(d)
    d.mkdir(parents=True)
    results[name] = run_pipeline(name, specs[name], _KILLS.value, rng, root)
  cols = ('kills', 'during_write', 'restarts', 'resumed', 'replayed', 'mismatched_metrics',
          'lost_steps', 'seconds_straight', 'seconds_faulty')
  print(f'{"pipeline":10}' + ''.join(f'{c:>20}' for c in cols))
  for name, r in results.items():
    print(f'{name:10}' + ''.join(f'{r[c]:>20}' for c in cols))
  total = {k: sum(r[k] for r in results.values())
           for k in ('kills', 'resumed', 'mismatched_metrics', 'lost_steps')}
  total['kills_during_checkpoint_write'] = sum(r['during_write'] for r in results.values())
  print(json.dumps(total))


if __name__ == '__main__':
  app.run(main)
