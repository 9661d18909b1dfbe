"""Sparse mixture-of-experts MLP (Qwen3-MoE, Mixtral): a top-k router and stacked SwiGLU experts,
computed dropless with grouped matmuls.

Every token's k (token, expert) pairs are sorted by expert, each expert's contiguous group goes
through its own weights in one `jax.lax.ragged_dot`, and the results are unsorted and summed
with the routing weights. No capacity factor: however unbalanced the routing, no token is
dropped, so the output equals the dense per-expert loop `transformers` runs.

Letters: N tokens (B*T), D embed, F expert mlp, E experts, K top-k, I/O a projection's in/out.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from ftjax import sharding
from ftjax.models import layers

# Rows per tile of the CPU grouped matmul.
CPU_TILE = 128


def grouped_matmul(x: Float[Array, 'N I'], w: Float[Array, 'E I O'],
                   group_sizes: jax.Array) -> Float[Array, 'N O']:
  """`jax.lax.ragged_dot(x, w, group_sizes)`: rows sorted by group, group e through `w[e]`.

  TPU and GPU compilers lower `ragged_dot` to a grouped matmul. XLA:CPU computes it as if every
  row met every group (measured: 13x a dense matmul of the same rows forward, 23x with the
  gradient), so on CPU it runs as `_tiled`: a scan over tiles of `CPU_TILE` rows, each within
  one group, with its own backward pass; still dropless (groups are padded, never cut).
  """
  if sharding.platform() != 'cpu':
    return jax.lax.ragged_dot(x, w, group_sizes)
  return _tiled(x, w, group_sizes)


def _tiles(group_sizes: jax.Array, rows: int, tile: int):
  """Per tile (each inside one group): its group, first row, and rows that belong to it."""
  groups = group_sizes.shape[0]
  ends = jnp.cumsum(group_sizes)
  padded = (group_sizes + tile - 1) // tile * tile
  padded_ends = jnp.cumsum(padded)
  at = jnp.arange(rows // tile + groups + 1) * tile  # enough tiles for any split of `rows`
  group = jnp.clip(jnp.searchsorted(padded_ends, at, side='right'), 0, groups - 1)
  first = ends[group] - group_sizes[group] + at - (padded_ends[group] - padded[group])
  count = jnp.clip(ends[group] - first, 0, tile)
  return group, jnp.clip(first, 0, rows), count


def _tile_rows(a: jax.Array, first: jax.Array, count: jax.Array, tile: int) -> jax.Array:
  """The tile's `tile` rows of `a` (padded below by `tile` zero rows), rows past `count` zero."""
  rows = jax.lax.dynamic_slice_in_dim(a, first, tile)
  return jnp.where((jnp.arange(tile) < count)[:, None], rows, 0)


def _scan_matmul(x: jax.Array, w: jax.Array, tiles: tuple[jax.Array, ...]) -> jax.Array:
  """The grouped matmul over the `_tiles` of x's groups, one tile per scan step."""
  tile, n = CPU_TILE, x.shape[0]
  group, first, count = tiles
  xpad = jnp.concatenate([x, jnp.zeros((tile, x.shape[1]), x.dtype)])

  def body(out, t):
    y = _tile_rows(xpad, first[t], count[t], tile) @ w[group[t]]
    cur = jax.lax.dynamic_slice_in_dim(out, first[t], tile)
    keep = (jnp.arange(tile) < count[t])[:, None]
    return jax.lax.dynamic_update_slice_in_dim(out, jnp.where(keep, y, cur), first[t], 0), None

  out, _ = jax.lax.scan(body, jnp.zeros((n + tile, w.shape[2]), x.dtype), jnp.arange(len(group)))
  return out[:n]


@jax.custom_vjp
def _tiled(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
  return _scan_matmul(x, w, _tiles(group_sizes, x.shape[0], CPU_TILE))


def _tiled_fwd(x, w, group_sizes):
  tiles = _tiles(group_sizes, x.shape[0], CPU_TILE)
  return _scan_matmul(x, w, tiles), (x, w, tiles)


def _tiled_bwd(res, dy):
  x, w, tiles = res  # the forward pass's tiles: the backward pass reuses them
  dx = _scan_matmul(dy, jnp.swapaxes(w, 1, 2), tiles)
  tile, (group, first, count) = CPU_TILE, tiles
  xpad = jnp.concatenate([x, jnp.zeros((tile, x.shape[1]), x.dtype)])
  dypad = jnp.concatenate([dy, jnp.zeros((tile, dy.shape[1]), dy.dtype)])

  def body(dw, t):
    contrib = (_tile_rows(xpad, first[t], count[t], tile).T
               @ _tile_rows(dypad, first[t], count[t], tile))
    return dw.at[group[t]].add(contrib.astype(dw.dtype)), None

  dw, _ = jax.lax.scan(body, jnp.zeros_like(w), jnp.arange(len(group)))
  return dx, dw, None


_tiled.defvjp(_tiled_fwd, _tiled_bwd)


class Grouped(nnx.Module):
  """E stacked weights `[E, in, out]` on a leading logical 'expert' axis, applied to rows sorted
  by expert (`group_sizes[e]` rows for expert e, in order) with one grouped matmul."""

  def __init__(self, shape: tuple[int, int, int], names: tuple[str, str], *, rngs: nnx.Rngs,
               init_std: float, dtype, param_dtype):
    self.w = layers.param(rngs, jax.nn.initializers.normal(init_std), shape, ('expert', *names),
                          param_dtype)
    self.dtype = dtype

  def __call__(self, x: Float[Array, 'N I'], group_sizes: jax.Array) -> Float[Array, 'N O']:
    return grouped_matmul(x.astype(self.dtype), self.w.get_value().astype(self.dtype),
                          group_sizes)


class MoeMlp(nnx.Module):
  """Router (linear, softmax in float32, top-k, optionally renormalised) and dropless experts."""

  def __init__(self, cfg, *, rngs: nnx.Rngs, dtype, param_dtype):
    self.router = layers.param(rngs, jax.nn.initializers.normal(cfg.init_std),
                               (cfg.embed_dim, cfg.num_experts), ('embed', None), param_dtype)
    e, d, f = cfg.num_experts, cfg.embed_dim, cfg.moe_mlp_dim
    kw = dict(rngs=rngs, init_std=cfg.init_std, dtype=dtype, param_dtype=param_dtype)
    self.gate = Grouped((e, d, f), ('embed', 'mlp'), **kw)  # the experts' SwiGLU projections
    self.up = Grouped((e, d, f), ('embed', 'mlp'), **kw)
    self.down = Grouped((e, f, d), ('mlp', 'embed'), **kw)
    self.top_k, self.num_experts = cfg.num_experts_per_tok, cfg.num_experts
    self.norm_topk_prob = cfg.norm_topk_prob

  def __call__(self, x: Float[Array, 'B T D'], key=None) -> Float[Array, 'B T D']:
    del key  # no dropout in the experts
    b, t, d = x.shape
    flat = x.reshape(b * t, d)
    logits = flat.astype(jnp.float32) @ self.router.get_value().astype(jnp.float32)  # N E
    probs = jax.nn.softmax(logits, axis=-1)
    weights, chosen = jax.lax.top_k(probs, self.top_k)  # N K
    if self.norm_topk_prob:
      weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    slots = chosen.reshape(-1)  # N*K (token-major)
    order = jnp.argsort(slots, stable=True)
    group_sizes = jnp.bincount(slots, length=self.num_experts).astype(jnp.int32)
    xs = jnp.take(flat, order // self.top_k, axis=0)
    hidden = jax.nn.silu(self.gate(xs, group_sizes)) * self.up(xs, group_sizes)
    routed = self.down(hidden, group_sizes)
    unsorted = jnp.zeros_like(routed).at[order].set(routed).reshape(b * t, self.top_k, d)
    y = jnp.einsum('NKD,NK->ND', unsorted.astype(jnp.float32), weights).astype(x.dtype)
    return sharding.constrain(y.reshape(b, t, d), ('batch', 'seq', 'embed'))
