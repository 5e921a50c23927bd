"""A run directory as a model: load parameters, tokenizer and saved config from it alone.

Every dlm workdir that holds checkpoints (pretraining, SFT, RL) also holds `tokenizer.model`, and
each checkpoint step holds its config and its parameters as items of their own, so sampling, RL
initialisation and evaluation read exactly those: no corpus, no data preparation, no optimizer
state, and nothing is written into the source workdir.
"""
from typing import Any, NamedTuple

from etils import epath

from dlm import checkpoint as ckpt_lib
from dlm import model as model_lib
from dlm import sharding
from dlm import trainer as trainer_lib
from dlm.errors import MissingFileError
from dlm.tokenizer import Tokenizer

TOKENIZER = 'tokenizer.model'


class Loaded(NamedTuple):
  tokenizer: Tokenizer | None
  mcfg: model_lib.ModelConfig
  graphdef: Any
  params: Any
  config: dict  # the config the step was saved with
  step: int


def load_tokenizer(workdir) -> Tokenizer:
  path = epath.Path(workdir) / TOKENIZER
  if not path.exists():
    raise MissingFileError(f'{workdir} has no {TOKENIZER}: not a dlm run directory, or one '
                           'written by an older version')
  return Tokenizer.load(path)


def model_config(model_section: dict, tok: Tokenizer) -> model_lib.ModelConfig:
  return model_lib.config_from(model_section, tok.vocab_size + 1)


def load(workdir, step: int = -1, use_ema: bool = True, mesh=None, devices=None,
         need_tokenizer: bool = True) -> Loaded:
  """The model of `workdir`'s checkpoint `step` (latest when < 0): EMA parameters when the run
  kept them and `use_ema`, else the raw ones. Sharded over `mesh` (default: FSDP over all
  devices, with the run's own sharding rules). With need_tokenizer=False a workdir without
  tokenizer.model loads too (tokenizer None; e.g. an imported LLaDA, whose tokenizer is a
  Hugging Face tokenizer.json)."""
  ckpt = ckpt_lib.Checkpointer(workdir, read_only=True)
  try:
    steps = ckpt.all_steps()
    step = (max(steps) if steps else None) if step < 0 else step
    if step is None or step not in steps:
      raise MissingFileError(f'no checkpoint {"" if step is None else step} in {ckpt.directory}'
                             f' (steps present: {sorted(steps) or "none"})')
    config = ckpt.restore_config(step)
    if need_tokenizer or (epath.Path(workdir) / TOKENIZER).exists():
      tok = load_tokenizer(workdir)
      mcfg = model_config(config['model'], tok)
    else:
      tok, mcfg = None, model_lib.config_from(config['model'])
    rules = tuple(tuple(r) for r in config['sharding']['rules'])
    if mesh is None:
      mesh = sharding.make_mesh({'data': 1, 'fsdp': -1, 'tensor': 1}, devices)
    graphdef, abstract = trainer_lib.abstract_params(mcfg, mesh, rules)
    params = ckpt.restore_params(step, abstract, use_ema)
  finally:
    ckpt.close()
  return Loaded(tok, mcfg, graphdef, params, config, step)


def latest_config(workdir) -> tuple[int, dict] | None:
  """(step, saved config) of the latest checkpoint, or None in a workdir without any."""
  if not (epath.Path(workdir) / 'checkpoints').exists():
    return None
  ckpt = ckpt_lib.Checkpointer(workdir, read_only=True)
  try:
    step = ckpt.latest_step()
    return None if step is None else (step, ckpt.restore_config(step))
  finally:
    ckpt.close()

