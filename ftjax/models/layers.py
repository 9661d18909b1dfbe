"""Shared model primitives: parameters with logical names, Einsum, RMSNorm, rope, attention.

This is the only module that attaches sharding metadata to parameters.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from ftjax import sharding

RematPolicy = Literal['auto', 'none', 'dots', 'offload', 'full']
REMAT_POLICIES = {
    'full': None,  # save nothing inside a layer, recompute everything
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Like 'dots', but the saved matmul outputs wait in pinned host memory, not in HBM.
    'offload': jax.checkpoint_policies.offload_dot_with_no_batch_dims('device', 'pinned_host'),
}


def resolve_remat(remat: str) -> str:
  """`remat='auto'`: `dots` on CPU, `none` on TPU and GPU (the platform of the active mesh).

  Measured on XLA:CPU (docs/performance.md): a rolled layer scan with `dots` was faster than
  everything kept, rolled or unrolled (full fine-tuning 885 vs 964 ms unrolled and 1133 rolled,
  LoRA 663 vs 692 and 780), with 2-3x fewer temporaries (350 vs 787 MB; SmolLM2 LoRA 1.06 vs
  3.16 GB, and 1.33x faster). Accelerators keep everything unless the config asks for less:
  there recomputation costs matmul time that saving does not.
  """
  if remat != 'auto':
    return remat
  return 'dots' if sharding.platform() == 'cpu' else 'none'


def param(
    rngs: nnx.Rngs,
    init: jax.nn.initializers.Initializer,
    shape: Sequence[int],
    names: Sequence[str | None],
    dtype: jnp.dtype,
) -> nnx.Param:
  """A parameter carrying its logical axis names (mapped to the mesh by ftjax.sharding)."""
  assert len(shape) == len(names), (shape, names)
  return nnx.Param(
      init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(names), eager_sharding=False
  )


class Einsum(nnx.Module):
  """A weight contracted with the input by a fixed einsum equation."""

  def __init__(
      self,
      eqn: str,
      shape: Sequence[int],
      names: Sequence[str | None],
      *,
      rngs: nnx.Rngs,
      init_std: float = 0.02,
      param_dtype: jnp.dtype = jnp.float32,
      dtype: jnp.dtype = jnp.float32,
  ):
    self.eqn = eqn
    self.dtype = dtype
    self.w = param(rngs, jax.nn.initializers.normal(init_std), shape, names, param_dtype)

  def weight(self) -> jax.Array:
    """The weight in float32 (as `quantize.QuantizedEinsum.weight` dequantizes)."""
    return self.w.get_value().astype(jnp.float32)

  def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
    del key  # no dropout in a plain projection; adapters wrapping it use the key
    return project(self.eqn, x.astype(self.dtype), self.w.get_value().astype(self.dtype))


def split_eqn(eqn: str) -> tuple[str, str, str]:
  """'BTD,DF->BTF' -> ('BTD', 'DF', 'BTF'): the input's, the weight's and the output's axes."""
  ins, out = eqn.split('->')
  x, w = ins.split(',')
  return x, w, out


# The CPU fast path of `project`; tests turn it off to run the TPU/GPU einsum path on CPU.
CPU_2D_PROJECTION = True


def project(eqn: str, x: jax.Array, w: jax.Array) -> jax.Array:
  """`jnp.einsum(eqn, x, w)` for a projection `BT<in>,<w>->BT<out>` (`<w>` = `<in><out>` or
  `<out><in>`).

  On CPU it runs as one 2-D matmul `[B*T, in] @ [in, out]`: XLA:CPU executes that about 1.3x
  faster in a train step than the same contraction as a multi-axis dot (the weight gradient
  contracts two axes, B and T). TPU and GPU compilers get the einsum, which they handle natively
  and which keeps every axis visible to the sharding propagation.
  """
  xs, ws, out = split_eqn(eqn)
  if (not CPU_2D_PROJECTION or sharding.platform() != 'cpu' or xs[:2] != out[:2]
      or x.ndim != len(xs)):
    return jnp.einsum(eqn, x, w)
  n_in = len(xs) - 2
  if ws == xs[2:] + out[2:]:
    w2 = w.reshape(math.prod(w.shape[:n_in]), -1)
  elif ws == out[2:] + xs[2:]:
    w2 = w.reshape(-1, math.prod(w.shape[len(ws) - n_in:])).T
  else:
    return jnp.einsum(eqn, x, w)
  y = x.reshape(math.prod(x.shape[:2]), -1) @ w2
  return y.reshape(*x.shape[:2], *(w.shape[ws.index(c)] for c in out[2:]))


class RMSNorm(nnx.Module):
  """Root-mean-square norm over the last axis, computed in float32.

  `plus_one` is Gemma's variant: the weight is stored as an offset from one.
  """

  def __init__(self, dim: int, *, eps: float, rngs: nnx.Rngs, plus_one: bool = False,
               name: str = 'embed', param_dtype: jnp.dtype = jnp.float32):
    self.eps = eps
    self.plus_one = plus_one
    init = jax.nn.initializers.zeros if plus_one else jax.nn.initializers.ones
    self.scale = param(rngs, init, (dim,), (name,), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = x.dtype
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
    scale = self.scale.get_value().astype(jnp.float32) + (1.0 if self.plus_one else 0.0)
    return (x * scale.reshape((1,) * (x.ndim - 1) + (-1,))).astype(dtype)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rope:
  """Rotary embedding settings. `scaling_factor` 1.0 means plain rope."""

  theta: float
  scaling_factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_len: int = 8192
  linear_factor: float = 1.0  # 'linear' scaling: positions divided by this factor

  def inv_freq(self, head_dim: int) -> jax.Array:
    """Inverse frequencies `[head_dim // 2]`, with Llama 3 long-context scaling if set."""
    inv = 1.0 / (self.theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    inv = inv / self.linear_factor
    if self.scaling_factor == 1.0:
      return inv
    # Llama 3.1 scaling: long wavelengths are divided by the factor, short ones kept,
    # and the band between them interpolated smoothly.
    low_wavelen = self.original_max_len / self.low_freq_factor
    high_wavelen = self.original_max_len / self.high_freq_factor
    wavelen = 2 * math.pi / inv
    smooth = (self.original_max_len / wavelen - self.low_freq_factor) / (
        self.high_freq_factor - self.low_freq_factor
    )
    smoothed = (1 - smooth) * inv / self.scaling_factor + smooth * inv
    out = jnp.where(wavelen > low_wavelen, inv / self.scaling_factor, inv)
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(is_medium, smoothed, out)

  def sin_cos(
      self, positions: Int[Array, 'B T'], head_dim: int
  ) -> tuple[Float[Array, 'B T h'], Float[Array, 'B T h']]:
    inv_freq = self.inv_freq(head_dim).reshape((1,) * positions.ndim + (-1,))
    angles = positions[..., None].astype(jnp.float32) * inv_freq
    return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x: Float[Array, 'B T N H'], sin: jax.Array, cos: jax.Array) -> jax.Array:
  """Rotates the two halves of the head dim (the Hugging Face layout)."""
  dtype = x.dtype
  x = x.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  sin, cos = sin[:, :, None, :], cos[:, :, None, :]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(dtype)


def attention(
    q: Float[Array, 'B T N H'],
    k: Float[Array, 'B T K H'],
    v: Float[Array, 'B T K H'],
    segment_ids: Int[Array, 'B T'],
    positions: Int[Array, 'B T'],
    *,
    scale: float,
    window: jax.Array | int | None = None,
    softcap: float = 0.0,
    implementation: str | None = None,
) -> Float[Array, 'B T N H']:
  """Causal grouped-query attention that never crosses packed-segment boundaries.

  `window` (may be traced, so scanned layers can differ) limits each query to keys at most
  `window - 1` positions back. `softcap` > 0 caps the logits with `softcap * tanh(x / softcap)`,
  which `jax.nn.dot_product_attention` cannot do, so that case uses an einsum path.
  """
  mask = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
  if window is not None:
    mask &= (positions[:, None, :, None] - positions[:, None, None, :]) < window
  implementation = attention_implementation(implementation, softcap=softcap, length=q.shape[1],
                                            window=window)
  if implementation == 'splash':
    from ftjax.models import splash

    return splash.attention(q, k, v, segment_ids, scale=scale, window=window, softcap=softcap)
  if not softcap:
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=True,
                                        implementation=implementation)
  t = q.shape[1]
  causal = jnp.tril(jnp.ones((t, t), dtype=bool))
  return masked_attention(q, k, v, (mask & causal[None, None])[:, 0], scale=scale, softcap=softcap)


_FALLBACKS_SAID: set[str] = set()


def attention_implementation(requested: str | None, *, softcap: float = 0.0, length: int = 0,
                             window=None) -> str:
  """The attention kernel to use: `requested` where the platform has it, else XLA (said once).

  cuDNN flash attention needs an NVIDIA GPU, Pallas splash attention a TPU. The platform is
  that of the active mesh (so `ftjax plan` compiles for the TPU it plans for), else JAX's default.
  """
  requested = requested or 'xla'
  platform = sharding.platform()
  reason = None
  if requested == 'cudnn':
    if platform != 'gpu':
      reason = f'needs a GPU, this is {platform}'
    elif softcap:
      reason = 'cuDNN has no logit soft-capping'
  elif requested == 'splash':
    from ftjax.models import splash

    # CPU tests run the same kernel in Pallas' interpreter.
    if platform != 'tpu' and not (platform == 'cpu' and splash.INTERPRET):
      reason = f'needs a TPU, this is {platform}'
    else:
      reason = splash.supported(length, window)
  if reason is None:
    return requested
  if requested not in _FALLBACKS_SAID:
    _FALLBACKS_SAID.add(requested)
    logging.warning('model.attention=%s %s: using XLA attention instead', requested, reason)
  return 'xla'


def masked_attention(
    q: Float[Array, 'B T N H'],
    k: Float[Array, 'B S K H'],
    v: Float[Array, 'B S K H'],
    allowed: Bool[Array, 'B T S'],
    *,
    scale: float,
    softcap: float = 0.0,
) -> Float[Array, 'B T N H']:
  """Grouped-query attention with an explicit mask, float32 logits, optional soft-capping.

  A query that may attend to nothing (a padding token) gets a uniform average, not NaN.
  """
  b, t, n, h = q.shape
  kv = k.shape[2]
  qg = q.reshape(b, t, kv, n // kv, h)
  logits = jnp.einsum('BTKGH,BSKH->BKGTS', qg, k, preferred_element_type=jnp.float32) * scale
  if softcap:
    logits = softcap * jnp.tanh(logits / softcap)
  logits = jnp.where(allowed[:, None, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum('BKGTS,BSKH->BTKGH', probs, v).reshape(b, t, n, h)


def cached_attention(
    q: Float[Array, 'B T N H'],
    k: Float[Array, 'B S K H'],
    v: Float[Array, 'B S K H'],
    positions: Int[Array, 'B T'],
    key_positions: Int[Array, 'B S'],
    *,
    scale: float,
    window: jax.Array | int | None = None,
    softcap: float = 0.0,
) -> Float[Array, 'B T N H']:
  """New queries over a KV cache: causal by position; slots at position -1 are empty."""
  q_pos, k_pos = positions[:, :, None], key_positions[:, None, :]
  allowed = (k_pos >= 0) & (k_pos <= q_pos)
  if window is not None:
    allowed &= (q_pos - k_pos) < window
  return masked_attention(q, k, v, allowed, scale=scale, softcap=softcap)
