"""Sampling with a KV cache: prefill the prompt once, then one token per step in one jitted loop.

Prompts are padded to a length bucket (a power of two) so prompts of different lengths reuse
one compiled program; the batch is padded to a multiple of the mesh's batch shards.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from ftjax import sharding
from ftjax.models import llama

MIN_BUCKET = 16


def bucket(length: int) -> int:
  """The padded prompt length a prompt of `length` tokens compiles for."""
  return max(MIN_BUCKET, 1 << max(length - 1, 0).bit_length())


def sample(logits: Float[Array, 'B V'], key: jax.Array, *, temperature: float,
           top_k: int | None, top_p: float | None) -> jax.Array:
  """One token per row: argmax at temperature 0, else from the top-k / nucleus-filtered softmax."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k:
    kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p is not None and top_p < 1.0:
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _decode_loop(state: nnx.State, tokens: Int[Array, 'B T'], mask: Int[Array, 'B T'],
                 key: jax.Array, *, graphdef: Any, max_new_tokens: int, temperature: float,
                 top_k: int | None, top_p: float | None, eos_id: tuple[int, ...] | None,
                 pad_id: int,
                 cache_dtype: Any) -> Int[Array, 'B N']:
  """Prefill, then a `while_loop` of single-token steps until every row is done."""

  def model() -> llama.Llama:
    # Fresh Variables at the current trace level: the layer scan refuses outer-level ones.
    return nnx.merge(graphdef, jax.tree.map(lambda x: x, state))

  batch, length = tokens.shape
  positions = jnp.where(mask > 0, jnp.cumsum(mask, axis=1) - 1, -1).astype(jnp.int32)
  lengths = jnp.sum(mask, axis=1).astype(jnp.int32)
  cache = llama.KVCache.empty(model().cfg, batch, length + max_new_tokens, cache_dtype)
  last = jnp.argmax(jnp.where(mask > 0, jnp.arange(length)[None], -1), axis=1)
  logits, cache = model().decode(tokens, positions, cache, 0, prefill=True, last=last)
  pick = functools.partial(sample, temperature=temperature, top_k=top_k, top_p=top_p)

  stops = jnp.asarray(eos_id if eos_id is not None else (), jnp.int32)

  def finish(token, done):
    token = jnp.where(done, pad_id, token)
    return token, done | jnp.isin(token, stops)

  key, sub = jax.random.split(key)
  first, done = finish(pick(logits[:, 0], sub), jnp.zeros(batch, bool))
  out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)

  def cond(carry):
    i, _, _, done, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, cache, out, done, key = carry
    previous = jax.lax.dynamic_index_in_dim(out, i - 1, axis=1)  # [B, 1]
    logits, cache = model().decode(previous, (lengths + i - 1)[:, None], cache, length + i - 1)
    key, sub = jax.random.split(key)
    token, done = finish(pick(logits[:, 0], sub), done)
    out = jax.lax.dynamic_update_slice_in_dim(out, token[:, None], i, axis=1)
    return i + 1, cache, out, done, key

  _, _, out, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), cache, out, done, key))
  return sharding.constrain(out, (None, None))  # replicated: every host can read every row


_decode_jit = jax.jit(_decode_loop, static_argnames=(
    'graphdef', 'max_new_tokens', 'temperature', 'top_k', 'top_p', 'eos_id', 'pad_id',
    'cache_dtype'))


def generate(model: llama.Llama, input_ids: Any, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             eos_id: int | Sequence[int] | None = None, *, prompt_mask: Any = None, pad_id: int = 0,
             mesh: jax.sharding.Mesh | None = None, rules: dict | None = None) -> jax.Array:
  """New token ids `[batch, max_new_tokens]` sampled after each prompt.

  Args:
    model: a `Llama` (LoRA adapters and quantized bases work; weights stay where they are).
    input_ids: `[batch, length]` prompt ids; rows may be padded anywhere if `prompt_mask` says so.
    max_new_tokens: tokens generated per row.
    temperature: 0 = greedy; else softmax temperature.
    top_k: sample only among the k most likely tokens (None = all).
    top_p: sample only from the smallest set of tokens with mass >= top_p (None = all).
    seed: the sampling key; the same seed gives the same tokens.
    eos_id: a row stops at this token (or at any of several); its later positions are `pad_id`.
    prompt_mask: `[batch, length]`, 1 for real prompt tokens (default: all real).
    pad_id: the id written after a row's EOS.
    mesh, rules: when given, prompts are split along the batch as in training
      (`ftjax.sharding`), and activations are constrained by the same rules.
  """
  ids = np.asarray(input_ids, np.int32)
  if ids.ndim != 2:
    raise ValueError(f'input_ids must be [batch, length]; got shape {ids.shape}')
  mask = np.ones_like(ids) if prompt_mask is None else np.asarray(prompt_mask, np.int32)
  if not mask.any(axis=1).all():
    raise ValueError('every prompt needs at least one token')
  if max_new_tokens < 1:
    raise ValueError(f'max_new_tokens={max_new_tokens} must be >= 1')
  batch, length = ids.shape
  shards = sharding.batch_shards(mesh, rules) if mesh is not None else 1
  rows = -(-batch // shards) * shards
  padded = np.full((rows, bucket(length)), pad_id, np.int32)
  padded_mask = np.zeros_like(padded)
  padded[:batch, :length], padded_mask[:batch, :length] = ids, mask
  padded_mask[batch:, 0] = 1  # filler rows: one real token, so they stay well-defined
  graphdef, state = nnx.split(model)
  run = functools.partial(
      _decode_jit, graphdef=graphdef, max_new_tokens=max_new_tokens,
      temperature=float(temperature), top_k=top_k or None, top_p=top_p,
      eos_id=None if eos_id is None else tuple(np.atleast_1d(eos_id).astype(int).tolist()),
      pad_id=pad_id,
      cache_dtype=jnp.dtype(model.dtype))
  key = jax.random.key(seed)
  if mesh is None:
    return run(state, jnp.asarray(padded), jnp.asarray(padded_mask), key)[:batch]
  rows_sharding = sharding.batch_sharding(mesh, rules)

  def put(x):  # each host supplies its own rows of the (identical) global array
    return jax.make_array_from_callback(x.shape, rows_sharding, lambda index: x[index])

  with sharding.use(mesh, rules):
    out = run(state, put(padded), put(padded_mask), key)
  return out[:batch]


def complete(model: llama.Llama, prompts: list[list[int]], *, batch_size: int = 8,
             stop_ids: Sequence[int] = (), decode: Any = None, mesh=None, rules=None,
             **sampling: Any) -> list[dict[str, Any]]:
  """Generates after each prompt (token ids), `batch_size` at a time.

  Every batch has the same number of rows (the last is filled up), so a run compiles once per
  prompt-length bucket; fewer prompts than `batch_size` run as one smaller batch. Returns per
  prompt `tokens` (cut before the first stop id), `finish_reason` ('stop' or 'length') and,
  with `decode` (ids -> text), `completion`.
  """
  results = []
  batch_size = min(batch_size, len(prompts))
  for first in range(0, len(prompts), batch_size):
    chunk = prompts[first:first + batch_size]
    chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))
    length = max(len(p) for p in chunk)
    ids = np.zeros((batch_size, length), np.int32)
    mask = np.zeros_like(ids)
    for row, p in enumerate(chunk):  # left-padded: the prompts end together
      ids[row, length - len(p):], mask[row, length - len(p):] = p, 1
    out = np.asarray(generate(model, ids, prompt_mask=mask, eos_id=tuple(stop_ids) or None,
                              pad_id=-1, mesh=mesh, rules=rules, **sampling))
    for row in range(min(batch_size, len(prompts) - first)):
      tokens = out[row].tolist()
      cut = next((i for i, t in enumerate(tokens) if t in stop_ids or t == -1), len(tokens))
      result = dict(tokens=tokens[:cut], finish_reason='stop' if cut < len(tokens) else 'length')
      if decode is not None:
        result['completion'] = decode(tokens[:cut])
      results.append(result)
  return results
