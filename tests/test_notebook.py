"""notebooks/quickstart.ipynb runs top to bottom (nbclient, a python3 kernel on CPU) at tiny
settings injected after its `parameters` cell, and its outputs are the runs' real results: the
pretraining loss fell, samples were printed, the RL run's plot is displayed inline, the LLaDA
cells imported the tiny LLaDA folder and sampled from it, the dry run reported a fit."""
import base64
import json
import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient
from traitlets.config import Config

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / 'notebooks' / 'quickstart.ipynb'
PRETRAIN_STEPS = 40  # log_every 10: losses at steps 1, 10, …, 40


def tagged(nb, tag):
  cells = [c for c in nb.cells if tag in c.metadata.get('tags', ())]
  assert len(cells) == 1, f'expected one cell tagged {tag!r}, found {len(cells)}'
  return cells[0]


def text(cell) -> str:
  return ''.join(o.get('text', '') for o in cell.outputs if o.output_type == 'stream')


def test_stored_clean():
  """Stored without outputs or execution counts, as nbformat 4 that validates."""
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  assert nb.nbformat == 4
  code = [c for c in nb.cells if c.cell_type == 'code']
  assert all(not c.outputs and c.execution_count is None for c in code)
  assert code[0] is tagged(nb, 'parameters')
  assert 'RUN_LLADA = False' in code[0].source  # CI must never download the 16 GB model


@pytest.fixture(scope='module')
def executed(tmp_path_factory):
  """The notebook executed in its own folder (as `jupyter notebook notebooks/…` would), with
  the parameters shrunk by a cell after `parameters` (papermill's convention)."""
  work = tmp_path_factory.mktemp('quickstart')
  nb = nbformat.read(NOTEBOOK, as_version=4)
  params = tagged(nb, 'parameters')
  overrides = nbformat.v4.new_code_cell(
      f'INSTALL = False\nWORKDIR = {str(work)!r}\nPRETRAIN_STEPS = {PRETRAIN_STEPS}\n'
      "RL_PRESET = 'tiny'\nRL_STEPS = 0\nRUN_LLADA = False\nDRY_RUN = 'local'")
  nb.cells.insert(nb.cells.index(params) + 1, overrides)
  env = os.environ.copy()  # conftest's JAX_PLATFORMS=cpu, 8 CPU devices, compilation cache
  env['JAX_PLATFORMS'] = 'cpu'
  ipc = Config()
  ipc.KernelManager.transport = 'ipc'  # local sockets: no TCP ports, no unencrypted-TCP warning
  ipc.KernelManager.ip = str(work / 'kernel')  # socket path prefix (relative: cwd-dependent)
  client = NotebookClient(nb, timeout=300, kernel_name='python3', config=ipc,
                          resources={'metadata': {'path': str(REPO / 'notebooks')}})
  client.execute(env=env)  # raises CellExecutionError on the first failing cell
  return nb, work


def test_no_cell_errored(executed):
  nb, _ = executed
  errors = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs
            if o.output_type == 'error']
  assert not errors
  assert all(c.execution_count for c in nb.cells if c.cell_type == 'code')


def test_pretraining_loss_fell(executed):
  nb, work = executed
  rows = [json.loads(ln) for ln in (work / 'pretrain' / 'metrics.jsonl').read_text().splitlines()]
  losses = [r['train/loss'] for r in rows if 'train/loss' in r]
  assert rows[-1]['step'] == PRETRAIN_STEPS
  assert losses[-1] < losses[0] - 0.5  # ln 256 ≈ 5.5 nats at the start
  printed = text(tagged(nb, 'pretrain_loss'))
  assert f"{losses[0]:.3f} (step 1) -> {losses[-1]:.3f} (step {PRETRAIN_STEPS})" in printed
  assert any('image/png' in o.get('data', {}) for o in tagged(nb, 'pretrain_loss').outputs)


def test_samples_printed(executed):
  nb, work = executed
  records = [json.loads(ln)
             for ln in (work / 'pretrain' / 'samples.jsonl').read_text().splitlines()]
  assert [r['prompt'] for r in records] == ['alice has a', '3 times 4 is', '']
  assert all(len(r['tokens']) == 48 for r in records)  # configs/sample.py's gen_length
  printed = text(tagged(nb, 'sample'))
  for r in records:
    assert f"{r['prompt']!r} → {r['text']!r}" in printed
  api = [ln for ln in text(tagged(nb, 'sample_api')).splitlines() if 'network calls' in ln]
  assert len(api) == 2  # one line per prompt
  calls = [int(ln.rsplit('(', 1)[1].split()[0]) for ln in api]
  assert all(0 < c <= 32 for c in calls)  # cached RADD: a call only where one of 32 tokens appeared


def test_rl_metrics_and_inline_plot(executed):
  nb, work = executed
  rl_dir = work / 'rl_countdown_tiny'
  rows = [json.loads(ln) for ln in (rl_dir / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows if 'rl/reward_mean' in r] == [1, 2, 3, 4]
  assert [r['step'] for r in rows if 'eval/accuracy' in r] == [0, 2, 4]
  pngs = [o['data']['image/png'] for o in tagged(nb, 'rl').outputs
          if 'image/png' in o.get('data', {})]
  assert len(pngs) == 1
  assert base64.b64decode(pngs[0]) == (rl_dir / 'plots' / 'rl.png').read_bytes()
  assert 'held-out greedy accuracy' in text(tagged(nb, 'rl_eval'))


def test_llada_cells_import_the_tiny_folder(executed):
  nb, work = executed
  llada = work / 'llada'
  assert (llada / 'checkpoints' / '0').is_dir() and (llada / 'tokenizer.json').is_file()
  assert not (work / 'LLaDA-8B-Instruct').exists()  # nothing downloaded
  sample = json.loads((llada / 'samples.jsonl').read_text().splitlines()[0])
  assert sample['prompt'].startswith('Lily can run')
  assert f"→ {sample['text']!r}" in text(tagged(nb, 'llada_sample'))


def test_runtime_and_dry_run(executed):
  nb, _ = executed
  assert 'model.dtype=auto -> float32, model.attention=auto -> xla' in text(
      tagged(nb, 'runtime'))
  out = text(tagged(nb, 'dry_run'))
  report = json.loads([ln for ln in out.splitlines() if ln.startswith('{')][-1])
  assert report['chips'] == 8 and report['total_bytes'] > 0
  assert out.splitlines()[-1] == ('fits' if report['fits'] else 'does not fit')
