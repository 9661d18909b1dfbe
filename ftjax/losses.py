"""Masked next-token cross-entropy (pure functions, summed so callers can normalise)."""

from __future__ import annotations

from collections.abc import Callable

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


def chunked_next_token_xent(
    hidden: Float[Array, 'B T D'],
    targets: Int[Array, 'B T'],
    loss_mask: Bool[Array, 'B T'] | Int[Array, 'B T'],
    logits_fn: Callable[[jax.Array], jax.Array],
    chunk: int,
) -> dict[str, jax.Array]:
  """`next_token_xent(logits_fn(hidden), ...)` without ever holding `[B, T, V]` logits.

  The sequence is cut into chunks of `chunk` positions; a scan computes each chunk's logits,
  reduces them to the sums and drops them, and the backward pass recomputes them chunk by
  chunk (`jax.checkpoint`). Peak logits memory is `[B, chunk, V]` in float32 instead of
  `[B, T, V]`, which dominates a small model's step at vocabularies of 128k-256k.
  """
  b, t = targets.shape
  if chunk <= 0 or chunk >= t:
    return next_token_xent(logits_fn(hidden), targets, loss_mask)
  n = -(-t // chunk)
  if n * chunk != t:  # pad to whole chunks; padded positions are masked out
    pad = n * chunk - t
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    loss_mask = jnp.pad(loss_mask, ((0, 0), (0, pad)))

  def split(x):
    return x.reshape(b, n, chunk, *x.shape[2:]).swapaxes(0, 1)

  @jax.checkpoint
  def one(h, tg, m):
    return next_token_xent(logits_fn(h), tg, m)

  def body(carry, xs):
    return jax.tree.map(jnp.add, carry, one(*xs)), None

  zeros = dict(loss_sum=jnp.zeros(()), tokens=jnp.zeros(()), correct=jnp.zeros(()),
               row_tokens=jnp.zeros((b,)), row_correct=jnp.zeros((b,)))
  out, _ = jax.lax.scan(body, zeros, (split(hidden), split(targets), split(loss_mask)))
  return out


def token_logps(logits: Float[Array, 'B T V'], targets: Int[Array, 'B T'],
                entropy: bool = False) -> tuple[jax.Array, ...]:
  """`log p(targets[b, t])` under `logits[b, t]` in float32, and whether the target is the
  argmax (float32 0/1): two `[B, T]` arrays; with `entropy`, also the distribution's entropy."""
  logits = logits.astype(jnp.float32)
  hits = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  logps = -optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  if not entropy:
    return logps, hits
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  return logps, hits, -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)


def chunked_token_logps(hidden: Float[Array, 'B T D'], targets: Int[Array, 'B T'],
                        logits_fn: Callable[[jax.Array], jax.Array],
                        chunk: int, entropy: bool = False) -> tuple[jax.Array, ...]:
  """`token_logps(logits_fn(hidden), targets, entropy)` chunk by chunk (as
  `chunked_next_token_xent`): never more than `[B, chunk, V]` logits at once, recomputed in the
  backward pass."""
  b, t = targets.shape
  if chunk <= 0 or chunk >= t:
    return token_logps(logits_fn(hidden), targets, entropy)
  n = -(-t // chunk)
  pad = n * chunk - t
  hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
  targets = jnp.pad(targets, ((0, 0), (0, pad)))

  def split(x):
    return x.reshape(b, n, chunk, *x.shape[2:]).swapaxes(0, 1)

  @jax.checkpoint
  def one(h, tg):
    return token_logps(logits_fn(h), tg, entropy)

  out = jax.lax.map(lambda xs: one(*xs), (split(hidden), split(targets)))  # [n, B, chunk] each
  return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(b, n * chunk)[:, :t], out)
