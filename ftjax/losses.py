"""Masked next-token cross-entropy (pure functions, summed so callers can normalise)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Bool, Float, Int


def next_token_xent(
    logits: Float[Array, 'B T V'],
    targets: Int[Array, 'B T'],
    loss_mask: Bool[Array, 'B T'] | Int[Array, 'B T'],
) -> dict[str, jax.Array]:
  """Sums of the masked cross-entropy and of its bookkeeping.

  `targets[b, t]` is the token that should follow position t (the data pipeline
  shifts, so targets never cross a packed-segment boundary). Returns sums, not
  means: `loss_sum`, `tokens` (masked tokens), `correct` (argmax hits on them),
  and per-row `row_tokens` / `row_correct` for exact-match accuracy.
  """
  mask = loss_mask.astype(jnp.float32)
  logits = logits.astype(jnp.float32)
  xent = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  hits = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32) * mask
  return dict(
      loss_sum=jnp.sum(xent * mask),
      tokens=jnp.sum(mask),
      correct=jnp.sum(hits),
      row_tokens=jnp.sum(mask, axis=-1),
      row_correct=jnp.sum(hits, axis=-1),
  )


def mean_loss(loss_sum: jax.Array, tokens: jax.Array) -> jax.Array:
  """Mean over masked tokens; 0 (never NaN) when a batch has no masked token."""
  return loss_sum / jnp.maximum(tokens, 1.0)
