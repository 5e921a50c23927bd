"""Task evaluation (d1 protocol): greedy decoding of held-out prompts, scored by the task's reward.

Used by the RL loop at its eval steps; any registered task works (`dlm.tasks`).
"""
import jax
import numpy as np

from dlm import sampling
from dlm.tasks import base as tasks_base


def rollout(graphdef, params, enc, problems, key, scfg: sampling.SamplerConfig):
  """(tokens_BxT, attend_BxT): each problem's prompt followed by a sampled response."""
  ids, mask = enc.prompts(problems)
  tokens, _ = sampling.sample_params(graphdef, params, ids, mask, key, cfg=scfg)
  return tokens, np.concatenate([mask, np.ones((len(problems), enc.R), bool)], 1)


def rewards(task, enc, tokens_BxT, problems) -> tuple[np.ndarray, int]:
  """(rewards, number of rewards that raised): model output is untrusted text."""
  completions = [enc.completion(row) for row in np.asarray(tokens_BxT)]
  return tasks_base.score(task, completions, problems)


def task_accuracy(graphdef, params, task, enc, problems, scfg: sampling.SamplerConfig,
                  batch_size: int) -> dict[str, float]:
  """Fraction of problems with full reward (and the mean reward) under greedy decoding.
  Every batch has one shape (the last is padded), so it compiles once."""
  full, scores = [], []
  for i in range(0, len(problems), batch_size):
    chunk = problems[i:i + batch_size]
    padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
    tokens, _ = rollout(graphdef, params, enc, padded, jax.random.key(0), scfg)
    r, _ = rewards(task, enc, tokens, padded)
    scores.extend(r[:len(chunk)])
    full.extend(r[:len(chunk)] == 1.0)
  return {'accuracy': float(np.mean(full)), 'reward_mean': float(np.mean(scores))}
