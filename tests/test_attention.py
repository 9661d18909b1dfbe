"""Attention kernels: Pallas splash attention (run by Pallas' interpreter on CPU) against XLA,
and the fallback to XLA where a kernel is not available."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ftjax import sharding
from ftjax.models import layers, llama, splash


@pytest.fixture
def interpreted(monkeypatch):
  monkeypatch.setattr(splash, 'INTERPRET', True)


def _packed_inputs(b=2, t=256, n=4, kv=2, h=32, seed=0):
  r = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(r.normal(size=(b, t, x, h)), jnp.float32) for x in (n, kv, kv))
  seg = np.ones((b, t), np.int32)
  seg[0, 100:] = 2  # row 0 packs two documents
  seg[1, 200:] = 0  # row 1 ends in padding
  pos = np.concatenate([np.arange(100), np.arange(156)])[None].repeat(b, 0)
  pos[1] = np.arange(t)
  return q, k, v, jnp.asarray(seg), jnp.asarray(pos)


@pytest.mark.slow
@pytest.mark.parametrize('window, softcap', [(None, 0.0), (64, 0.0), (None, 30.0)])
def test_splash_matches_xla_values_and_grads(interpreted, window, softcap):
  q, k, v, seg, pos = _packed_inputs()

  def run(impl, q, k, v):
    out = layers.attention(q, k, v, seg, pos, scale=0.2, window=window, softcap=softcap,
                           implementation=impl)
    return jnp.sum(jnp.where(seg[..., None, None] > 0, out, 0.0) ** 2)

  ref, got = run('xla', q, k, v), run('splash', q, k, v)
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  g_ref = jax.grad(run, argnums=(1, 2, 3))('xla', q, k, v)
  g_got = jax.grad(run, argnums=(1, 2, 3))('splash', q, k, v)
  for a, b in zip(g_got, g_ref, strict=True):
    np.testing.assert_allclose(a, b, atol=2e-5 * float(jnp.abs(b).max()))


@pytest.mark.slow
def test_splash_sharded_model_matches_xla(interpreted):
  """A Llama on a (1, 2, 2) mesh: splash under shard_map gives XLA's logits."""
  cfg = llama.Config(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=16, mlp_dim=64)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 128)))
  mesh = sharding.make_mesh((1, 2, 2), jax.devices()[:4])
  rules = sharding.get_rules('fsdp_tp')
  logits = {}
  for impl in ('xla', 'splash'):
    with sharding.use(mesh, rules):
      model = sharding.create_sharded(
          lambda impl=impl: llama.Llama(cfg, rngs=nnx.Rngs(0), attention_impl=impl), mesh, rules)
      logits[impl] = nnx.jit(lambda m, t: m(t))(model, tokens)
  np.testing.assert_allclose(logits['splash'], logits['xla'], atol=1e-5)


def test_unavailable_kernels_fall_back_to_xla(caplog):
  layers._FALLBACKS_SAID.clear()
  assert layers.attention_implementation('cudnn') == 'xla'  # no GPU here
  assert layers.attention_implementation('splash', length=256) == 'xla'  # no TPU here
  assert 'needs a GPU' in caplog.text and 'needs a TPU' in caplog.text
  assert layers.attention_implementation('xla') == 'xla'


def test_splash_refuses_what_it_cannot_run():
  assert 'multiple of 128' in splash.supported(100, None)
  assert 'static mask' in splash.supported(256, jnp.asarray(8))
  assert splash.supported(256, 64) is None
