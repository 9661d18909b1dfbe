"""Grouped-query self-attention with rope, biases, q/k norm and sliding windows; its KV cache.

Shared by the decoder families (a new family reuses `Attention` and `KVCache` as they are).
`cfg` is the family's architecture config: the fields read here are embed_dim, num_heads,
num_kv_heads, head_dim, init_std, qkv_bias, o_bias, qk_norm, norm_eps, norm_plus_one,
query_scale, attn_softcap, num_layers.

Letters: B batch, T length, D embed, N heads, K kv heads, H head dim, S cache slots, L layers.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from ftjax import sharding
from ftjax.models import layers


class Attention(nnx.Module):
  """q, k, v and o projections around `layers.attention` (training) and the cached decode."""

  def __init__(self, cfg: Any, *, rngs: nnx.Rngs, dtype, param_dtype, implementation):
    kw = dict(rngs=rngs, init_std=cfg.init_std, dtype=dtype, param_dtype=param_dtype)
    d, n, k, h = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.q = layers.Einsum('BTD,DNH->BTNH', (d, n, h), ('embed', 'heads', 'head_dim'), **kw)
    self.k = layers.Einsum('BTD,DKH->BTKH', (d, k, h), ('embed', 'kv_heads', 'head_dim'), **kw)
    self.v = layers.Einsum('BTD,DKH->BTKH', (d, k, h), ('embed', 'kv_heads', 'head_dim'), **kw)
    self.o = layers.Einsum('BTNH,NHD->BTD', (n, h, d), ('heads', 'head_dim', 'embed'), **kw)
    if cfg.qkv_bias:
      zeros = jax.nn.initializers.zeros
      self.q_bias = layers.param(rngs, zeros, (n, h), ('heads', 'head_dim'), param_dtype)
      self.k_bias = layers.param(rngs, zeros, (k, h), ('kv_heads', 'head_dim'), param_dtype)
      self.v_bias = layers.param(rngs, zeros, (k, h), ('kv_heads', 'head_dim'), param_dtype)
    if cfg.o_bias:
      self.o_bias = layers.param(rngs, jax.nn.initializers.zeros, (d,), ('embed',), param_dtype)
    if cfg.qk_norm:
      norm = dict(eps=cfg.norm_eps, rngs=rngs, plus_one=cfg.norm_plus_one, name='head_dim',
                  param_dtype=param_dtype)
      self.q_norm = layers.RMSNorm(h, **norm)
      self.k_norm = layers.RMSNorm(h, **norm)
    self.cfg = cfg
    self.implementation = implementation

  def _qkv(self, x: Float[Array, 'B T D'], rope, keys) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Projected, normed and rotated q `[B T N H]`, k and v `[B T K H]`."""
    cfg = self.cfg
    q, k, v = self.q(x, key=keys[0]), self.k(x, key=keys[1]), self.v(x, key=keys[2])
    if cfg.qkv_bias:
      q = q + self.q_bias.get_value().astype(q.dtype)[None, None]
      k = k + self.k_bias.get_value().astype(k.dtype)[None, None]
      v = v + self.v_bias.get_value().astype(v.dtype)[None, None]
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    sin, cos = rope
    q, k = layers.apply_rope(q, sin, cos), layers.apply_rope(k, sin, cos)
    return sharding.constrain(q, ('batch', 'seq', 'heads', 'head_dim')), k, v

  def _out(self, out: Float[Array, 'B T N H'], key=None) -> Float[Array, 'B T D']:
    """The output projection, plus its bias where the family has one."""
    y = self.o(out, key=key)
    if self.cfg.o_bias:  # outside `o`, so a LoRA adapter on `o` leaves the bias frozen
      y = y + self.o_bias.get_value().astype(y.dtype)[None, None]
    return y

  def __call__(self, x: Float[Array, 'B T D'], rope, positions, segment_ids, window,
               key=None) -> Float[Array, 'B T D']:
    cfg = self.cfg
    keys = split_keys(key, 4)
    q, k, v = self._qkv(x, rope, keys)
    out = layers.attention(q, k, v, segment_ids, positions,
                           scale=(cfg.query_scale or cfg.head_dim) ** -0.5, window=window,
                           softcap=cfg.attn_softcap, implementation=self.implementation)
    return self._out(out, key=keys[3])

  def decode(self, x: Float[Array, 'B T D'], rope, positions: Int[Array, 'B T'],
             key_positions: Int[Array, 'B S'], window, k_cache: Float[Array, 'B S K H'],
             v_cache: Float[Array, 'B S K H'], start: jax.Array, prefill: bool = False):
    """Attention of `x` (at cache slots `start..start+T-1`) over the cache; returns the new cache.

    `key_positions` are the positions of every cache slot after this write (-1 = empty).
    `prefill` (an empty cache, `start` 0): the tokens attend only to each other, through the
    training kernel (`implementation`), so a long prompt never meets the einsum path.
    """
    cfg = self.cfg
    q, k, v = self._qkv(x, rope, [None] * 3)
    names = ('batch', 'seq', 'kv_heads', 'head_dim')
    k_cache = sharding.constrain(jax.lax.dynamic_update_slice_in_dim(
        k_cache, k.astype(k_cache.dtype), start, axis=1), names)
    v_cache = sharding.constrain(jax.lax.dynamic_update_slice_in_dim(
        v_cache, v.astype(v_cache.dtype), start, axis=1), names)
    scale = (cfg.query_scale or cfg.head_dim) ** -0.5
    if prefill:  # padding tokens (position -1) form their own segment, seen by no real token
      out = layers.attention(q, k, v, (positions >= 0).astype(jnp.int32), positions, scale=scale,
                             window=window, softcap=cfg.attn_softcap,
                             implementation=self.implementation)
    else:
      out = layers.cached_attention(q, k_cache.astype(q.dtype), v_cache.astype(q.dtype),
                                    positions, key_positions, scale=scale, window=window,
                                    softcap=cfg.attn_softcap)
    return self._out(out), k_cache, v_cache


def split_keys(key: jax.Array | None, n: int) -> list[jax.Array | None]:
  """Independent dropout keys for `n` projections (None when not training)."""
  return [None] * n if key is None else list(jax.random.split(key, n))



@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer, stacked on 'layers' like the weights, for decoding."""

  k: Float[Array, 'L B S K H']
  v: Float[Array, 'L B S K H']
  positions: Int[Array, 'B S']  # rope position of each slot; -1 = empty (padding, not yet written)

  @classmethod
  def empty(cls, cfg: Any, batch: int, length: int, dtype: jnp.dtype = jnp.float32) -> KVCache:
    """A cache of `length` empty slots per row."""
    shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
               positions=jnp.full((batch, length), -1, jnp.int32))
