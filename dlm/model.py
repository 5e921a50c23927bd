"""The time-free bidirectional transformer (RADD / LLaDA families) in Flax NNX."""
import jax
import jax.numpy as jnp


def real_log_softmax(logits_BxLxV: jax.Array, mask_id: int) -> jax.Array:
  """Float32 log-probabilities with the mask column removed from the support (SPEC §2).

  The mask row exists for checkpoint compatibility only: it gets log-prob -inf and never
  receives probability mass, so a loss or sampler can never produce the mask token.
  """
  logits = logits_BxLxV.astype(jnp.float32)
  is_mask = jnp.arange(logits.shape[-1]) == mask_id
  logits = jnp.where(is_mask, -jnp.inf, logits)
  return jax.nn.log_softmax(logits, axis=-1)
