"""Task problems as fixed-shape token arrays: prompts left-padded to P tokens, responses of R.

One width P for every problem of a task configuration (training and held-out), so the warm
start, the RL rollouts and evaluation compile once and see the same layout.
"""
import numpy as np

from dlm.errors import ConfigError
from dlm.tasks import base as tasks_base


def left_pad(rows: list[list[int]], width: int) -> tuple[np.ndarray, np.ndarray]:
  """Prompts right-aligned in [len(rows), width] (generation follows every prompt directly)."""
  ids = np.zeros((len(rows), width), np.int32)
  mask = np.zeros((len(rows), width), bool)
  for i, r in enumerate(rows):
    if r:
      ids[i, width - len(r):], mask[i, width - len(r):] = r, True
  return ids, mask


class Encoder:
  """prompt / response text ↔ token arrays for one task, tokenizer and response length R.
  `tok`: a dlm.tokenizer.Tokenizer or dlm.hf_tokenizer.HFTokenizer (encode, decode, eos_id)."""

  def __init__(self, task, task_cfg, tok, response_length: int, problems):
    self.task, self.task_cfg, self.tok, self.R = task, task_cfg, tok, response_length
    self.P = max(len(tok.encode(self.prompt_text(p))) for p in problems)

  def prompt_text(self, problem) -> str:
    return tasks_base.render_prompt(self.task, problem, self.task_cfg.prompt,
                                    self.task_cfg.chat_template, self.tok)

  def prompts(self, problems) -> tuple[np.ndarray, np.ndarray]:
    """(ids_BxP, attend_BxP) of the problems' prompts."""
    return left_pad([self.tok.encode(self.prompt_text(p)) for p in problems], self.P)

  def responses(self, texts) -> np.ndarray:
    """ids_BxR: each text's tokens followed by EOS padding (LLaDA SFT)."""
    out = np.full((len(texts), self.R), self.tok.eos_id, np.int32)
    for i, text in enumerate(texts):
      ids = self.tok.encode(text)
      if len(ids) >= self.R:
        raise ConfigError(f'the response {text[:80]!r} takes {len(ids)} tokens; raise the '
                          f'response length (sampler.gen_length) above {self.R}')
      out[i, :len(ids)] = ids
    return out

  def examples(self, prompt_ids_BxP, prompt_attend_BxP, response_ids_BxR) -> dict:
    """{tokens, maskable, attend}: prompt + response; only response positions are maskable."""
    tokens = np.concatenate([prompt_ids_BxP, response_ids_BxR], 1)
    maskable = np.zeros(tokens.shape, bool)
    maskable[:, self.P:] = True
    attend = np.concatenate([prompt_attend_BxP, np.ones(response_ids_BxR.shape, bool)], 1)
    return {'tokens': tokens, 'maskable': maskable, 'attend': attend}

  def completion(self, row_T) -> str:
    """The response text of a token row, up to its first EOS."""
    gen = [int(t) for t in row_T[self.P:]]
    return self.tok.decode(gen[:gen.index(self.tok.eos_id)] if self.tok.eos_id in gen else gen)
