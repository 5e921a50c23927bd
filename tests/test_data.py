"""Tokenizer and grain/tfds data pipeline: ids, packing, per-process sharding, exact resume."""
import json
import pickle
import tempfile

from etils import epath
import numpy as np
import pytest

from configs import pretrain
from dlm import data
from dlm.tasks import countdown_tfds
from dlm.tokenizer import MASK_TEXT, Tokenizer

SEQ, BATCH = 64, 8
WORDS = 'apple river stone cloud tiger lemon piano forest candle rocket'.split()


def _data_cfg(**overrides):
  cfg = pretrain.get_config('tiny').data
  cfg.update(overrides)
  return cfg


def _unique_docs(n):
  """Documents that are all distinct and recognisable after tokenization."""
  rng = np.random.default_rng(0)
  return [f'doc {i}: ' + ' '.join(rng.choice(WORDS, rng.integers(3, 12))) + '.' for i in range(n)]


def _segments(batches, eos_id):
  """Complete EOS-terminated documents in the concatenated rows (the first one may be partial)."""
  stream = np.concatenate([b.reshape(-1) for b in batches]).tolist()
  cuts = [i for i, t in enumerate(stream) if t == eos_id]
  return [stream[a + 1:b] for a, b in zip(cuts, cuts[1:])]


@pytest.fixture(scope='module')
def builtin(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('builtin')
  cfg = _data_cfg(builtin_documents=800)
  return (cfg, workdir) + data.prepare(cfg, workdir)


@pytest.fixture(scope='module')
def text_corpus(tmp_path_factory):
  """300 distinct documents in three files, read through a glob (corpus='text_files')."""
  root = tmp_path_factory.mktemp('text')
  docs = _unique_docs(300)
  for k in range(3):
    (root / f'part{k}.txt').write_text('\n\n'.join(docs[k * 100:(k + 1) * 100]) + '\n')
  cfg = _data_cfg(corpus='text_files', text_files=f'{root}/part*.txt')
  return (docs, root / 'work') + data.prepare(cfg, root / 'work')


def test_tokenizer_ids_round_trip_and_mask(tmp_path):
  texts = _unique_docs(200) + ['multi\nline  text, with spaces.']
  tok = Tokenizer.train(texts, 256, tmp_path / 'tok.model')
  assert (tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2)
  assert max(tok.pad_id, tok.eos_id, tok.unk_id) < tok.vocab_size <= 256
  assert tok.mask_id == tok.vocab_size
  for text in texts[:5] + [texts[-1]]:
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids) and tok.decode(ids) == text
  ids = tok.encode('apple river')
  shown = tok.decode([tok.pad_id] + ids[:1] + [tok.mask_id] + ids[1:] + [tok.pad_id])
  assert MASK_TEXT in shown and shown.startswith('apple')
  with pytest.raises(ValueError):
    tok.decode([tok.mask_id + 1])
  loaded = Tokenizer.load(tmp_path / 'tok.model')
  assert loaded.encode(texts[0]) == tok.encode(texts[0]) and loaded.vocab_size == tok.vocab_size
  assert pickle.loads(pickle.dumps(tok)).encode(texts[0]) == tok.encode(texts[0])
  with pytest.raises(FileNotFoundError, match='nope.model'):
    Tokenizer.load(tmp_path / 'nope.model')


def test_large_vocab_byte_fallback_encodes_unseen_text(tmp_path):
  tok = Tokenizer.train(_unique_docs(200), 512, tmp_path / 'tok.model')
  text = 'zebra ünïcode → 象'  # characters never seen in training
  assert tok.unk_id not in tok.encode(text) and tok.decode(tok.encode(text)) == text


def test_builtin_corpus_is_deterministic(tmp_path):
  a = data.write_builtin_corpus(tmp_path / 'a', 300)
  b = data.write_builtin_corpus(tmp_path / 'b', 300)
  assert [f.read_bytes() for f in a] == [f.read_bytes() for f in b]
  assert len(data.split_documents(a[0].read_text())) == 300
  other = data.write_builtin_corpus(tmp_path / 'c', 300, seed=7)
  assert other[0].read_bytes() != a[0].read_bytes()


def test_prepare_reuses_dataset_and_tokenizer(builtin):
  cfg, workdir, tok, train, held_out = builtin
  assert len(train) + len(held_out) == 800 and 0 < len(held_out) < 80
  files = sorted((workdir / 'tfds').rglob('*.array_record*')) + [workdir / 'tokenizer.model']
  stamps = [f.stat().st_mtime_ns for f in files]
  tok2, train2, _ = data.prepare(cfg, workdir)
  assert [f.stat().st_mtime_ns for f in files] == stamps  # nothing rebuilt or retrained
  assert len(list((workdir / 'tfds' / 'dlm_text_files').iterdir())) == 1
  assert tok2.vocab_size == tok.vocab_size and train2[5] == train[5]


def test_train_batches_are_packed_documents(builtin):
  _, _, tok, train, _ = builtin
  it = data.make_train_iterator(train, tok, seq_len=SEQ, global_batch=BATCH, seed=0,
                                process_index=0, process_count=1)
  batches = [next(it) for _ in range(6)]
  for b in batches:
    assert b.shape == (BATCH, SEQ) and b.dtype == np.int32
    assert b.min() >= 0 and b.max() < tok.vocab_size and not (b == tok.mask_id).any()
  assert (batches[0] == tok.eos_id).sum() >= 2  # several documents share the rows
  documents = {tuple(tok.encode(data.example_text(train[i]))) for i in range(len(train))}
  segments = _segments(batches, tok.eos_id)
  assert len(segments) > 20 and all(tuple(s) in documents for s in segments)


def test_eval_batches_reproduce_held_out_in_order(builtin):
  _, _, tok, _, held_out = builtin
  kw = dict(seq_len=SEQ, global_batch=BATCH, num_batches=3, process_index=0, process_count=1)
  batches = data.eval_batches(held_out, tok, **kw)
  assert len(batches) == 3 and all(b.shape == (BATCH, SEQ) for b in batches)
  expected = []
  while len(expected) < 3 * BATCH * SEQ:  # the held-out split wraps around when short
    for i in range(len(held_out)):
      expected += tok.encode(data.example_text(held_out[i])) + [tok.eos_id]
  assert np.concatenate(batches).reshape(-1).tolist() == expected[:3 * BATCH * SEQ]
  again = data.eval_batches(held_out, tok, **kw)
  assert all((a == b).all() for a, b in zip(batches, again))


def test_checkpoint_resume_is_exact(builtin):
  _, _, tok, train, _ = builtin
  make = lambda: data.make_train_iterator(train, tok, seq_len=SEQ, global_batch=BATCH, seed=5,
                                          process_index=0, process_count=1)
  for k in (0, 3):  # k=0: empty packing remainder, the case a plain JSON round trip gets wrong
    it = make()
    for _ in range(k):
      next(it)
    state = data.iterator_state(it)
    assert isinstance(state, str) and json.loads(state)
    expected = [next(it) for _ in range(4)]
    restored = make()
    next(restored)  # a used iterator must be moved back, not just a fresh one
    data.restore_iterator(restored, state)
    assert all((a == b).all() for a, b in zip(expected, [next(restored) for _ in range(4)]))


def test_seed_controls_the_stream(builtin):
  _, _, tok, train, _ = builtin
  def first(seed):
    it = data.make_train_iterator(train, tok, seq_len=SEQ, global_batch=BATCH, seed=seed,
                                  process_index=0, process_count=1)
    return np.stack([next(it) for _ in range(3)])
  assert (first(1) == first(1)).all()
  assert (first(1) != first(2)).any()


def test_processes_read_disjoint_documents(text_corpus):
  docs, _, tok, train, _ = text_corpus
  seen = []
  for p in (0, 1):
    it = data.make_train_iterator(train, tok, seq_len=SEQ, global_batch=BATCH, seed=0,
                                  process_index=p, process_count=2)
    batches = [next(it) for _ in range(12)]
    assert all(b.shape == (BATCH // 2, SEQ) for b in batches)
    seen.append({tok.decode(s) for s in _segments(batches, tok.eos_id)})
  assert seen[0] and seen[1] and not seen[0] & seen[1]
  assert seen[0] | seen[1] <= set(docs)
  with pytest.raises(ValueError, match='divisible'):
    data.make_train_iterator(train, tok, seq_len=SEQ, global_batch=9, seed=0,
                             process_index=0, process_count=2)


def test_text_files_corpus_end_to_end_and_rebuild(text_corpus, tmp_path):
  docs, workdir, tok, train, held_out = text_corpus
  assert len(train) + len(held_out) == 300
  assert sorted(data.example_text(train[i]) for i in range(len(train))) == sorted(
      set(docs) - {data.example_text(held_out[i]) for i in range(len(held_out))})
  # an edited file gives a new fingerprint, hence a rebuilt dataset
  root = workdir.parent
  (root / 'part2.txt').write_text((root / 'part2.txt').read_text() + '\ndoc extra: apple.\n')
  cfg = _data_cfg(corpus='text_files', text_files=f'{root}/part*.txt')
  _, train2, held_out2 = data.prepare(cfg, workdir)
  assert len(train2) + len(held_out2) == 301


def test_tfds_corpus_reads_a_prepared_dataset(text_corpus, tmp_path):
  _, workdir, _, train, _ = text_corpus
  name = 'dlm_text_files/' + sorted(p.name for p in (workdir / 'tfds/dlm_text_files').iterdir())[0]
  cfg = _data_cfg(corpus='tfds', tfds_name=name, tfds_data_dir=str(workdir / 'tfds'),
                  tokenizer=str(workdir / 'tokenizer.model'))
  _, train2, held_out2 = data.prepare(cfg, tmp_path)
  assert len(train2) > 0 and len(held_out2) > 0 and 'text' in train2[0]


def test_missing_files_are_named(tmp_path):
  missing = tmp_path / 'missing.txt'
  with pytest.raises(FileNotFoundError, match='missing.txt'):
    data.prepare(_data_cfg(corpus='text_files', text_files=str(missing)), tmp_path / 'w')
  with pytest.raises(FileNotFoundError, match=r'nothing\*\.txt'):
    data.expand_paths(f'{tmp_path}/nothing*.txt')


def test_building_dlm_datasets_leaves_no_temp_directory(tmp_path, monkeypatch):
  """tfds looks a new dataset up in its bucket through a fresh temp directory it never removes;
  dlm's builders skip that look-up (their data is made locally)."""
  temp = tmp_path / 'temp'
  temp.mkdir()
  monkeypatch.setattr(tempfile, 'tempdir', str(temp))
  (tmp_path / 'a.txt').write_text('\n\n'.join(_unique_docs(20)) + '\n')
  files = [epath.Path(tmp_path / 'a.txt')]
  train, _ = data._text_files_sources(files, tmp_path / 'text')  # pylint: disable=protected-access
  source = countdown_tfds.data_source(tmp_path / 'cd', 'train', train_size=20, test_size=4,
                                      num_numbers=(3,))
  assert len(train) > 0 and len(source) == 20
  assert list(temp.iterdir()) == []
