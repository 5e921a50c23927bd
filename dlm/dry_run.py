"""Dry run: compile a config's training step ahead of time for a named TPU slice (or this
machine) and report per-chip memory, without data, tokenizer, checkpoint, TPU or weights.

`python -m dlm.main --config=<any training config> --workdir=W --config.dry_run=v5p-32`

The step is the one the run would compile — pretraining or SFT (`trainer.compile_step` of the
diffusion objective, micro-batches) or the RL update (`rl.Learner`'s step for the configured
objective, n_t, mini-batches, micro-batches) with the config's model (remat, dtype) and mesh —
lowered from `jax.ShapeDtypeStruct`s that carry their shardings, so nothing is allocated. TPU
slices come from `jax.experimental.topologies` (needs libtpu: `pip install -e '.[tpu]'`);
`local` is this machine's own devices (its "HBM": a GPU's memory limit, else the host's RAM
shared by its devices). Prints parameters, EMA, optimizer state, batch, temporaries and total
bytes per chip against the chip's HBM, then one JSON line (`topology`, `chips`, `hbm_bytes`,
`argument_bytes`, `temp_bytes`, `total_bytes`, `fits`; also `mode`, `parameter_bytes`,
`optimizer_bytes`, `refused`, `compile_seconds`, `host_peak_bytes`); exit code 0 if the step
fits, 3 if not. XLA:TPU refuses to compile a program larger than HBM: the figures of its error
are reported the same way (`refused`: true), not a traceback.

`--config.dry_run=NAME@SIZE` (e.g. `v5p-8@48GB`, `local@2GiB`) checks against SIZE instead of
the chip's HBM (TPU: XLA still refuses above the real HBM).

Slice names (`TOPOLOGIES`) follow Cloud TPU's accelerator types: for v4 and v5p the number counts
TensorCores, two per chip (megacore: one JAX device per chip), so v5p-32 is 16 chips (2x2x4);
for v5e and v6e it counts chips (v5e-8 is 2x4). Shapes are the documented ones (cloud.google.com
/tpu/docs/v4, v5p, v5e, v6e); a raw libtpu name (`v5p:2x4x4`) is accepted too. HBM per chip is
what XLA:TPU itself allows a program (read from its out-of-memory errors in libtpu 0.0.42):
v4 30.75 GiB, v5e 15.75 GiB, v5p 95.74 GiB, v6e 31.25 GiB.

Assumptions (no tokenizer is read): a model with `num_embeddings=0` gets the vocabulary of the
tokenizer the run would train (`data.vocab_size`, `sft.vocab_size`, `warmstart.vocab_size`) + 1;
RL and SFT prompts are `PROMPT_TOKENS[task.prompt]` tokens (the run pads every prompt to the
longest, P): 256 for the d1 prompt (Countdown's under LLaDA-8B-Instruct's chat template is about
180 tokens, Sudoku's a little more) and 32 for `compact` (14 Countdown / 21 Sudoku measured with
the cpu presets' tokenizer). `model.dtype='auto'` compiles bfloat16 on TPU. Only the update
step is compiled: RL rollouts, ℓ_old (mini-batched RL) and evaluation are separate, smaller
programs.
"""
import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from dlm import attention
from dlm import host_memory
from dlm import model as model_lib
from dlm import sharding
from dlm import trainer as trainer_lib
from dlm.errors import ConfigError, DlmError

FITS, DOES_NOT_FIT = 0, 3  # exit codes
MODES = ('pretrain', 'sft', 'rl')
PROMPT_TOKENS = {'d1': 256, 'compact': 32}
GIB = 1 << 30

# generation: (libtpu chip config, TensorCores per chip counted in slice names, HBM bytes per
# chip as XLA:TPU allows a program, slice shapes by chip count)
_SHAPES_3D = {1: '1x1x1', 4: '2x2x1', 8: '2x2x2', 16: '2x2x4', 32: '2x4x4', 64: '4x4x4',
              128: '4x4x8', 256: '4x8x8', 512: '8x8x8', 1024: '8x8x16', 2048: '8x16x16',
              4096: '16x16x16', 6144: '16x16x24'}
_SHAPES_2D = {1: '1x1', 4: '2x2', 8: '2x4', 16: '4x4', 32: '4x8', 64: '8x8', 128: '8x16',
              256: '16x16'}
GENERATIONS = {
    'v4': ('megacore', 2, int(30.75 * GIB), {n: v for n, v in _SHAPES_3D.items() if n <= 4096}),
    'v5p': ('megacore', 2, int(95.74 * GIB), _SHAPES_3D),
    'v5e': ('default', 1, int(15.75 * GIB), _SHAPES_2D),
    'v6e': ('default', 1, int(31.25 * GIB), _SHAPES_2D),
}
# slice name -> (libtpu topology name, chip config, chips per host, HBM bytes per chip)
TOPOLOGIES = {}
for _gen, (_chip, _cores, _hbm, _shapes) in GENERATIONS.items():
  for _n, _shape in _shapes.items():
    _dims = [int(x) for x in _shape.split('x')] + [1] * (3 - _shape.count('x') - 1)
    # hosts: 2x2x1 chips (v4, v5p, v6e), 2x4 (v5e-8 and larger v5e); smaller slices one host.
    # v4-2 / v5p-2 (one chip) are not sold as slices: they answer "what does one chip hold".
    _host = (2, 4, 1) if _gen == 'v5e' and _n >= 8 else (2, 2, 1)
    _host = tuple(min(h, d) for h, d in zip(_host, _dims))
    TOPOLOGIES[f'{_gen}-{_n * _cores}'] = (f'{_gen}:{_shape}', _chip, _host, _hbm)


@dataclasses.dataclass
class Target:
  name: str
  devices: list
  hbm_bytes: int
  platform: str  # 'tpu' or the local backend's


def parse_size(text: str) -> int:
  m = re.fullmatch(r'\s*([0-9.eE+]+)\s*([KMGT]i?B?|B)?\s*', text)
  if not m:
    raise ConfigError(f'dry_run size {text!r}: write e.g. 48GB, 16GiB, 512MiB or a byte count')
  unit = (m.group(2) or 'B').rstrip('B')
  scale = {'': 1, 'K': 1e3, 'M': 1e6, 'G': 1e9, 'T': 1e12,
           'Ki': 2**10, 'Mi': 2**20, 'Gi': 2**30, 'Ti': 2**40}[unit]
  return int(float(m.group(1)) * scale)


def _xla_size(text: str) -> int:
  """'122.44G' (XLA's binary units) -> bytes."""
  m = re.fullmatch(r'([0-9.]+)([KMGT]?)i?B?', text.strip())
  return int(float(m.group(1)) * 1024 ** ' KMGT'.index(m.group(2) or ' '))


def target(spec: str) -> Target:
  """The devices and HBM of `spec`: a slice name (TOPOLOGIES), a libtpu name, or 'local'."""
  name, _, size = spec.partition('@')
  name = name.strip()
  if name == 'local':
    devices = jax.devices()
    stats = devices[0].memory_stats() or {}
    hbm = stats.get('bytes_limit') or (os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
                                       // len(devices))
    t = Target('local', devices, int(hbm), devices[0].platform)
  else:
    if name in TOPOLOGIES:
      topo, chip, host, hbm = TOPOLOGIES[name]
    elif ':' in name and name.split(':')[0] in GENERATIONS:
      gen, shape = name.split(':')
      chip, hbm = GENERATIONS[gen][0], GENERATIONS[gen][2]
      if not re.fullmatch(r'[0-9]+x[0-9]+(x[0-9]+)?', shape):
        raise ConfigError(f'dry_run={spec!r}: a libtpu topology is written like v5p:2x2x4')
      dims = [int(x) for x in shape.split('x')]
      topo, host = name, tuple(min(2, d) for d in dims[:2]) + (1,)
    else:
      raise ConfigError(f'dry_run={spec!r}: unknown topology; use local, a libtpu name such as '
                        f'v5p:2x2x4, or a slice: {slice_names()}')
    t = Target(name, tpu_devices(topo, chip, host), hbm, 'tpu')
  if size:
    t.hbm_bytes = parse_size(size)
  return t


def tpu_devices(topology_name: str, chip_config: str, chips_per_host) -> list:
  # Compiling needs no TPU, but libtpu takes a machine-wide lock unless told otherwise (another
  # process using jax with libtpu installed would hold it).
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  try:
    import libtpu  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise DlmError("a TPU dry run needs libtpu: pip install -e '.[tpu]' (or --config.dry_run="
                   'local for this machine)') from e
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    return list(topologies.get_topology_desc(
        platform='tpu', topology_name=topology_name, chip_config_name=chip_config,
        chips_per_host_bounds=tuple(chips_per_host), num_slices=1).devices)
  except jax.errors.JaxRuntimeError as e:
    raise ConfigError(f'libtpu has no topology {topology_name!r} ({chip_config}): '
                      f'{str(e).splitlines()[0]}') from e


def slice_names() -> str:
  """'v4-{2,8,…}, …': the slice names TOPOLOGIES knows, by generation."""
  return ', '.join(f'{g}-{{{",".join(str(n * c) for n in shapes)}}}'
                   for g, (_, c, _, shapes) in GENERATIONS.items())


# ------------------------------------------------------------------------------------------------
# The step of each mode, from abstract inputs


class PromptShape:
  """What rl.Learner reads of a task_tokens.Encoder: prompt width P and response length R."""

  def __init__(self, P: int, R: int):
    self.P, self.R = P, R


def prompt_tokens(cfg) -> int:
  style = cfg.task.prompt
  if style not in PROMPT_TOKENS:
    raise ConfigError(f'task.prompt={style!r}: the dry run assumes a prompt length only for '
                      f'{sorted(PROMPT_TOKENS)}')
  return PROMPT_TOKENS[style]


def model_config(model_section, vocab_size: int, platform: str) -> model_lib.ModelConfig:
  section = dict(model_section)
  if section.get('dtype') == 'auto' and platform == 'tpu':
    section['dtype'] = 'bfloat16'  # what 'auto' picks on an accelerator
  return model_lib.config_from(section, vocab_size + 1)


def _abstract(template: dict, shardings: dict) -> dict:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype,
                                                        sharding=s), template, shardings)


def training_step(cfg, mesh, platform: str):
  """(trainer, jitted step, abstract batch) of pretraining or SFT, as train.setup builds them;
  the abstract state is trainer.abstract_state."""
  from dlm import train  # pylint: disable=g-import-not-at-top
  c = ml_collections.ConfigDict(cfg.to_dict())
  if cfg.mode == 'pretrain':  # the vocabulary check reads a corpus or tokenizer: use the model's
    c.data.corpus, c.data.tokenizer = 'text_files', ''
    if c.model.num_embeddings > 0:
      c.data.vocab_size = c.model.num_embeddings - 1
  train.validate(c)
  rules, t = cfg.sharding.rules, cfg.train
  sharding.check_batch(cfg.data.batch_size, mesh, rules, t.microbatches, 'data.batch_size')
  if cfg.mode == 'pretrain':
    vocab, L = cfg.data.vocab_size, cfg.data.seq_len
    template = {'tokens': np.zeros((cfg.data.batch_size, L), np.int32)}
  else:
    vocab, L = cfg.sft.vocab_size, prompt_tokens(cfg) + cfg.sft.response_length
    B = cfg.data.batch_size
    template = {'tokens': np.zeros((B, L), np.int32), 'maskable': np.zeros((B, L), bool),
                'attend': np.zeros((B, L), bool)}
  trainer = trainer_lib.Trainer(model_config(cfg.model, vocab, platform), t, mesh, rules,
                                cfg.seed)
  shard = sharding.batch_shardings(template, mesh, rules)
  step = trainer.compile_step(train.diffusion_objective(cfg.diffusion, trainer.mcfg.mask_id),
                              shard)
  return trainer, step, _abstract(template, shard)


def rl_step(cfg, mesh, platform: str):
  """(trainer, jitted update, abstract batch) of RL, as rl.build builds them (the policy's
  architecture is the config's model section: no checkpoint is read)."""
  from dlm import rl  # pylint: disable=g-import-not-at-top
  c = ml_collections.ConfigDict(cfg.to_dict())
  if not c.init.checkpoint and c.warmstart.steps == 0:
    c.init.checkpoint = '<dry run: none read>'  # the policy's weights are not needed
  rl.validate(c)
  r = cfg.rl
  rows = r.num_prompts * r.group_size // (1 if r.objective == 'diffu_grpo' else r.num_minibatches)
  sharding.check_batch(rows, mesh, cfg.sharding.rules, cfg.train.microbatches,
                       'the responses of one update')
  trainer = trainer_lib.Trainer(model_config(cfg.model, cfg.warmstart.vocab_size, platform),
                                cfg.train, mesh, cfg.sharding.rules, cfg.seed)
  learner = rl.Learner(cfg, trainer, PromptShape(prompt_tokens(cfg), cfg.sampler.gen_length))
  return trainer, learner.step, _abstract(learner.batch_template(rows), learner.shard)


# ------------------------------------------------------------------------------------------------
# Per-chip sizes


def per_chip_bytes(tree: Any) -> int:
  """Bytes one device holds of a pytree of sharded ShapeDtypeStructs (the largest shard)."""
  total = 0
  for a in jax.tree.leaves(tree):
    shape = a.sharding.shard_shape(a.shape) if a.sharding is not None else a.shape
    total += math.prod(shape) * np.dtype(a.dtype).itemsize
  return total


_REFUSAL = (re.compile(r'required for [^(]*\(([0-9.]+[KMGT]?i?B?)\) exceeds available HBM '
                       r'\(([0-9.]+[KMGT]?i?B?)\)'),
            re.compile(r'Used ([0-9.]+[KMGT]?i?B?) of ([0-9.]+[KMGT]?i?B?) hbm'))


def parse_refusal(message: str) -> tuple[int, int] | None:
  """(required, available) bytes of XLA:TPU's out-of-memory compile error, else None."""
  if 'RESOURCE_EXHAUSTED' not in message and 'Ran out of memory' not in message:
    return None
  for pattern in _REFUSAL:
    m = pattern.search(message)
    if m:
      return _xla_size(m.group(1)), _xla_size(m.group(2))
  return None


def host_peak_bytes() -> int:
  """This process's peak resident memory on the host (weights are never allocated): its own,
  not that of a launcher or test worker that started it (`host_memory.resident_bytes`)."""
  resident = host_memory.resident_bytes()
  if resident is not None:
    return resident[1]
  import resource  # pylint: disable=g-import-not-at-top
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak if sys.platform == 'darwin' else peak * 1024  # bytes on macOS, kB elsewhere


def _gb(n: int) -> str:
  return f'{n / 1e9:10.3f} GB' if n >= 1e8 else f'{n / 1e6:10.3f} MB'


def run(cfg, workdir: str) -> int:
  """Compiles cfg's step for cfg.dry_run; prints the report; returns the exit code."""
  del workdir  # nothing is read or written
  if cfg.mode not in MODES:
    raise ConfigError(f'dry_run compiles a training step; mode={cfg.mode!r} has none (modes: '
                      f'{", ".join(MODES)})')
  tgt = target(cfg.dry_run)  # before anything else initialises a backend
  mesh = sharding.make_mesh(cfg.sharding, tgt.devices)
  build = rl_step if cfg.mode == 'rl' else training_step
  trainer, step, batch = build(cfg, mesh, tgt.platform)
  state = trainer.abstract_state
  sizes = {'parameters': per_chip_bytes(state.params),
           'EMA': per_chip_bytes(state.ema) if state.ema is not None else 0,
           'optimizer state': per_chip_bytes(state.opt_state) + per_chip_bytes(state.step),
           'batch': per_chip_bytes(batch)}
  n_params = sum(math.prod(a.shape) for a in jax.tree.leaves(state.params))
  print(f'dry run: {cfg.mode} step, {n_params:,} parameters ({trainer.mcfg.dtype} compute), on '
        f'{tgt.name}: {len(tgt.devices)} × {tgt.devices[0].device_kind}, mesh '
        f'{dict(mesh.shape)}', flush=True)
  t0 = time.time()
  refused = None
  try:
    with attention.compiling_for(tgt.platform):  # e.g. splash attention on TPU
      compiled = step.lower(state, batch).compile()
  except Exception as e:  # pylint: disable=broad-except
    refused = parse_refusal(str(e))
    if refused is None:
      raise
  seconds = time.time() - t0
  argument = sum(sizes.values())
  if refused:
    total, hbm = refused
    if '@' not in cfg.dry_run:
      tgt.hbm_bytes = hbm
    temp, output = max(total - argument, 0), 0
  else:
    ma = compiled.memory_analysis()
    argument = ma.argument_size_in_bytes
    output = ma.output_size_in_bytes - ma.alias_size_in_bytes
    temp = ma.temp_size_in_bytes
    total = argument + output + temp + ma.generated_code_size_in_bytes
  fits = refused is None and total <= tgt.hbm_bytes
  print('per chip:')
  for k, v in sizes.items():
    print(f'  {k:<26}{_gb(v)}')
  print(f'  {"arguments (all of them)":<26}{_gb(argument)}')
  if output:
    print(f'  {"outputs not donated":<26}{_gb(output)}')
  print(f'  {"temporaries" + (" (needed-args)" if refused else ""):<26}{_gb(temp)}')
  print(f'  {"total":<26}{_gb(total)}')
  print(f'  {"HBM" if tgt.platform == "tpu" else "memory":<26}{_gb(tgt.hbm_bytes)} '
        f'({tgt.hbm_bytes / GIB:.2f} GiB)')
  if refused:
    print(f'XLA refused to compile: the program needs {total / GIB:.2f} GiB per chip, '
          f'{hbm / GIB:.2f} GiB are available ({seconds:.0f} s)')
  else:
    print(f'compiled in {seconds:.0f} s; {"fits" if fits else "does NOT fit"}')
  print(json.dumps({'topology': tgt.name, 'chips': len(tgt.devices),
                    'hbm_bytes': int(tgt.hbm_bytes), 'argument_bytes': int(argument),
                    'temp_bytes': int(temp), 'total_bytes': int(total), 'fits': bool(fits),
                    'mode': cfg.mode, 'parameter_bytes': sizes['parameters'],
                    'optimizer_bytes': sizes['optimizer state'], 'refused': refused is not None,
                    'compile_seconds': round(seconds, 1), 'host_peak_bytes': host_peak_bytes()}))
  sys.stdout.flush()
  return FITS if fits else DOES_NOT_FIT
