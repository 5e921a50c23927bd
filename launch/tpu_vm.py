#!/usr/bin/env python3
"""dlm on a Cloud TPU VM or pod slice, through gcloud: create, set up, run, follow, delete.

  python launch/tpu_vm.py up dlm-pod --zone=us-east5-a --accelerator_type=v5p-32 --spot \\
      --delete_after -- --config=configs/rl_countdown.py --workdir=gs://BUCKET/runs/bgpo

Subcommands: `create`; `setup` (this checkout's HEAD by git archive + scp, or a clone of
--repo_url, into ~/dlm on every worker, then a Python venv ~/dlm-venv with `pip install -e
'.[tpu]'`); `run` (starts `python -m dlm.main <args after -->` on every worker in the background,
so it survives a dropped connection, then streams worker 0's log until the run ends; the exit code
is worker 0's); `logs` (stream it again); `delete`; `up` (create + setup + run, + delete with
--delete_after). Each step is one command; --dry_run prints them, one per line, ready to paste,
and runs nothing.

On a pod every worker runs the same command with DLM_DISTRIBUTED=1: jax.distributed finds the
other workers by itself, so there are no coordinator flags. Workers share no disk and a deleted VM
takes its disk along, so the workdir must be gs:// (--allow_local_workdir to override).
"""
import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python launch/tpu_vm.py` from a checkout that is not installed
  sys.path.insert(0, str(REPO))

from dlm.errors import DlmError  # noqa: E402 pylint: disable=g-import-not-at-top

# The software version (VM image) for JAX per TPU generation (cloud.google.com/tpu/docs/runtimes).
RUNTIMES = {'v2': 'tpu-ubuntu2204-base', 'v3': 'tpu-ubuntu2204-base', 'v4': 'tpu-ubuntu2204-base',
            'v5p': 'v2-alpha-tpuv5', 'v5litepod': 'v2-alpha-tpuv5-lite', 'v6e': 'v2-alpha-tpuv6e'}
CHIP_COUNTS = (1, 4, 8, 16, 32, 64, 128, 256)  # v5litepod-N and v6e-N count chips
UV = '"$HOME"/.local/bin/uv'
PYTHON = '"$HOME"/dlm-venv/bin/python'  # on the workers; ssh commands start in $HOME
SAFE_LOG = re.compile(r'[A-Za-z0-9._=,+-]+')


class LaunchError(DlmError, ValueError):
  """A launcher argument that cannot work: printed as one `error:` line, exit code 1."""


def accelerator_type(value: str) -> str:
  """gcloud's name of a slice (`v5e-16` is spelled `v5litepod-16` there), checked for a size the
  generation has: v2–v5p count TensorCores (8 per host), v5e / v6e count chips."""
  m = re.fullmatch(r'(v2|v3|v4|v5p|v5e|v5litepod|v6e)-(\d+)', value)
  if not m:
    raise LaunchError(f'--accelerator_type={value!r}: expected GENERATION-SIZE with GENERATION one '
                      f'of v2, v3, v4, v5p, v5litepod (or v5e), v6e, e.g. v5p-32, v4-8, v6e-16')
  gen, n = ('v5litepod' if m[1] == 'v5e' else m[1]), int(m[2])
  if gen in ('v5litepod', 'v6e') and n not in CHIP_COUNTS:
    raise LaunchError(f'--accelerator_type={value}: {gen}-N counts chips, one of '
                      f'{", ".join(map(str, CHIP_COUNTS))}')
  if gen not in ('v5litepod', 'v6e') and (n < 8 or n % 8):
    raise LaunchError(f'--accelerator_type={value}: {gen}-N counts TensorCores, a multiple of 8 '
                      f'(v5p-8 is one host of 4 chips; v5p-32 is 16 chips on 4 hosts)')
  return f'{gen}-{n}'


def _name(value: str) -> str:
  if not re.fullmatch(r'[a-z]([-a-z0-9]{0,61}[a-z0-9])?', value):
    raise argparse.ArgumentTypeError(
        f'{value!r}: a TPU name is lowercase letters, digits and hyphens, starts with a letter, '
        f'at most 63 characters')
  return value


def zone(value: str) -> str:
  if not re.fullmatch(r'[a-z]+-[a-z]+[0-9]+-[a-z]', value):
    raise argparse.ArgumentTypeError(f'{value!r} is not a zone (e.g. us-east5-a, europe-west4-b)')
  return value


def project(value: str) -> str:
  if not re.fullmatch(r'([a-z][-a-z0-9.]*:)?[a-z][-a-z0-9]{4,28}[a-z0-9]', value):
    raise argparse.ArgumentTypeError(f'{value!r} is not a GCP project id (e.g. my-project-123)')
  return value


def resolve_project(a) -> None:
  """gcloud needs a project: --project, else gcloud's own (CLOUDSDK_CORE_PROJECT or `gcloud
  config set project`), written into every command so that a printed one runs anywhere."""
  if a.project:
    return
  a.project = os.environ.get('CLOUDSDK_CORE_PROJECT')
  if not a.project and shutil.which('gcloud'):
    a.project = subprocess.run(['gcloud', 'config', 'get-value', 'project'], capture_output=True,
                               text=True, check=False, timeout=120).stdout.strip()
  if not a.project:
    raise LaunchError('no GCP project: pass --project=ID (or `gcloud config set project ID`)')


def _python_version(value: str) -> str:
  if not re.fullmatch(r'3\.[0-9]+(\.[0-9]+)?', value):
    raise argparse.ArgumentTypeError(f'{value!r}: a Python version such as 3.11 or 3.12')
  return value


def _log(value: str) -> str:
  if not SAFE_LOG.fullmatch(value):
    raise argparse.ArgumentTypeError(f'{value!r}: use letters, digits and . _ = , + -')
  return value


def flag_value(args: list[str], flag: str) -> str | None:
  """The value of `--flag=value` in a dlm.main argument list (the last one wins, as in absl)."""
  values = [a.split('=', 1)[1] for a in args if a.startswith(f'--{flag}=')]
  if f'--{flag}' in args:
    raise LaunchError(f'write --{flag}=VALUE (one argument) in the dlm.main arguments')
  return values[-1] if values else None


def check_dlm_args(dlm_args: list[str], allow_local_workdir: bool = False) -> None:
  """Fails before anything is created: no --config / --workdir, a config file that is not in
  this checkout (the VM runs its copy), an unknown `--config.<key>` (dlm.main's own message),
  a workdir the workers would not share."""
  from dlm.main import check_overrides  # pylint: disable=g-import-not-at-top
  if not dlm_args:
    raise LaunchError('no dlm.main arguments: add them after --, e.g. '
                      '-- --config=configs/rl_countdown.py --workdir=gs://BUCKET/runs/bgpo')
  config, workdir = flag_value(dlm_args, 'config'), flag_value(dlm_args, 'workdir')
  if not config or not workdir:
    raise LaunchError('the dlm.main arguments need --config=FILE[:preset] and --workdir=DIR')
  path, _, preset = config.partition(':')
  if os.path.isabs(path) or not (REPO / path).is_file():
    raise LaunchError(f'--config={config}: give a config file inside the repository, e.g. '
                      f'configs/rl_countdown.py (the workers run it from their copy of {REPO})')
  local = [f'--config={REPO / path}' + (f':{preset}' if preset else ''),
           *(a for a in dlm_args if a.startswith('--config.'))]
  if (problem := check_overrides(local)):
    raise LaunchError(problem)
  if not workdir.startswith('gs://') and not allow_local_workdir:
    raise LaunchError(f'--workdir={workdir}: on a TPU VM the workdir must be gs://BUCKET/PATH (a '
                      f"pod's workers share no disk; a deleted VM takes its disk along); pass "
                      f'--allow_local_workdir for a single-host VM you keep')


def gcloud(a, verb: str, *positional: str, flags: tuple[str, ...] = ()) -> list[str]:
  project = [f'--project={a.project}'] if a.project else []
  return ['gcloud', 'compute', 'tpus', 'tpu-vm', verb, *positional, f'--zone={a.zone}', *project,
          *flags]


def ssh(a, worker: str, command: str) -> list[str]:
  return gcloud(a, 'ssh', a.name, flags=(f'--worker={worker}', f'--command={command}'))


def create_cmds(a) -> list[list[str]]:
  acc = accelerator_type(a.accelerator_type)
  if a.spot and a.preemptible:
    raise LaunchError('--spot and --preemptible exclude each other (spot is the newer model)')
  version = a.version or RUNTIMES[acc.split('-')[0]]
  extra = ('--spot',) if a.spot else ('--preemptible',) if a.preemptible else ()
  return [gcloud(a, 'create', a.name,
                 flags=(f'--accelerator-type={acc}', f'--version={version}', *extra))]


def setup_cmds(a) -> list[list[str]]:
  """Code into ~/dlm on every worker (this checkout's `--ref` by git archive, or a clone of
  --repo_url), then a venv with the TPU extra: uv brings its own Python, as TPU images ship an
  older one than JAX needs."""
  q = shlex.quote
  if a.repo_url:
    local = []
    fetch = ['rm -rf dlm', f'git clone {q(a.repo_url)} dlm', f'git -C dlm checkout {q(a.ref)}']
  else:
    tarball = os.path.join(tempfile.gettempdir(), f'dlm-{a.name}.tar.gz')
    local = [['git', '-C', str(REPO), 'archive', '--format=tar.gz', '--prefix=dlm/',
              f'--output={tarball}', a.ref],
             gcloud(a, 'scp', tarball, f'{a.name}:dlm.tar.gz', flags=('--worker=all',))]
    fetch = ['rm -rf dlm', 'tar -xzf dlm.tar.gz', 'rm dlm.tar.gz']
  install = [f'{{ [ -x {UV} ] || curl -LsSf https://astral.sh/uv/install.sh | sh; }}',
             f'{UV} venv --allow-existing --python {q(a.python_version)} dlm-venv',
             f'cd dlm && {UV} pip install --python {PYTHON} -e ".[tpu]"']
  return local + [ssh(a, 'all', ' && '.join(fetch + install))]


def _warn_uncommitted(a) -> None:
  if a.repo_url:
    return
  out = subprocess.run(['git', '-C', str(REPO), 'status', '--porcelain', '--untracked-files=no'],
                       capture_output=True, text=True, check=False).stdout
  if out.strip():
    print(f'warning: setup copies {a.ref} (git archive); uncommitted changes in {REPO} stay '
          f'behind', file=sys.stderr)


def _log_files(log: str) -> tuple[str, str, str]:
  return tuple(shlex.quote(f'dlm_logs/{log}.{ext}') for ext in ('log', 'pid', 'rc'))


def start_cmd(a, dlm_args: list[str]) -> list[str]:
  """Every worker starts dlm.main in a background subshell that ignores SIGHUP (as nohup would),
  so it outlives the ssh session; output in ~/dlm_logs/<log>.log, its pid and (when it ends) its
  exit code beside it."""
  log, pid, rc = _log_files(a.log)
  return ssh(a, 'all', f'mkdir -p dlm_logs; rm -f {rc}; '
                       f'(trap "" HUP; cd dlm && DLM_DISTRIBUTED=1 {PYTHON} -m dlm.main '
                       f'{shlex.join(dlm_args)}; echo $? > "$HOME"/{rc}) '
                       f'> {log} 2>&1 < /dev/null & '
                       f'echo $! > {pid}')


def follow_cmd(a) -> list[str]:
  """Worker 0's log from its start until its process ends; exits with the run's exit code."""
  log, pid, rc = _log_files(a.log)
  return ssh(a, '0', f'[ -f {pid} ] || {{ echo "no run {a.log} on worker 0" >&2; exit 1; }}; '
                     f'tail -n +1 --pid="$(cat {pid})" -f {log}; '
                     f'exit "$(cat {rc} 2>/dev/null || echo 1)"')


def delete_cmds(a) -> list[list[str]]:
  return [gcloud(a, 'delete', a.name, flags=('--quiet',))]


def execute(cmds: list[list[str]], dry_run: bool) -> int:
  """Prints (dry run) or runs the commands in order; stops at the first that fails."""
  for cmd in cmds:
    if dry_run:
      print(shlex.join(cmd), flush=True)
      continue
    print(f'$ {shlex.join(cmd)}', file=sys.stderr, flush=True)
    try:
      rc = subprocess.run(cmd, check=False).returncode
    except FileNotFoundError as e:
      raise LaunchError(f'{cmd[0]} not found: install it (gcloud: '
                        f'cloud.google.com/sdk/docs/install) or print the commands with --dry_run'
                        ) from e
    if rc:
      print(f'{cmd[0]} exited with {rc}', file=sys.stderr)
      return rc
  return 0


def _hint(a) -> None:
  where = f'{a.name} --zone={a.zone}' + (f' --project={a.project}' if a.project else '')
  print(f'the VM is kept: follow with `python launch/tpu_vm.py logs {where} --log={a.log}`, '
        f'delete with `python launch/tpu_vm.py delete {where}`', file=sys.stderr)


def cmd_create(a, _):
  return execute(create_cmds(a), a.dry_run)


def cmd_setup(a, _):
  _warn_uncommitted(a)
  return execute(setup_cmds(a), a.dry_run)


def cmd_run(a, dlm_args):
  check_dlm_args(dlm_args, a.allow_local_workdir)
  return execute([start_cmd(a, dlm_args), follow_cmd(a)], a.dry_run)


def cmd_logs(a, _):
  return execute([follow_cmd(a)], a.dry_run)


def cmd_delete(a, _):
  return execute(delete_cmds(a), a.dry_run)


def cmd_up(a, dlm_args):
  """create + setup + run, then delete with --delete_after — also when setup or the run failed,
  but not when create failed (the name may belong to a VM this call did not make), after a
  Ctrl-C or a lost connection (exit 255: the run may still be going)."""
  check_dlm_args(dlm_args, a.allow_local_workdir)
  create, delete = create_cmds(a), delete_cmds(a)
  work = setup_cmds(a) + [start_cmd(a, dlm_args), follow_cmd(a)]
  if a.dry_run:
    return execute(create + work + (delete if a.delete_after else []), True)
  _warn_uncommitted(a)
  if (rc := execute(create, False)):
    return rc
  try:
    rc = execute(work, False)
  except KeyboardInterrupt:
    _hint(a)
    return 130
  if not a.delete_after or rc == 255:
    _hint(a)
    return rc
  return execute(delete, False) or rc


class _Parser(argparse.ArgumentParser):
  def error(self, message):
    raise LaunchError(message)


def parser() -> argparse.ArgumentParser:
  common = _Parser(add_help=False)
  common.add_argument('name', type=_name, help='TPU VM name')
  common.add_argument('--zone', required=True, type=zone, help='e.g. us-east5-a')
  common.add_argument('--project', type=project,
                      help="GCP project (default: gcloud's configured one)")
  common.add_argument('--dry_run', action='store_true', help='print the commands, run nothing')
  create = _Parser(add_help=False)
  create.add_argument('--accelerator_type', '--accelerator-type', required=True,
                      help='slice, e.g. v5p-32, v4-8, v5litepod-16 (= v5e-16), v6e-8')
  create.add_argument('--version', help='TPU software version (default: the one for JAX on that '
                      'generation, e.g. v2-alpha-tpuv5 for v5p)')
  create.add_argument('--spot', action='store_true', help='spot VM (cheaper, preemptible)')
  create.add_argument('--preemptible', action='store_true', help='legacy preemptible VM')
  setup = _Parser(add_help=False)
  setup.add_argument('--ref', default='HEAD', help='git ref to copy (or check out) [HEAD]')
  setup.add_argument('--repo_url', help='clone this git URL on the workers instead of copying '
                     'this checkout')
  setup.add_argument('--python_version', default='3.11', type=_python_version,
                     help='venv Python [3.11]')
  logs = _Parser(add_help=False)
  logs.add_argument('--log', default='dlm', type=_log,
                    help='run name: worker logs go to ~/dlm_logs/<log>.log [dlm]')
  run = _Parser(add_help=False, parents=[logs])
  run.add_argument('--allow_local_workdir', action='store_true',
                   help='accept a workdir that is not gs:// (single-host VM you keep)')

  p = _Parser(prog='python launch/tpu_vm.py', description=__doc__.split('\n\n')[0])
  sub = p.add_subparsers(dest='command', required=True, parser_class=_Parser)
  for name, parents, func, text in [
      ('create', [common, create], cmd_create, 'create the TPU VM / pod slice'),
      ('setup', [common, setup], cmd_setup, 'copy the code, install it on every worker'),
      ('run', [common, run], cmd_run, 'run `dlm.main <args after -->` on every worker'),
      ('logs', [common, logs], cmd_logs, "stream worker 0's log until the run ends"),
      ('delete', [common], cmd_delete, 'delete the TPU VM'),
      ('up', [common, create, setup, run], cmd_up, 'create + setup + run (+ delete)')]:
    s = sub.add_parser(name, parents=parents, help=text, description=text)
    s.set_defaults(func=func, takes_args=name in ('run', 'up'))
    if name == 'up':
      s.add_argument('--delete_after', action='store_true',
                     help='delete the VM when the run ends (also if setup or the run failed)')
  return p


def split_args(argv: list[str]) -> tuple[list[str], list[str]]:
  """The launcher's own arguments and the dlm.main ones after `--`."""
  if '--' in argv:
    i = argv.index('--')
    return argv[:i], argv[i + 1:]
  return argv, []


def main(argv: list[str] | None = None) -> int:
  own, dlm_args = split_args(sys.argv[1:] if argv is None else argv)
  try:
    a = parser().parse_args(own)
    if dlm_args and not a.takes_args:
      raise LaunchError(f'`{a.command}` takes no dlm.main arguments (only run and up do)')
    resolve_project(a)
    return a.func(a, dlm_args)
  except DlmError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1


if __name__ == '__main__':
  sys.exit(main())
