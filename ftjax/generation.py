"""Sampling with a KV cache: prefill the prompt once, then one token per step in one jitted loop.

Prompts are padded to a length bucket (a power of two) so prompts of different lengths reuse
one compiled program; the batch is padded to a multiple of the mesh's batch shards. The checks
(`check_sampling`, `check_cache_fits`, `check_finite`) refuse what would sample nonsense or run
out of memory, with a `GenerationError` that says which setting to change.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jaxtyping import Array, Float, Int

from ftjax import models, sharding
from ftjax.errors import UserError

MIN_BUCKET = 16


def bucket(length: int) -> int:
  """The padded prompt length a prompt of `length` tokens compiles for."""
  return max(MIN_BUCKET, 1 << max(length - 1, 0).bit_length())


class GenerationError(UserError):
  """Generation settings or weights that cannot give meaningful tokens; the message says why."""


def _name(name: str, flag_names: bool) -> str:
  return '--' + name.replace('_', '-') if flag_names else name


def check_sampling(*, max_new_tokens: int, temperature: float, top_k: int | None = None,
                   top_p: float | None = None, batch_size: int = 1,
                   flag_names: bool = False) -> None:
  """Raises `GenerationError` for sampling settings that make no sense.

  `top_k` None or 0 and `top_p` None or 1 mean no filtering. `flag_names` spells the settings
  as `ftjax generate` flags (`--top-p`) in the message, else as keyword arguments (`top_p`).
  """
  def refuse(name, value, rule):
    raise GenerationError(f'{_name(name, flag_names)}={value} must be {rule}')

  if not (math.isfinite(temperature) and temperature >= 0):  # inf would sample uniformly
    refuse('temperature', temperature, 'a finite number >= 0 (0 = greedy)')
  if batch_size < 1:
    refuse('batch_size', batch_size, '>= 1')
  if max_new_tokens < 1:
    refuse('max_new_tokens', max_new_tokens, '>= 1')
  if top_p is not None and not 0 < top_p <= 1:
    refuse('top_p', top_p, 'in (0, 1] (1 = no nucleus filtering)')
  if top_k is not None and top_k < 0:
    refuse('top_k', top_k, '>= 0 (0 = all tokens)')


@dataclasses.dataclass(frozen=True)
class Memory:
  """Free memory the KV cache would go into."""

  free: int  # bytes
  per_device: bool  # one device's memory (it holds one batch shard), else host memory (all)
  what: str


def _host_available_bytes() -> int | None:
  try:  # Linux: what can be allocated without swapping, page cache included
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  try:
    return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
  except (AttributeError, OSError, ValueError):
    return None


def memory_available() -> Memory | None:
  """Free memory of the first local device, or of the host for CPU devices; None if unknown."""
  device = jax.local_devices()[0]
  stats = device.memory_stats()
  if stats and 'bytes_limit' in stats:
    return Memory(free=int(stats['bytes_limit']) - int(stats.get('bytes_in_use', 0)),
                  per_device=True, what=f'{device.platform} device memory')
  if device.platform == 'cpu':  # CPU "devices" all live in host memory, which has no stats
    host = _host_available_bytes()
    if host is not None:
      return Memory(free=host, per_device=False, what='available host memory')
  return None


def cache_bytes(cfg: Any, *, batch: int, prompt_length: int, max_new_tokens: int,
                dtype: Any) -> int:
  """Bytes of the keys and values `generate` allocates for `batch` rows (all batch shards)."""
  length = bucket(prompt_length) + max_new_tokens
  return (2 * cfg.num_layers * batch * length * cfg.num_kv_heads * cfg.head_dim
          * jnp.dtype(dtype).itemsize)


def check_cache_fits(cfg: Any, *, batch: int, prompt_length: int, max_new_tokens: int,
                     dtype: Any, batch_shards: int = 1, memory: Memory | None = None,
                     flag_names: bool = False) -> None:
  """Raises `GenerationError` if the KV cache alone cannot fit in memory.

  `batch` is the rows of one `generate` call, padded to `batch_shards` as `generate` pads them;
  on a device with memory statistics only its shard counts. `memory` defaults to
  `memory_available()`; when that is unknown, nothing is checked. Weights and activations come
  on top of the cache, so passing is no promise that generation fits.
  """
  memory = memory if memory is not None else memory_available()
  if memory is None:
    return
  rows = -(-batch // batch_shards) * batch_shards
  total = cache_bytes(cfg, batch=rows, prompt_length=prompt_length,
                      max_new_tokens=max_new_tokens, dtype=dtype)
  needed = -(-total // batch_shards) if memory.per_device else total
  if needed > memory.free:
    where = f'{needed / 2**30:.1f} GiB per device' if memory.per_device else (
        f'{needed / 2**30:.1f} GiB')
    raise GenerationError(
        f'the KV cache for {rows} rows of {bucket(prompt_length) + max_new_tokens} positions '
        f'(prompt bucket {bucket(prompt_length)} + {_name("max_new_tokens", flag_names)} '
        f'{max_new_tokens}, {jnp.dtype(dtype).name}) needs {where}, but only '
        f'{memory.free / 2**30:.1f} GiB of {memory.what} is free: lower '
        f'{_name("max_new_tokens", flag_names)} or {_name("batch_size", flag_names)}')


def check_context(limit: int | None, *, prompt_length: int, max_new_tokens: int,
                  source: str) -> None:
  """Raises `GenerationError` if the longest prompt plus the new tokens exceed the context the
  model was trained for (`limit`; None = unknown, nothing checked)."""
  if limit is not None and prompt_length + max_new_tokens > limit:
    raise GenerationError(
        f'the longest prompt ({prompt_length} tokens) + --max-new-tokens {max_new_tokens} = '
        f'{prompt_length + max_new_tokens} tokens exceeds the {limit}-token context of {source} '
        '(max_position_embeddings): shorten the prompt or lower --max-new-tokens')


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
  return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def check_finite(model: nnx.Module, source: str) -> None:
  """Raises `GenerationError` naming `source` if any floating-point weight is NaN or inf.

  One jitted reduction over every parameter (adapters included); integer (quantized) weights
  cannot hold either, and their float scales are checked.
  """
  names, values = [], []
  for path, var in jax.tree_util.tree_leaves_with_path(
      nnx.state(model, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable)):
    value = var.get_value()
    if jnp.issubdtype(value.dtype, jnp.inexact):
      names.append('.'.join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)))
      values.append(value)
  # Gathered, not fetched: with several processes the flags may span devices of other hosts.
  finite = multihost_utils.process_allgather(_all_finite(values), tiled=True)
  bad = [name for name, ok in zip(names, finite, strict=True) if not ok]
  if bad:
    shown = ', '.join(bad[:3]) + (f' and {len(bad) - 3} more' if len(bad) > 3 else '')
    raise GenerationError(f'the weights of {source} contain NaN or inf (in {shown}): the '
                          'tokens would be garbage; check the checkpoint or the run that made it')


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

  def model() -> nnx.Module:
    # Fresh Variables at the current trace level: the layer scan refuses outer-level ones.
    return nnx.merge(graphdef, jax.tree.map(lambda x: x, state))

  batch, length = tokens.shape
  positions = jnp.where(mask > 0, jnp.cumsum(mask, axis=1) - 1, -1).astype(jnp.int32)
  lengths = jnp.sum(mask, axis=1).astype(jnp.int32)
  cfg = model().cfg
  cache = models.family_of(cfg).KVCache.empty(cfg, batch, length + max_new_tokens, cache_dtype)
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


DECODE_TRACES: list[int] = []  # one entry each time the decode loop is traced (= compiled)


@functools.wraps(_decode_loop)
def _traced_decode_loop(*args, **kwargs):
  DECODE_TRACES.append(1)  # runs only while jax traces, never per compiled call
  return _decode_loop(*args, **kwargs)


_decode_jit = jax.jit(_traced_decode_loop, static_argnames=(
    'graphdef', 'max_new_tokens', 'temperature', 'top_k', 'top_p', 'eos_id', 'pad_id',
    'cache_dtype'))


def generate(model: nnx.Module, input_ids: Any, max_new_tokens: int = 32, temperature: float = 0.0,
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
  check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
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


def complete(model: nnx.Module, prompts: list[list[int]], *, batch_size: int = 8,
             stop_ids: Sequence[int] = (), decode: Any = None, mesh=None, rules=None,
             **sampling: Any) -> list[dict[str, Any]]:
  """Generates after each prompt (token ids), `batch_size` at a time.

  Every batch has the same number of rows (the last is filled up), so a run compiles once per
  prompt-length bucket; fewer prompts than `batch_size` run as one smaller batch. Returns per
  prompt `tokens` (cut before the first stop id), `finish_reason` ('stop' or 'length') and,
  with `decode` (ids -> text), `completion`.
  """
  if batch_size < 1:  # `generate` checks the sampling settings
    raise GenerationError(f'batch_size={batch_size} must be >= 1')
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
