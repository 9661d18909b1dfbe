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


class Grouped(nnx.Module):
  """E stacked weights `[E, in, out]` on a leading logical 'expert' axis, applied to rows sorted
  by expert (`group_sizes[e]` rows for expert e, in order) with one grouped matmul."""

  def __init__(self, shape: tuple[int, int, int], names: tuple[str, str], *, rngs: nnx.Rngs,
               init_std: float, dtype, param_dtype):
    self.w = layers.param(rngs, jax.nn.initializers.normal(init_std), shape, ('expert', *names),
                          param_dtype)
    self.dtype = dtype

  def __call__(self, x: Float[Array, 'N I'], group_sizes: jax.Array) -> Float[Array, 'N O']:
    return jax.lax.ragged_dot(x.astype(self.dtype), self.w.get_value().astype(self.dtype),
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
