"""Sparse mixture-of-experts MLP (Qwen3-MoE, Qwen2-MoE, Mixtral): a top-k router and stacked
SwiGLU experts, computed dropless with grouped matmuls, and Qwen2-MoE's gated shared expert.

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
from jax.sharding import PartitionSpec as P
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


def _zeros(shape, dtype, *like: jax.Array) -> jax.Array:
  """Zeros that vary over the same `shard_map` axes as `like` (a scan carry keeps its type):
  `zeros_like` carries its argument's type, and a sum carries the union."""
  return sum((jnp.zeros_like(a, dtype, shape=shape) for a in like), jnp.zeros(shape, dtype))


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

  out, _ = jax.lax.scan(body, _zeros((n + tile, w.shape[2]), x.dtype, x, w, *tiles),
                        jnp.arange(len(group)))
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

  dw, _ = jax.lax.scan(body, _zeros(w.shape, w.dtype, x, w, dy, *tiles), jnp.arange(len(group)))
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

  def weight(self) -> jax.Array:
    """The stacked weights in float32 (as `quantize.QuantizedGrouped.weight` dequantizes)."""
    return self.w.get_value().astype(jnp.float32)

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
    self.top_k, self.num_experts, self.mlp_dim = cfg.num_experts_per_tok, e, f
    self.has_shared = bool(cfg.shared_expert_dim)
    if self.has_shared:  # Qwen2-MoE: a dense expert for every token, with a sigmoid gate
      s = cfg.shared_expert_dim
      self.shared = SharedExpert(d, s, rngs=rngs, init_std=cfg.init_std, dtype=dtype,
                                 param_dtype=param_dtype)
      self.shared_gate = layers.param(rngs, jax.nn.initializers.normal(cfg.init_std), (d, 1),
                                      ('embed', None), param_dtype)
    self.norm_topk_prob = cfg.norm_topk_prob

  def __call__(self, x: Float[Array, 'B T D'], key=None) -> Float[Array, 'B T D']:
    del key  # no dropout in the experts
    return self.routed(x)[0]

  def routed(self, x: Float[Array, 'B T D'], mask: jax.Array | None = None
             ) -> tuple[Float[Array, 'B T D'], dict[str, jax.Array]]:
    """The block's output and its router statistics over the tokens where `mask` (`[B, T]`,
    default all) is set: per expert the top-k assignments and the summed probabilities, the
    summed squared log-partition of the router logits, and the token count (`router_losses`)."""
    b, t, d = x.shape
    flat = x.reshape(b * t, d)
    logits = flat.astype(jnp.float32) @ self.router.get_value().astype(jnp.float32)  # N E
    probs = jax.nn.softmax(logits, axis=-1)
    weights, chosen = jax.lax.top_k(probs, self.top_k)  # N K
    if self.norm_topk_prob:
      weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    y = self._experts(flat, chosen, weights)
    if self.has_shared:
      gate = jax.nn.sigmoid(flat.astype(jnp.float32)
                            @ self.shared_gate.get_value().astype(jnp.float32))
      y = y + gate * self.shared(x).reshape(b * t, d).astype(jnp.float32)
    y = y.astype(x.dtype)
    valid = (jnp.ones((b * t,), jnp.float32) if mask is None
             else mask.reshape(b * t).astype(jnp.float32))
    stats = dict(
        assigned=jnp.zeros((self.num_experts,), jnp.float32).at[chosen.reshape(-1)].add(
            jnp.repeat(valid, self.top_k)),
        probs=valid @ probs,
        z=valid @ jnp.square(jax.nn.logsumexp(logits, axis=-1)),
        tokens=jnp.sum(valid))
    return sharding.constrain(y.reshape(b, t, d), ('batch', 'seq', 'embed')), stats

  def _experts(self, flat: Float[Array, 'N D'], chosen: jax.Array, weights: jax.Array
               ) -> Float[Array, 'N D']:
    """The routed tokens through their experts, combined with their routing weights (float32).

    On a mesh with an `expert` axis that splits the experts, each device runs only its own
    experts (`_exchanged`): tokens travel to them and back by all-to-all. Otherwise (one
    device, or experts split like any weight) `_local` runs them all under GSPMD."""
    experts = (self.gate, self.up, self.down)
    up_shape = jax.ShapeDtypeStruct((self.num_experts, flat.shape[1], self.mlp_dim), flat.dtype)
    mesh, specs = sharding.shard_map_specs(
        [(flat, ('batch', None)), (up_shape, ('expert', None, 'mlp'))])
    if mesh is None or mesh.shape['expert'] == 1 or specs[1][0] != 'expert':
      return _local(experts, flat, chosen, weights, self.num_experts)
    rows, tensor = specs[0], specs[1][2]  # tensor: the axes splitting the experts' mlp dim
    graphdef, state = nnx.split(experts)
    state_specs = jax.tree.map(lambda v: _expert_spec(v, tensor), state,
                               is_leaf=lambda v: isinstance(v, nnx.Variable))
    every = _axes(rows) | _axes(specs[1])

    def local(state, flat, chosen, weights):
      # Tokens and weights typed as varying over every axis the other varies over, so that the
      # grouped matmul's own backward pass returns gradients of their types (the sums over the
      # rest are the transposes of these casts).
      state = jax.tree.map(lambda sp, v: jax.tree.map(lambda a: _vary(a, every - _axes(sp)), v),
                           state_specs, state, is_leaf=lambda sp: isinstance(sp, P))
      y = _exchanged(nnx.merge(graphdef, state), _vary(flat, every - _axes(rows)), chosen,
                     weights, self.num_experts, mesh.shape['expert'])
      return y if tensor is None else jax.lax.psum(y, tensor)  # the mlp dim's partial sums

    return jax.shard_map(local, mesh=mesh, in_specs=(state_specs, rows, rows, rows),
                         out_specs=rows)(state, flat, chosen, weights)


class SharedExpert(nnx.Module):
  """Qwen2-MoE's shared expert: a SwiGLU MLP every token goes through."""

  def __init__(self, d: int, f: int, *, rngs: nnx.Rngs, init_std: float, dtype, param_dtype):
    kw = dict(rngs=rngs, init_std=init_std, dtype=dtype, param_dtype=param_dtype)
    self.gate = layers.Einsum('BTD,DF->BTF', (d, f), ('embed', 'mlp'), **kw)
    self.up = layers.Einsum('BTD,DF->BTF', (d, f), ('embed', 'mlp'), **kw)
    self.down = layers.Einsum('BTF,FD->BTD', (f, d), ('mlp', 'embed'), **kw)

  def __call__(self, x: Float[Array, 'B T D']) -> Float[Array, 'B T D']:
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


def _axes(spec: P) -> set[str]:
  """The mesh axes a PartitionSpec splits over."""
  return {a for entry in spec if entry for a in ((entry,) if isinstance(entry, str) else entry)}


def _vary(x: jax.Array, axes: set[str]) -> jax.Array:
  return jax.lax.pcast(x, tuple(sorted(axes)), to='varying') if axes else x


def _expert_spec(variable: nnx.Variable, tensor) -> P:
  """Inside expert parallelism, an expert weight (or adapter) is split only over `expert` (its
  first axis) and, on its 'mlp' dim, over `tensor`: its embed dim is gathered from fsdp."""
  names = sharding.logical_names(variable)
  return P(*(('expert' if n == 'expert' else tensor if n == 'mlp' else None) for n in names))


def _swiglu(experts, xs: jax.Array, group_sizes: jax.Array) -> jax.Array:
  gate, up, down = experts
  return down(jax.nn.silu(gate(xs, group_sizes)) * up(xs, group_sizes), group_sizes)


def _local(experts, flat: Float[Array, 'N D'], chosen: jax.Array, weights: jax.Array,
           num_experts: int) -> Float[Array, 'N D']:
  """Every expert on this device: the (token, expert) pairs sorted by expert, one grouped
  matmul per projection, unsorted and summed with the routing weights."""
  n, k = chosen.shape
  slots = chosen.reshape(-1)  # N*K (token-major)
  order = jnp.argsort(slots, stable=True)
  group_sizes = jnp.bincount(slots, length=num_experts).astype(jnp.int32)
  routed = _swiglu(experts, jnp.take(flat, order // k, axis=0), group_sizes)
  unsorted = jnp.zeros_like(routed).at[order].set(routed).reshape(n, k, -1)
  return jnp.einsum('NKD,NK->ND', unsorted.astype(jnp.float32), weights)


def _exchanged(experts, flat: Float[Array, 'N D'], chosen: jax.Array, weights: jax.Array,
               num_experts: int, ep: int) -> Float[Array, 'N D']:
  """`_local` on one device of the `expert` mesh axis (inside `shard_map`), which holds experts
  `[i*E/ep, (i+1)*E/ep)` of the layer and its own tokens.

  Each (token, expert) pair is sent to the device of its expert, into a buffer of one slot per
  pair this device has (`[ep, N*K, D]`: room for every pair to go to one device, so none is
  dropped), with the per-expert counts; each device sorts what it received by expert, runs its
  experts in one grouped matmul per projection and sends the rows back to the slots they came
  from, where they are combined as in `_local`.
  """
  n, k = chosen.shape
  size, local_experts = n * k, num_experts // ep
  slots = chosen.reshape(-1)
  order = jnp.argsort(slots, stable=True)  # pairs by expert, so by destination device too
  dest = slots[order] // local_experts
  counts = jnp.bincount(slots, length=num_experts).reshape(ep, local_experts)
  sent = jnp.sum(counts, axis=1)
  rank = jnp.arange(size) - (jnp.cumsum(sent) - sent)[dest]  # slot in the destination's buffer
  send = jnp.zeros((ep, size, flat.shape[1]), flat.dtype).at[dest, rank].set(
      jnp.take(flat, order // k, axis=0))
  recv = jax.lax.all_to_all(send, 'expert', 0, 0)  # [source, slot, D]
  recv_counts = jax.lax.all_to_all(counts, 'expert', 0, 0)  # [source, local expert]
  # Each source's rows come sorted by expert: the local expert of slot r, or past the last.
  ends = jnp.cumsum(recv_counts, axis=1)
  expert = jax.vmap(lambda e: jnp.searchsorted(e, jnp.arange(size), side='right'))(ends)
  regroup = jnp.argsort(expert.reshape(-1), stable=True)
  valid = (expert.reshape(-1) < local_experts)[regroup][:, None]
  group_sizes = jnp.sum(recv_counts, axis=0).astype(jnp.int32)
  out = jnp.where(valid, _swiglu(experts, recv.reshape(ep * size, -1)[regroup], group_sizes), 0)
  back = jnp.zeros_like(out).at[regroup].set(out).reshape(ep, size, -1)
  returned = jax.lax.all_to_all(back, 'expert', 0, 0)[dest, rank]  # in `order`
  unsorted = jnp.zeros_like(returned).at[order].set(returned).reshape(n, k, -1)
  return jnp.einsum('NKD,NK->ND', unsorted.astype(jnp.float32), weights)


def router_losses(stats: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """The auxiliary losses of `MoeMlp.routed` statistics stacked over layers (`[L, ...]`):

  - `router_aux_loss`, Switch Transformer's load balancing as `transformers` computes it for
    Qwen3-MoE, Qwen2-MoE and Mixtral: E * sum_e f_e p_e, with f_e the share of top-k
    assignments and p_e the mean router probability of expert e, both over every layer's
    (unmasked) tokens;
  - `router_z_loss`, ST-MoE's: the mean over layers and tokens of logsumexp(router logits)^2.
  """
  tokens = jnp.maximum(jnp.sum(stats['tokens']), 1.0)
  assigned = jnp.sum(stats['assigned'], axis=0) / tokens
  probs = jnp.sum(stats['probs'], axis=0) / tokens
  return dict(router_aux_loss=assigned.shape[0] * jnp.sum(assigned * probs),
              router_z_loss=jnp.sum(stats['z']) / tokens)
