"""SentencePiece behind one small interface, with the absorbing mask token appended (RADD).

Ids `0 .. V-1` are sentencepiece pieces (pad 0, eos 1, unk 2, no bos: documents are joined by EOS
only, as in the RADD / GPT-2 recipe); the mask token is id `V`, one past the real vocabulary, so a
model has `V + 1` embedding rows and its log-softmax runs over the first `V` only (SPEC §2).
"""
from __future__ import annotations

import io
from collections.abc import Iterable, Iterator, Sequence

from etils import epath
import sentencepiece as spm

from dlm import storage
from dlm.errors import DataError, MissingFileError

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
MASK_TEXT = '▒'  # how a still-masked position renders in decoded samples
# Byte fallback spends 256 pieces on raw bytes; below this size they would crowd out real merges,
# so small vocabularies map unseen characters to <unk> instead.
_BYTE_FALLBACK_MIN_VOCAB = 512
_CHUNK_CHARS = 2000  # sentencepiece skips over-long "sentences"; long documents are fed in chunks


class Tokenizer:
  """A sentencepiece model plus the mask convention. Picklable (carries the model proto)."""

  def __init__(self, model_proto: bytes):
    self._proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size = self._sp.get_piece_size()
    self.pad_id, self.eos_id, self.unk_id = (self._sp.pad_id(), self._sp.eos_id(),
                                             self._sp.unk_id())
    self.mask_id = self.vocab_size
    if min(self.pad_id, self.eos_id, self.unk_id) < 0:
      raise DataError('tokenizer model must define pad, eos and unk pieces')

  @classmethod
  def train(cls, texts: Iterable[str], vocab_size: int, path) -> Tokenizer:
    """Trains a deterministic BPE model on `texts` and writes it to `path`.

    BPE stops early when the corpus has no more pairs to merge, so the result may hold fewer than
    `vocab_size` pieces; `tokenizer.vocab_size` is always the real count V.
    """
    byte_fallback = vocab_size >= _BYTE_FALLBACK_MIN_VOCAB
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_chunks(texts), model_writer=model, vocab_size=vocab_size,
        model_type='bpe', byte_fallback=byte_fallback, character_coverage=1.0,
        hard_vocab_limit=False, split_digits=True,
        # identity normalisation keeps newlines and repeated spaces: decode(encode(x)) == x
        normalization_rule_name='identity', remove_extra_whitespaces=False,
        max_sentence_length=4 * _CHUNK_CHARS + 16,
        pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
        num_threads=1, minloglevel=2)
    tok = cls(model.getvalue())
    tok.save(path)
    return tok

  def save(self, path) -> None:
    """Writes the model atomically: a reader never sees a half-written file."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    storage.write_atomic(path, self._proto)

  @classmethod
  def load(cls, path) -> Tokenizer:
    path = epath.Path(path)
    if not path.exists():
      raise MissingFileError(f'sentencepiece model not found: {path}')
    return cls(path.read_bytes())

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`; pad is dropped and the mask id shows as MASK_TEXT (samples mid-denoising)."""
    pieces = []
    for i in map(int, ids):
      if i == self.pad_id:
        continue
      if not 0 <= i <= self.mask_id:
        raise ValueError(f'token id {i} outside [0, {self.mask_id}]')
      pieces.append(MASK_TEXT if i == self.mask_id else self._sp.id_to_piece(i))
    return self._sp.decode_pieces(pieces)  # unknown pieces (the mask text) pass through verbatim

  def __getstate__(self):
    return {'model_proto': self._proto}

  def __setstate__(self, state):
    self.__init__(state['model_proto'])

  def __repr__(self):
    return f'Tokenizer(vocab_size={self.vocab_size}, mask_id={self.mask_id})'


def _chunks(texts: Iterable[str]) -> Iterator[str]:
  for text in texts:
    for start in range(0, len(text), _CHUNK_CHARS):
      yield text[start:start + _CHUNK_CHARS]
