"""Eval mode: zero-shot perplexity against an exact value, the Wilson interval, config errors.
(Task evaluation is tested in test_rl.py on the RL runs it shares with the RL tests.)"""
import json
import math

import numpy as np
import pytest

from configs import eval as eval_configs
from configs import pretrain
from dlm import data, evaluate, train
from dlm.errors import ConfigError


@pytest.fixture(scope='module')
def untrained(tmp_path_factory):
  """A pretraining workdir whose checkpoint is the initial model: the RADD head is zero, so
  every real token has probability 1/V at every masked position."""
  w = tmp_path_factory.mktemp('untrained')
  c = pretrain.get_config('tiny')
  c.data.update(builtin_documents=300, vocab_size=96, seq_len=32, batch_size=8, eval_batches=1)
  c, _, d, trainer, ckpt, _ = train.setup(c, str(w))
  ckpt.save(1, trainer.to_items(trainer.init_state()), data.all_iterator_states(d.iterator),
            c.to_dict())
  ckpt.wait()
  ckpt.close()
  return w, d.tokenizer.vocab_size


def ppl_config(w, text, **over):
  c = eval_configs.get_config('ppl')
  c.init.checkpoint = str(w)
  c.ppl.update(text_files=str(text), seq_len=16, num_draws=32, batch_size=4, **over)
  return c


@pytest.mark.parametrize('loss', ['k_dce', 'lambda_dce'])
def test_perplexity_of_a_uniform_model_is_its_vocabulary_size(untrained, tmp_path, loss):
  w, V = untrained
  text = tmp_path / 'eval.txt'
  text.write_text('alice has a red cat.\n\nbob likes apples and bread.\n\n' * 20)
  out = tmp_path / 'out'
  r = evaluate.run(ppl_config(w, text, loss=loss, max_sequences=10), str(out))
  saved = json.loads((out / 'eval.json').read_text())
  assert saved == json.loads(json.dumps(r)) and saved['n'] == 10 and saved['step'] == 1
  rows = [json.loads(l) for l in (out / 'eval_samples.jsonl').read_text().splitlines()]
  assert [x['sequence'] for x in rows] == list(range(10))
  if loss == 'k_dce':  # (L/k)·k·ln V for every draw: exact
    np.testing.assert_allclose([x['nll_per_token'] for x in rows], math.log(V), rtol=1e-5)
    np.testing.assert_allclose(r['ppl'], V, rtol=1e-4)
  else:  # unbiased: the interval holds the exact value, and it is a real interval
    lo, hi = r['ci95']
    assert lo < V < hi and hi / lo > 1.001
    assert abs(r['nll_per_token'] - math.log(V)) < 0.1


def test_wilson_interval():
  """Each bound is where the score test is exactly at its 95 % edge:
  (p̂ − p0)² = z² · p0 (1 − p0) / n (an identity, independent of the closed form)."""
  z = 1.959963984540054
  for k, n in ((61, 256), (3, 10), (0, 10), (256, 256), (1, 1)):
    lo, hi = evaluate.wilson(k, n)
    assert 0 <= lo <= k / n <= hi <= 1
    for p0 in (lo, hi):
      if 0 < p0 < 1:
        np.testing.assert_allclose((k / n - p0) ** 2, z * z * p0 * (1 - p0) / n, rtol=1e-9)
  assert evaluate.wilson(0, 10)[0] == 0 and math.isclose(evaluate.wilson(10, 10)[1], 1)


def test_eval_config_errors(untrained, tmp_path):
  w, _ = untrained
  with pytest.raises(ConfigError, match='ppl.text_files'):
    evaluate.run(ppl_config(w, ''), str(tmp_path))
  with pytest.raises(ConfigError, match='ppl.loss'):
    evaluate.run(ppl_config(w, 'x.txt', loss='t_dse'), str(tmp_path))
  short = tmp_path / 'short.txt'
  short.write_text('hi')
  with pytest.raises(ValueError, match='fewer than one row'):
    evaluate.run(ppl_config(w, short), str(tmp_path))
  c = eval_configs.get_config('countdown')
  c.eval.kind = 'bleu'
  with pytest.raises(ConfigError, match='eval.kind'):
    evaluate.run(c, str(tmp_path))


def test_perplexity_reads_a_tfds_split(untrained, tmp_path):
  """ppl.corpus='tfds' reads a prepared dataset's split: the same documents, hence (k-DCE on the
  uniform model: exact) the same perplexity as the text itself."""
  w, V = untrained
  docs = [f'doc {i}: alice has {i} red cats and bob likes apples.' for i in range(60)]
  (tmp_path / 'corpus.txt').write_text('\n\n'.join(docs) + '\n')
  cfg = pretrain.get_config('tiny').data
  cfg.update(corpus='text_files', text_files=str(tmp_path / 'corpus.txt'))
  _, _, held_out = data.prepare(cfg, tmp_path / 'prep')
  name = 'dlm_text_files/' + next((tmp_path / 'prep/tfds/dlm_text_files').iterdir()).name
  c = ppl_config(w, '', corpus='tfds', tfds_name=name, tfds_split='validation',
                 tfds_data_dir=str(tmp_path / 'prep/tfds'), loss='k_dce')
  assert sorted(evaluate.documents(c.ppl)) == sorted(
      data.example_text(held_out[i]) for i in range(len(held_out)))
  r = evaluate.run(c, str(tmp_path / 'out'))
  np.testing.assert_allclose(r['ppl'], V, rtol=1e-4)
