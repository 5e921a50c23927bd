"""Compiled temporaries of one pretraining gradient against `model.head_chunk`.

`python -m dlm.bench.head_memory [--vocab=50258 --batch=8 --seq_len=1024 --d_model=64
--n_layers=2] [--chunks=0,512,128]` compiles (never runs, allocates nothing) the λ-DCE loss's
gradient of a small-width model with a large vocabulary, where the output head dominates, once per
chunk size, and reports XLA's temporary bytes (`memory_analysis`) next to the size of one full
[B, L, V] float32 logits tensor. head_chunk=0 is the unchunked head. Prints a table and, last, one
JSON line.
"""
import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

from dlm import bench
from dlm import diffusion
from dlm import model as model_lib

_V = flags.DEFINE_integer('vocab', 50258, 'embedding rows (mask included)')
_B = flags.DEFINE_integer('batch', 8, 'rows')
_L = flags.DEFINE_integer('seq_len', 1024, 'tokens per row')
_D = flags.DEFINE_integer('d_model', 64, 'width (small, so the head dominates)')
_LAYERS = flags.DEFINE_integer('n_layers', 2, 'layers')
_CHUNKS = flags.DEFINE_list('chunks', ['0', '512', '128'], 'head_chunk values')


def temp_bytes(head_chunk: int) -> int:
  cfg = model_lib.ModelConfig(num_embeddings=_V.value, mask_id=_V.value - 1, d_model=_D.value,
                              n_layers=_LAYERS.value, n_heads=4, mlp_dim=4 * _D.value,
                              head_chunk=head_chunk)
  graphdef, params = nnx.split(nnx.eval_shape(lambda: model_lib.Transformer(cfg, nnx.Rngs(0))))
  tokens = jax.ShapeDtypeStruct((_B.value, _L.value), jnp.int32)

  def grad(params, tokens):
    loss = lambda p: diffusion.diffusion_loss(nnx.merge(graphdef, p).token_logp, tokens,
                                              jax.random.key(0), mask_id=cfg.mask_id)[0].mean()
    return jax.grad(loss)(params)

  return jax.jit(grad).lower(params, tokens).compile().memory_analysis().temp_size_in_bytes


def main(argv):
  del argv
  out = {'vocab': _V.value, 'batch': _B.value, 'seq_len': _L.value,
         'full_logits_bytes': _B.value * _L.value * _V.value * 4}
  for c in map(int, _CHUNKS.value):
    out[f'temp_bytes_chunk_{c}'] = temp_bytes(c)
  bench.print_report(out)


if __name__ == '__main__':
  app.run(main)
