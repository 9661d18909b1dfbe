"""The chunked LM-head loss equals the plain one and never holds all the logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ftjax import losses
from ftjax.models import llama

ARCH = llama.Config(vocab_size=97, embed_dim=32, num_layers=1, num_heads=4, num_kv_heads=2,
                    head_dim=8, mlp_dim=64)


@pytest.mark.slow
@pytest.mark.parametrize('chunk', [4, 5, 16])  # 5 does not divide 16: the last chunk is padded
def test_chunked_equals_plain_loss_and_grads(chunk):
  model = llama.Llama(ARCH, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 97, (2, 16)))
  targets = jnp.asarray(rng.integers(0, 97, (2, 16)))
  mask = jnp.asarray(rng.integers(0, 2, (2, 16)))
  graphdef, params = nnx.split(model)

  def stats(params, chunk):
    m = nnx.merge(graphdef, params)
    return losses.chunked_next_token_xent(m.hidden(tokens), targets, mask, m.logits, chunk)

  plain, chunked = stats(params, 0), stats(params, chunk)
  for key in plain:
    np.testing.assert_allclose(chunked[key], plain[key], rtol=1e-5, err_msg=key)
  g_plain = jax.grad(lambda p: stats(p, 0)['loss_sum'])(params)
  g_chunk = jax.grad(lambda p: stats(p, chunk)['loss_sum'])(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               g_chunk, g_plain)


def test_chunked_loss_keeps_logits_small():
  """vocab 32k x 512 positions x 4 rows: 256 MiB of float32 logits unchunked."""
  b, t, d, v = 4, 512, 64, 32_768
  h = jax.ShapeDtypeStruct((b, t, d), jnp.float32)
  w = jax.ShapeDtypeStruct((d, v), jnp.float32)
  ids = jax.ShapeDtypeStruct((b, t), jnp.int32)

  def temp_bytes(chunk):
    def loss(h, w, targets):
      return losses.chunked_next_token_xent(h, targets, jnp.ones_like(targets), lambda x: x @ w,
                                            chunk)['loss_sum']
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(h, w, ids).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  whole, chunked = temp_bytes(0), temp_bytes(64)
  print(f'temporaries: whole sequence {whole / 2**20:.0f} MiB, '
        f'chunks of 64 {chunked / 2**20:.0f} MiB')
  assert whole > b * t * v * 4  # at least the logits
  assert chunked < whole / 4
