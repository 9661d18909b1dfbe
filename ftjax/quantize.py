"""A quantized frozen base (QLoRA-style): int8 or int4 weights with block-wise float scales.

`apply` replaces the Einsums of the transformer blocks by `QuantizedEinsum`s that store the
weight as integers plus one float32 scale per block of `block` values along the first input
(contracted) axis, and dequantize on the fly inside the matmul. The integers live in `Quantized`
variables, which are never trainable, so they stay in the frozen part of the train state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ftjax.models import layers

BITS = {'int8': 8, 'int4': 4}
_DTYPES = {8: jnp.int8, 4: jnp.int4}


class Quantized(nnx.Variable):
  """Integer weights (or their scales) of a frozen, quantized layer."""


class QuantizedEinsum(nnx.Module):
  """`Einsum` with an integer weight, dequantized as `q * scale` per block in the matmul."""

  def __init__(self, base: layers.Einsum, *, bits: int, block: int):
    x, w_letters, _ = layers.split_eqn(base.eqn)
    weight = base.w.get_value()
    names = tuple(base.w.get_metadata().get('out_sharding') or (None,) * weight.ndim)
    self.eqn, self.dtype = base.eqn, base.dtype
    self.lead = weight.ndim - len(w_letters)
    self.axis = next(i for i, c in enumerate(w_letters) if c in x)  # within the weight letters
    size = weight.shape[self.lead + self.axis]
    self.block = block if size % block == 0 else size
    levels = 2 ** (bits - 1) - 1
    blocked = self._blocked(weight.astype(jnp.float32))
    scale = jnp.max(jnp.abs(blocked), axis=self.lead + self.axis + 1, keepdims=True) / levels
    scale = jnp.where(scale == 0, 1.0, scale)
    q = jnp.clip(jnp.round(blocked / scale), -levels, levels).astype(_DTYPES[bits])
    self.q = Quantized(q.reshape(weight.shape), out_sharding=names, eager_sharding=False)
    self.scale = Quantized(jnp.squeeze(scale, self.lead + self.axis + 1), out_sharding=names,
                           eager_sharding=False)

  def _blocked(self, w: jax.Array, lead: int | None = None) -> jax.Array:
    lead = self.lead if lead is None else lead
    a = lead + self.axis
    return w.reshape(*w.shape[:a], w.shape[a] // self.block, self.block, *w.shape[a + 1:])

  def weight(self) -> jax.Array:
    """The dequantized weight (float32), stacked or per layer as currently held."""
    q = self.q.get_value()
    lead = q.ndim - len(layers.split_eqn(self.eqn)[1])
    blocked = self._blocked(q.astype(jnp.float32), lead)
    scale = jnp.expand_dims(self.scale.get_value(), lead + self.axis + 1)
    return (blocked * scale).reshape(q.shape)

  def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
    del key
    return layers.project(self.eqn, x.astype(self.dtype), self.weight().astype(self.dtype))


def apply(model: nnx.Module, kind: str, *, block: int = 64) -> list[str]:
  """Quantizes every Einsum inside the transformer blocks; returns their paths."""
  if kind not in BITS:
    raise ValueError(f'lora.quantize_base={kind!r}; expected one of {list(BITS)} or None')
  done = []
  for path, node in list(nnx.iter_graph(model)):
    if isinstance(node, layers.Einsum) and path and path[0] == 'blocks':
      parent = model
      for key in path[:-1]:
        parent = getattr(parent, key)
      setattr(parent, path[-1], QuantizedEinsum(node, bits=BITS[kind],
                                                block=block if BITS[kind] == 4 else 1 << 30))
      done.append('.'.join(map(str, path)))
  return done
