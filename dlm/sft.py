"""Supervised fine-tuning data (the RL warm start is SFT): a task's (prompt, demonstration)
pairs as batches for the one training loop (`dlm.train`, mode 'sft').

The prompt is never masked (LLaDA SFT): batches carry `maskable` (response positions) and
`attend` (not left padding). Problems come from the task (`dlm.tasks`); a seeded
`sft.problem_fraction` of the training problems is read here, and with `sft.disjoint` RL reads
only the rest. The stream is a grain iterator of shuffled index batches, identical on every
process; each process takes its contiguous share of the global batch.
"""
import contextlib

import grain
import jax
import numpy as np
from etils import epath

from dlm import data as data_lib
from dlm import task_tokens
from dlm import tasks
from dlm.tasks import base as tasks_base
from dlm import workdir as workdir_lib
from dlm.errors import ConfigError
from dlm.tokenizer import Tokenizer

_TOKENIZER_TEXTS = 5000  # training problems whose prompt + demonstration fit the tokenizer


# What a lazy demonstrator writes (`sft.demo_error`, the CPU demo's imperfect warm start): well
# formed and scored above 0, but usually wrong, so RL must learn from the reward to do better.
LAZY = {
    'countdown': lambda p: f"<answer>{'+'.join(map(str, p.numbers))}</answer>",  # all added
    'sudoku': lambda p: f"<answer>{p.puzzle.replace('0', '1')}</answer>",  # blanks as 1
}


def problem_split(split_cfg, seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
  """Indices of the training problems read by (the warm start / SFT, RL).

  SFT reads a `problem_fraction` of them; with `disjoint`, RL reads the rest, so a policy that
  memorised its warm-start problems still meets new ones in RL. The split is a seeded random
  one: deduplicated generation makes later problems rarer and harder, so a split by position
  would hand RL a harder distribution than the held-out set.
  """
  k = max(1, int(n * split_cfg.problem_fraction))
  if not split_cfg.disjoint:
    return np.arange(k), np.arange(n)
  perm = np.random.default_rng(seed + 11).permutation(n)
  return np.sort(perm[:k]), np.sort(perm[k:])


def validate(cfg) -> None:
  s = cfg.sft
  tasks.get(cfg.task.name)
  if s.response_length < 1:
    raise ConfigError(f'sft.response_length={s.response_length} must be ≥ 1')
  if not 0 <= s.demo_error < 1:
    raise ConfigError(f'sft.demo_error={s.demo_error} must be in [0, 1)')
  if s.demo_error > 0 and cfg.task.name not in LAZY:
    raise ConfigError(f'sft.demo_error needs a lazy demonstrator; tasks with one: {sorted(LAZY)}')
  if not 0 < s.problem_fraction <= 1 or (s.disjoint and s.problem_fraction == 1):
    raise ConfigError(f'sft.problem_fraction={s.problem_fraction} must be in (0, 1], and < 1 '
                      'with sft.disjoint=True (RL needs problems of its own)')


def _one_at_a_time(directory):
  """Serialises the processes of a multi-process run on one machine over `directory` (a single
  process takes no lock and touches nothing)."""
  if jax.process_count() == 1:
    return contextlib.nullcontext()
  return data_lib._workdir_lock(directory)  # pylint: disable=protected-access


def task_problems(cfg, workdir, data_dir=''):
  """(task, train problems, held-out problems) of the config's task; generated data is cached
  in `data_dir` (default <workdir>/tfds)."""
  task = tasks.get(cfg.task.name)
  data_dir = epath.Path(data_dir or epath.Path(workdir) / 'tfds')
  with _one_at_a_time(data_dir):  # processes of one run prepare the cache once, then read it
    train, held_out = task.problems(cfg.task, seed=cfg.seed, data_dir=data_dir)
  return task, train, held_out


def task_tokenizer(cfg, workdir, task, train):
  """The workdir's tokenizer, else one trained on the task's prompts and demonstrations."""
  with _one_at_a_time(epath.Path(workdir)):  # one process trains it, the others load it
    if workdir_lib.has_tokenizer(workdir):
      return workdir_lib.load_tokenizer(workdir)
    path = epath.Path(workdir) / workdir_lib.TOKENIZER
    texts = [f'{tasks_base.render_prompt(task, p, cfg.task.prompt, cfg.task.chat_template)} '
             f'{task.demonstration(p)}' for p in train[:_TOKENIZER_TEXTS]]
    return Tokenizer.train(texts, cfg.sft.vocab_size, path)


def demonstrations(cfg, task, train, rows) -> list[str]:
  """The SFT targets of training problems `rows`. A seeded `sft.demo_error` fraction of all
  training problems are the lazy demonstrator's, fixed per problem whatever the split."""
  lazy = np.random.default_rng(cfg.seed + 13).random(len(train)) < cfg.sft.demo_error
  return [LAZY[task.name](train[i]) if lazy[i] else task.demonstration(train[i]) for i in rows]


def index_iterator(n: int, batch: int, seed: int) -> grain.DatasetIterator:
  """Endless checkpointable grain stream of shuffled index batches (reshuffled every epoch)."""
  ds = grain.MapDataset.range(n).shuffle(seed=seed).repeat(None).batch(batch)
  return iter(ds.to_iter_dataset())


def local_rows(global_rows: np.ndarray, share: tuple[int, int] | None = None) -> np.ndarray:
  """Block `index` of `count` equal blocks of a global batch (`share`; default: this process's
  contiguous share, the batch sharding's layout)."""
  index, count = share or (jax.process_index(), jax.process_count())
  b = len(global_rows) // count
  return global_rows[index * b:(index + 1) * b]


def prepare(cfg, workdir, tokenizer=None, share=None) -> data_lib.Data:
  """SFT batches of the config's task. `tokenizer`: the init checkpoint's, else the workdir's
  (trained on the task texts on first use). `share` = (index, count): the block of every global
  batch this process reads (`sharding.share`; default: by process index)."""
  task, train, held_out = task_problems(cfg, workdir, cfg.data.tfds_data_dir)
  tok = tokenizer or task_tokenizer(cfg, workdir, task, train)
  if tokenizer is not None and jax.process_index() == 0:
    workdir_lib.save_tokenizer(tok, workdir)  # the workdir must load alone
  enc = task_tokens.Encoder(task, cfg.task, tok, cfg.sft.response_length, train + held_out)
  rows = problem_split(cfg.sft, cfg.seed, len(train))[0]
  problems = [train[i] for i in rows]
  prompt_ids, prompt_attend = enc.prompts(problems)
  response_ids = enc.responses(demonstrations(cfg, task, train, rows))
  B = cfg.data.batch_size

  def to_batch(index_batch):
    idx = local_rows(np.asarray(index_batch), share)
    return enc.examples(prompt_ids[idx], prompt_attend[idx], response_ids[idx])

  n_eval = min(len(held_out), cfg.data.eval_batches * B)
  eval_problems = [held_out[i % len(held_out)] for i in range(-(-n_eval // B) * B)]
  eval_ids, eval_attend = enc.prompts(eval_problems)
  eval_resp = enc.responses([task.demonstration(p) for p in eval_problems])
  eval_batches = [enc.examples(*(local_rows(a[i:i + B], share) for a in (eval_ids, eval_attend,
                                                                          eval_resp)))
                  for i in range(0, len(eval_problems), B)]
  it = index_iterator(len(rows), B, cfg.seed + 7)
  return data_lib.Data(tok, it, to_batch, eval_batches, B * (enc.P + enc.R))
