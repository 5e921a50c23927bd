"""The default RL preset (configs/rl_countdown.py, the paper's settings) on an imported
LLaDA-format checkpoint: the Instruct chat template around the d1 prompt, semi_ar rollouts, rewards,
the BGPO update, held-out evaluation on d1's test file, checkpoints and resume. Only sizes are
overridden (steps, prompts, lengths), exactly as a user shrinks a run.

A random tiny model never writes `<answer>`, so Countdown's reward is 0 everywhere and every group
advantage is 0: the update would be a no-op. To drive a real update the rollouts' rewards are
replaced by a deterministic function of the completion text; held-out evaluation keeps
Countdown's own reward."""
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import rl_countdown
from dlm import convert
from dlm import evaluate
from dlm import metrics as metrics_lib
from dlm import rl
from dlm import workdir as workdir_lib
from dlm.tasks import base as tasks_base

TINY = Path(__file__).resolve().parent / 'data' / 'llada_tiny'


@pytest.fixture(scope='module')
def imported(tmp_path_factory):
  return convert.import_checkpoint(TINY, tmp_path_factory.mktemp('import') / 'llada')


def paper_preset(init: str, num_steps: int, eval_file: str = 'd1'):
  c = rl_countdown.get_config()  # the default preset
  c.init.checkpoint = init
  c.task.eval_file = eval_file
  c.task.train_size = 64
  c.sampler.update(gen_length=32, steps=16, block_length=16)
  c.eval_sampler.update(steps=16, batch_size=16)
  c.rl.update(num_steps=num_steps, num_prompts=4, group_size=2, num_mc=2, eval_every=2,
              checkpoint_every=1)
  return c


def text_rewards(task, enc, tokens_BxT, problems):
  """Rollout rewards that vary between completions (non-zero advantages)."""
  texts = [enc.completion(row) for row in np.asarray(tokens_BxT)]
  return np.asarray([(sum(map(ord, t)) % 7) / 6 for t in texts], np.float32), 0


@pytest.fixture(scope='module')
def resumed(imported, tmp_path_factory):
  """A 2-step run, then the same command with num_steps=3: it resumes from step 2.
  (That a resumed run equals an uninterrupted one is tested on this same loop in test_rl.py.)"""
  w = tmp_path_factory.mktemp('rl')
  d1_head = w.parent / 'd1_head.jsonl'  # the first 16 of d1's 256 test problems (time)
  lines = (tasks_base.DATA_DIR / 'countdown_cd3_test.jsonl').read_text().splitlines()
  d1_head.write_text('\n'.join(lines[:16]) + '\n')
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(evaluate, 'rewards', text_rewards)
    rl.run(paper_preset(imported, 2, str(d1_head)), str(w))
    first = metrics_lib.read_metrics(w)
    rl.run(paper_preset(imported, 3, str(d1_head)), str(w))
  return w, first


def test_preset_takes_the_model_prompt_and_sampler_of_the_import(imported, tmp_path):
  setup = rl.build(paper_preset(imported, 1), str(tmp_path))
  tok = workdir_lib.load_tokenizer(imported)
  assert setup.cfg.model.family == 'llada' and setup.cfg.model.d_model == 32
  assert setup.cfg.model.remat == 'full'  # how to run comes from the preset, the shapes from W
  assert setup.trainer.mcfg.mask_id == tok.mask_id == 400
  problem = setup.held_out[0]
  d1_prompt = setup.task.prompt(problem, 'd1')
  text = setup.enc.prompt_text(problem)
  assert text == tok.apply_chat_template([{'role': 'user', 'content': d1_prompt}])
  assert text.startswith('<|startoftext|><|start_header_id|>user<|end_header_id|>')
  assert text.endswith('<|start_header_id|>assistant<|end_header_id|>\n\n')
  assert len(setup.held_out) == 256  # d1's test file
  r, e = setup.learner.rollout_cfg, setup.learner.eval_cfg
  assert (r.strategy, r.temperature, r.remasking, r.cfg_scale) == ('semi_ar', 1.0,
                                                                   'low_confidence', 0.0)
  assert (e.strategy, e.temperature) == ('semi_ar', 0.0)
  setup.ckpt.close()


def test_rl_updates_evaluates_checkpoints_and_resumes(resumed, imported):
  w, first = resumed
  rows = metrics_lib.read_metrics(w)
  assert rows[:len(first)] == first  # resuming appends; steps 1–2 are not redone
  updates = [m for m in rows if 'rl/grad_norm' in m]
  assert [m['step'] for m in updates] == [1, 2, 3]
  assert all(m['rl/grad_norm'] > 0 and np.isfinite(m['rl/objective']) for m in updates)
  assert [m['step'] for m in rows if 'eval/accuracy' in m] == [0, 2, 3]
  assert sorted(int(p.name) for p in (w / 'checkpoints').iterdir()) == [1, 2, 3]
  before = workdir_lib.load(imported).params
  after = workdir_lib.load(w, use_ema=False)
  assert after.step == 3 and after.config['model']['family'] == 'llada'
  moved = jax.tree.map(lambda x, y: bool((np.asarray(x) != np.asarray(y)).any()), before,
                       after.params)
  assert all(jax.tree.leaves(moved))  # every parameter was updated


def test_countdown_reward_of_the_imported_policy(resumed):
  """The RL workdir loads alone (HF tokenizer copied in); held-out evaluation scored with
  Countdown's reward: an untrained model writes no answer, so every reward is 0."""
  w, _ = resumed
  tok = workdir_lib.load_tokenizer(w)
  assert tok.chat_template and tok.mask_id == 400
  rows = metrics_lib.read_metrics(w)
  evals = [r for r in rows if 'eval/accuracy' in r]
  assert evals and all(r['eval/accuracy'] == 0 and r['eval/reward_mean'] == 0 for r in evals)


def test_lora_on_the_imported_base_trains_only_the_adapters(imported, tmp_path):
  """--config.model.lora.rank=4 on the imported model: fresh adapters, the base is untouched."""
  d1_head = tmp_path / 'd1_head.jsonl'
  lines = (tasks_base.DATA_DIR / 'countdown_cd3_test.jsonl').read_text().splitlines()
  d1_head.write_text('\n'.join(lines[:8]) + '\n')
  c = paper_preset(imported, 1, str(d1_head))
  c.model.lora.update(rank=4, alpha=8.0)
  c.eval_sampler.batch_size = 8
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(evaluate, 'rewards', text_rewards)
    rl.run(c, str(tmp_path / 'w'))
  before = workdir_lib.load(imported).params
  after = workdir_lib.load(tmp_path / 'w', use_ema=False)
  assert after.config['model']['lora']['rank'] == 4 and after.mcfg.lora_rank == 4
  flat = lambda t: {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(t)}
  a, b = flat(after.params), flat(before)
  adapters = [k for k in a if 'lora_' in k]
  assert adapters and all(k not in b for k in adapters)
  assert all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in b)  # base frozen
  assert any(np.any(np.asarray(a[k]) != 0) for k in adapters if k.endswith("['b']"))
