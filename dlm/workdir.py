"""A run directory as a model: load parameters, tokenizer and saved config from it alone.

Every dlm workdir that holds checkpoints (pretraining, SFT, RL) also holds its tokenizer: dlm's
sentencepiece `tokenizer.model`, or an imported model's Hugging Face `tokenizer.json` (LLaDA,
RADD's GPT-2; with `tokenizer_config.json` and its chat template). Each
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
from dlm.errors import ConfigError, MissingFileError
from dlm.tokenizer import Tokenizer

TOKENIZER = 'tokenizer.model'
HF_TOKENIZER = 'tokenizer.json'


class Loaded(NamedTuple):
  tokenizer: Any  # Tokenizer | HFTokenizer | None
  mcfg: model_lib.ModelConfig
  graphdef: Any
  params: Any
  config: dict  # the config the step was saved with
  step: int


def has_tokenizer(workdir) -> bool:
  d = epath.Path(workdir)
  return (d / TOKENIZER).exists() or (d / HF_TOKENIZER).exists()


def load_tokenizer(workdir):
  """The workdir's tokenizer: a dlm.tokenizer.Tokenizer (tokenizer.model) or a
  dlm.hf_tokenizer.HFTokenizer (tokenizer.json), both with encode/decode/eos_id/mask_id."""
  d = epath.Path(workdir)
  if (d / TOKENIZER).exists():
    return Tokenizer.load(d / TOKENIZER)
  if (d / HF_TOKENIZER).exists():
    from dlm.hf_tokenizer import HFTokenizer  # pylint: disable=g-import-not-at-top
    return HFTokenizer.load(d)
  raise MissingFileError(f'{workdir} has neither {TOKENIZER} nor {HF_TOKENIZER}: not a dlm run '
                         'directory, or an import without a tokenizer (python -m dlm.convert '
                         '--tokenizer=…)')


def save_tokenizer(tok, workdir) -> None:
  """Writes `tok` into `workdir` (so the workdir loads alone) in its own format."""
  if isinstance(tok, Tokenizer):
    tok.save(epath.Path(workdir) / TOKENIZER)
  else:
    tok.save(workdir)


def model_config(model_section: dict, tok) -> model_lib.ModelConfig:
  """The model of `model_section`, sized from the tokenizer where it says num_embeddings=0; the
  tokenizer's mask id must be the model's."""
  mcfg = model_lib.config_from(model_section, tok.vocab_size + 1)
  if tok.mask_id != mcfg.mask_id or tok.vocab_size > mcfg.num_embeddings:
    raise ConfigError(f'tokenizer has {tok.vocab_size} tokens + mask id {tok.mask_id}, but '
                      f'model.num_embeddings={mcfg.num_embeddings}, model.mask_id={mcfg.mask_id}; '
                      'set both to 0 / -1 to size the model from the tokenizer')
  return mcfg


def load(workdir, step: int = -1, use_ema: bool = True, mesh=None, devices=None,
         need_tokenizer: bool = True) -> Loaded:
  """The model of `workdir`'s checkpoint `step` (latest when < 0): EMA parameters when the run
  kept them and `use_ema`, else the raw ones. Sharded over `mesh` (default: FSDP over all
  devices, with the run's own sharding rules). need_tokenizer=False reads no tokenizer
  (tokenizer None; export copies the tokenizer files as they are)."""
  ckpt = ckpt_lib.Checkpointer(workdir, read_only=True)
  try:
    steps = ckpt.all_steps()
    step = (max(steps) if steps else None) if step < 0 else step
    if step is None or step not in steps:
      raise MissingFileError(f'no checkpoint {"" if step is None else step} in {ckpt.directory}'
                             f' (steps present: {sorted(steps) or "none"})')
    config = ckpt.restore_config(step)
    if need_tokenizer:
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


def base_params(loaded: Loaded):
  """The loaded parameters with any LoRA adapters folded into the base weights: the same
  function, in the layout of a model without adapters (a run's own adapters start fresh)."""
  return model_lib.merge_lora(loaded.params, loaded.mcfg)


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

