"""A quantized frozen base (QLoRA-style): int8 or int4 weights with block-wise float scales.

`apply` replaces the Einsums of the transformer blocks by `QuantizedEinsum`s that store the
weight as integers plus one float32 scale per block of `block` values along the first input
(contracted) axis, and dequantize on the fly inside the matmul; a mixture of experts' stacked
expert projections become `QuantizedGrouped`s the same way (blocks along each expert's input
axis). The integers live in `Quantized` variables, which are never trainable, so they stay in
the frozen part of the train state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ftjax.models import layers, moe

BITS = {'int8': 8, 'int4': 4}
_DTYPES = {8: jnp.int8, 4: jnp.int4}


class Quantized(nnx.Variable):
  """Integer weights (or their scales) of a frozen, quantized layer."""


def _quantize(w: jax.Array, axis: int, bits: int, block: int) -> tuple[jax.Array, jax.Array]:
  """Integers and float32 scales (one per `block` values along `axis`, axis size divisible)."""
  blocked = w.reshape(*w.shape[:axis], w.shape[axis] // block, block, *w.shape[axis + 1:])
  levels = 2 ** (bits - 1) - 1
  scale = jnp.max(jnp.abs(blocked), axis=axis + 1, keepdims=True) / levels
  scale = jnp.where(scale == 0, 1.0, scale)
  q = jnp.clip(jnp.round(blocked / scale), -levels, levels).astype(_DTYPES[bits])
  return q.reshape(w.shape), jnp.squeeze(scale, axis + 1)


def _dequantize(q: jax.Array, scale: jax.Array, axis: int, block: int) -> jax.Array:
  """The float32 weight of `_quantize`'s integers and scales."""
  blocked = q.astype(jnp.float32).reshape(*q.shape[:axis], q.shape[axis] // block, block,
                                          *q.shape[axis + 1:])
  return (blocked * jnp.expand_dims(scale, axis + 1)).reshape(q.shape)


class QuantizedEinsum(nnx.Module):
  """`Einsum` with an integer weight, dequantized as `q * scale` per block in the matmul."""

  def __init__(self, base: layers.Einsum, *, bits: int, block: int):
    x, w_letters, _ = layers.split_eqn(base.eqn)
    weight = base.w.get_value()
    names = tuple(base.w.get_metadata().get('out_sharding') or (None,) * weight.ndim)
    self.eqn, self.dtype = base.eqn, base.dtype
    lead = weight.ndim - len(w_letters)
    self.axis = next(i for i, c in enumerate(w_letters) if c in x)  # within the weight letters
    size = weight.shape[lead + self.axis]
    self.block = block if size % block == 0 else size
    q, scale = _quantize(weight.astype(jnp.float32), lead + self.axis, bits, self.block)
    self.q = Quantized(q, out_sharding=names, eager_sharding=False)
    self.scale = Quantized(scale, out_sharding=names, eager_sharding=False)

  def weight(self) -> jax.Array:
    """The dequantized weight (float32), stacked or per layer as currently held."""
    q = self.q.get_value()
    lead = q.ndim - len(layers.split_eqn(self.eqn)[1])
    return _dequantize(q, self.scale.get_value(), lead + self.axis, self.block)

  def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
    del key
    return layers.project(self.eqn, x.astype(self.dtype), self.weight().astype(self.dtype))


class QuantizedGrouped(nnx.Module):
  """`moe.Grouped` with integer expert weights `[(L,) E, in, out]`, dequantized per block of
  `block` input rows of each expert in the grouped matmul."""

  def __init__(self, base: moe.Grouped, *, bits: int, block: int):
    weight = base.w.get_value()
    names = tuple(base.w.get_metadata().get('out_sharding') or (None,) * weight.ndim)
    self.dtype = base.dtype
    size = weight.shape[-2]
    self.block = block if size % block == 0 else size
    q, scale = _quantize(weight.astype(jnp.float32), weight.ndim - 2, bits, self.block)
    self.q = Quantized(q, out_sharding=names, eager_sharding=False)
    self.scale = Quantized(scale, out_sharding=names, eager_sharding=False)

  def weight(self) -> jax.Array:
    """The dequantized weight (float32), stacked or per layer as currently held."""
    q = self.q.get_value()
    return _dequantize(q, self.scale.get_value(), q.ndim - 2, self.block)

  def __call__(self, x: jax.Array, group_sizes: jax.Array) -> jax.Array:
    return moe.grouped_matmul(x.astype(self.dtype), self.weight().astype(self.dtype),
                              group_sizes)


def apply(model: nnx.Module, kind: str, *, block: int = 64) -> list[str]:
  """Quantizes every Einsum (and expert projection) inside the transformer blocks; returns
  their paths."""
  if kind not in BITS:
    raise ValueError(f'lora.quantize_base={kind!r}; expected one of {list(BITS)} or None')
  done, bits = [], BITS[kind]
  block = block if bits == 4 else 1 << 30  # int8: one scale per output column
  for path, node in list(nnx.iter_graph(model)):
    if isinstance(node, (layers.Einsum, moe.Grouped)) and path and path[0] == 'blocks':
      parent = model
      for key in path[:-1]:
        parent = getattr(parent, key)
      kind_of = QuantizedEinsum if isinstance(node, layers.Einsum) else QuantizedGrouped
      setattr(parent, path[-1], kind_of(node, bits=bits, block=block))
      done.append('.'.join(map(str, path)))
  return done
