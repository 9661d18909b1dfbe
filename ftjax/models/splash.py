"""Pallas splash attention (TPU): causal, grouped-query, packed segments, sliding windows.

The kernel runs per device under `shard_map`: rows split like the batch, kv heads (with their
query groups) like the heads, each device attending over its own full sequences. Tests run the
same kernel in Pallas' interpreter on CPU (`INTERPRET`).

Letters: B batch, T length, N heads, K kv heads, G query heads per kv head, H head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
from jaxtyping import Array, Float, Int

from ftjax import sharding

INTERPRET = False  # run the kernel in Pallas' interpreter (CPU tests); never faster than XLA
BLOCK = 512  # query/key block: the largest power of two up to this that divides T


def supported(t: int, window) -> str | None:
  """Why splash cannot run this call (None when it can)."""
  if window is not None and not isinstance(window, int):
    return 'layers with different windows (Gemma 2/3 local/global) need a static mask'
  if t % 128:
    return f'sequence length {t} is not a multiple of 128'
  return None


@functools.lru_cache(maxsize=32)
def _kernel(t: int, groups: int, window: int | None, softcap: float):
  mask = (masks.CausalMask((t, t)) if window is None
          else masks.LocalMask((t, t), window_size=(window - 1, 0), offset=0))
  block = max(b for b in (128, 256, 512, 1024) if b <= BLOCK and t % b == 0)
  sizes = kernel.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                            block_q_dq=block, block_kv_dq=block)
  return kernel.make_splash_mqa_single_device(
      masks.MultiHeadMask([mask] * groups), block_sizes=sizes,
      attn_logits_soft_cap=softcap or None, interpret=INTERPRET)


def attention(
    q: Float[Array, 'B T N H'],
    k: Float[Array, 'B T K H'],
    v: Float[Array, 'B T K H'],
    segment_ids: Int[Array, 'B T'],
    *,
    scale: float,
    window: int | None = None,
    softcap: float = 0.0,
) -> Float[Array, 'B T N H']:
  b, t, n, h = q.shape
  kv = k.shape[2]
  run = _kernel(t, n // kv, window, float(softcap))

  def local(q, k, v, seg):
    # [B, T, K, G, H] -> per row, per kv head: queries [G, T, H] against keys [T, H].
    q = jnp.transpose(q * jnp.asarray(scale, q.dtype), (0, 2, 3, 1, 4))
    k, v = jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))

    def one(q, k, v, seg):
      ids = kernel.SegmentIds(q=seg, kv=seg)
      return jax.vmap(lambda q, k, v: run(q, k, v, segment_ids=ids))(q, k, v)

    out = jax.vmap(one)(q, k, v, seg)  # [B, K, G, T, H]
    return jnp.transpose(out, (0, 3, 1, 2, 4))

  qg = q.reshape(b, t, kv, n // kv, h)
  mesh, specs = sharding.shard_map_specs(
      [(qg, ('batch', None, 'kv_heads', None, None)), (k, ('batch', None, 'kv_heads', None)),
       (v, ('batch', None, 'kv_heads', None)), (segment_ids, ('batch', None))])
  if mesh is None:
    out = local(qg, k, v, segment_ids)
  else:
    out = jax.shard_map(local, mesh=mesh, in_specs=tuple(specs), out_specs=specs[0],
                        check_vma=False)(qg, k, v, segment_ids)
  return out.reshape(b, t, n, h)
