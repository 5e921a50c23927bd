"""Run a dlm command in a subprocess and send it SIGTERM once its metrics show `ready`."""
import os
import signal
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sigterm_when(cmd: list[str], workdir: Path, ready) -> tuple[int, str, str]:
  """(exit code, stdout, stderr) of `cmd`, signalled as soon as ready(metrics.jsonl lines) holds
  (the command must still be running then)."""
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  metrics = workdir / 'metrics.jsonl'
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and ready([l for l in metrics.read_text().split('\n') if l.strip()]):
      break
    time.sleep(0.01)
  assert proc.poll() is None, 'the run finished before the signal'
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=240)
  return proc.returncode, out, err
