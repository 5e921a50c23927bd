"""metrics.jsonl + TensorBoard, and the FLOP counts behind throughput and MFU."""
import atexit
import json
import os
import shutil
import tempfile
import time
from typing import Mapping

import jax
from etils import epath

from dlm import storage

# Dense bf16 peak FLOP/s per chip, for the MFU in the default logs (None: unknown, e.g. CPU).
PEAK_FLOPS = {'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5e': 197e12, 'TPU v5p': 459e12,
              'TPU v6 lite': 918e12, 'TPU v6e': 918e12, 'NVIDIA H100': 989e12,
              'NVIDIA H200': 989e12, 'NVIDIA A100': 312e12}


def peak_flops_per_device() -> float | None:
  kind = jax.devices()[0].device_kind
  return next((v for k, v in PEAK_FLOPS.items() if kind.startswith(k)), None)


def train_flops_per_token(n_params_matmul: int, n_layers: int, d_model: int, seq_len: int) -> float:
  """Model FLOPs of forward+backward per token: 6N for the weight matmuls plus the attention
  scores and mixing (2·2·L·d per layer forward, ×3 with backward). N excludes the embedding
  lookup (a gather), includes the output head."""
  return 6.0 * n_params_matmul + 12.0 * n_layers * d_model * seq_len


def model_flops_per_token(mcfg, seq_len: int) -> float:
  """`train_flops_per_token` of a model config (the embedding gather is not a matmul)."""
  from dlm import model as model_lib  # pylint: disable=g-import-not-at-top
  n_matmul = model_lib.count_params(mcfg) - mcfg.num_embeddings * mcfg.d_model
  return train_flops_per_token(n_matmul, mcfg.n_layers, mcfg.d_model, seq_len)


def mfu(tokens_per_sec: float, flops_per_token: float, n_devices: int) -> float | None:
  """Model FLOP utilisation against the chips' dense bf16 peak (None where the peak is unknown,
  e.g. on CPU)."""
  peak = peak_flops_per_device()
  return tokens_per_sec * flops_per_token / (peak * n_devices) if peak else None


class MetricsWriter:
  """One JSON object per logged step in <workdir>/metrics.jsonl, and TensorBoard events in
  <workdir>/tensorboard; process 0 writes, others are silent.

  On local disk each row is appended. Objects (gs://) have no append: the rows are kept and
  metrics.jsonl rewritten whole, and the event file is written on local disk and copied up,
  at most every `flush_seconds` and on `flush`, close or interpreter exit. A killed run loses
  at most its last `flush_seconds` of rows: resume replays those past its checkpoint; `flush`
  before a checkpoint keeps the earlier ones."""

  def __init__(self, workdir: str, start_step: int, flush_seconds: float = 30.0):
    self.active = jax.process_index() == 0
    self.path = epath.Path(workdir) / 'metrics.jsonl'
    self.tb = None
    self._remote = storage.is_remote(workdir)
    self._rows = []  # remote: the object's lines
    self._flush_seconds, self._flushed_at = flush_seconds, time.monotonic()
    if not self.active:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._truncate_after(start_step)
    tb_dir = epath.Path(workdir) / 'tensorboard'
    if self._remote:
      self._tb_remote, tb_dir = tb_dir, epath.Path(tempfile.mkdtemp(prefix='dlm_tb_'))
      atexit.register(self.flush)
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self.tb = SummaryWriter(os.fspath(tb_dir))

  def _truncate_after(self, step: int):
    """On resume from `step`, drop lines a killed run logged past its last checkpoint, so the
    file reads as one uninterrupted run (a fresh start, step 0, drops everything)."""
    if not self.path.exists():
      return
    keep = [ln for ln in self.path.read_text().splitlines()
            if ln.strip() and step > 0 and json.loads(ln)['step'] <= step]
    self._rows = keep
    self.path.write_text(''.join(ln + '\n' for ln in keep))

  def write(self, step: int, metrics: Mapping[str, float]):
    if not self.active:
      return
    row = {'step': int(step), **{k: float(v) for k, v in metrics.items()}}
    for k, v in row.items():
      if k != 'step':
        self.tb.add_scalar(k, v, step)
    if not self._remote:
      with self.path.open('a') as f:
        f.write(json.dumps(row) + '\n')
      return
    self._rows.append(json.dumps(row))
    if time.monotonic() - self._flushed_at >= self._flush_seconds:
      self.flush()

  def flush(self):
    """Remote workdirs: rewrites metrics.jsonl and copies the event files up (local files
    need nothing: every row is already appended)."""
    if not (self.active and self._remote and self.tb is not None):
      return
    self.path.write_text(''.join(ln + '\n' for ln in self._rows))
    self.tb.flush()
    self._tb_remote.mkdir(parents=True, exist_ok=True)
    for f in epath.Path(self.tb.logdir).iterdir():
      (self._tb_remote / f.name).write_bytes(f.read_bytes())
    self._flushed_at = time.monotonic()

  def close(self):
    if self.tb is None:
      return
    self.tb.close()
    if self._remote:
      self.flush()
      atexit.unregister(self.flush)
      shutil.rmtree(self.tb.logdir, ignore_errors=True)
    self.tb = None


def log(msg: str) -> None:
  """A progress line on stdout, printed once (by process 0)."""
  if jax.process_index() == 0:
    print(msg, flush=True)


def read_metrics(workdir: str) -> list[dict]:
  path = epath.Path(workdir) / 'metrics.jsonl'
  return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
