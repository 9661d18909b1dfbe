"""The Llama model against Hugging Face `transformers` on the same random weights."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from ftjax.models import layers, llama


def _hf_model(num_kv_heads, tie, rope_scaling=None):
  cfg = transformers.LlamaConfig(
      vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=num_kv_heads, head_dim=16,
      max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=tie,
      rope_theta=10_000.0, rope_scaling=rope_scaling, attention_bias=False, mlp_bias=False)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():  # non-trivial norm weights, so a missed norm would show
    for name, p in model.named_parameters():
      if 'norm' in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


def _to_ftjax(hf, arch):
  """Copies HF tensors (out, in layout, one per layer) into the stacked ftjax layout."""
  sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
  d, n, k, h = arch.embed_dim, arch.num_heads, arch.num_kv_heads, arch.head_dim
  layer = lambda name: np.stack([sd[f'model.layers.{i}.{name}'] for i in range(arch.num_layers)])
  params = {
      'embed': sd['model.embed_tokens.weight'],
      'final_norm': {'scale': sd['model.norm.weight']},
      'blocks': {
          'attn_norm': {'scale': layer('input_layernorm.weight')},
          'mlp_norm': {'scale': layer('post_attention_layernorm.weight')},
          'attn': {
              'q': {'w': layer('self_attn.q_proj.weight').transpose(0, 2, 1).reshape(-1, d, n, h)},
              'k': {'w': layer('self_attn.k_proj.weight').transpose(0, 2, 1).reshape(-1, d, k, h)},
              'v': {'w': layer('self_attn.v_proj.weight').transpose(0, 2, 1).reshape(-1, d, k, h)},
              'o': {'w': layer('self_attn.o_proj.weight').transpose(0, 2, 1).reshape(-1, n, h, d)},
          },
          'mlp': {name: {'w': layer(f'mlp.{name}_proj.weight').transpose(0, 2, 1)}
                  for name in ('gate', 'up', 'down')},
      },
  }
  if not arch.tie_embeddings:
    params['lm_head'] = {'w': sd['lm_head.weight'].T}
  model = llama.Llama(arch, rngs=nnx.Rngs(0))
  state = nnx.state(model)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  nnx.update(model, state)
  return model


LLAMA3_SCALING = dict(rope_type='llama3', factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=32)


@pytest.mark.parametrize('num_kv_heads,tie,scaling', [
    (2, False, None),  # GQA
    (4, True, None),  # MHA, tied embeddings (Llama 3.2 style)
    (1, False, LLAMA3_SCALING),  # MQA with Llama 3.1 rope scaling
])
def test_logits_match_transformers(num_kv_heads, tie, scaling, projection):
  hf = _hf_model(num_kv_heads, tie, scaling)
  arch = llama.Config(vocab_size=128, embed_dim=64, num_layers=2, num_heads=4,
                      num_kv_heads=num_kv_heads, head_dim=16, mlp_dim=96, rope_theta=10_000.0,
                      tie_embeddings=tie, norm_eps=1e-5,
                      **(dict(rope_scaling_factor=8.0, rope_original_max_len=32)
                         if scaling else {}))
  model = _to_ftjax(hf, arch)
  tokens = np.random.default_rng(0).integers(0, 128, size=(2, 48))
  with torch.no_grad():
    want = hf(torch.tensor(tokens)).logits.numpy()
  got = np.asarray(model(jnp.asarray(tokens)))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_packed_segments_do_not_attend_across_documents():
  arch = llama.PRESETS['tiny']
  model = llama.Llama(arch, rngs=nnx.Rngs(1))
  rng = np.random.default_rng(1)
  a, b = rng.integers(0, arch.vocab_size, 5), rng.integers(0, arch.vocab_size, 7)
  packed = jnp.asarray(np.concatenate([a, b])[None])
  positions = jnp.asarray(np.concatenate([np.arange(5), np.arange(7)])[None])
  segments = jnp.asarray(np.array([1] * 5 + [2] * 7)[None])
  logits = model(packed, positions, segments)
  np.testing.assert_allclose(logits[0, :5], model(jnp.asarray(a[None]))[0], atol=1e-5)
  np.testing.assert_allclose(logits[0, 5:], model(jnp.asarray(b[None]))[0], atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize('remat', ['dots', 'full'])
def test_remat_does_not_change_values_or_gradients(remat):
  arch = llama.PRESETS['tiny']
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, arch.vocab_size, (2, 12)))

  def loss_and_grads(policy):
    model = llama.Llama(arch, rngs=nnx.Rngs(3), remat=policy)
    return nnx.value_and_grad(lambda m: jnp.mean(m(tokens) ** 2))(model)

  (l0, g0), (l1, g1) = loss_and_grads('none'), loss_and_grads(remat)
  assert float(l1) == pytest.approx(float(l0), rel=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               nnx.state(g1), nnx.state(g0))


@pytest.mark.parametrize('unroll', [1, 4])
def test_remat_keeps_fewer_activations_rolled_and_unrolled(unroll):
  """The compiled backward pass holds fewer temporaries with remat, whether the layer scan is
  rolled or unrolled (unrolled, XLA would merge a recomputation it may CSE back into the
  forward pass: remat then did nothing)."""
  arch = dataclasses.replace(llama.PRESETS['tiny'], num_layers=4, embed_dim=128, mlp_dim=512)
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, arch.vocab_size, (2, 128)))

  def temporaries(policy):
    model = llama.Llama(arch, rngs=nnx.Rngs(3), remat=policy, scan_unroll=unroll)
    graphdef, params = nnx.split(model)
    loss = lambda p: jnp.mean(nnx.merge(graphdef, p)(tokens) ** 2)
    return jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes

  none, dots, full = (temporaries(p) for p in ('none', 'dots', 'full'))
  assert full <= dots < none, (none, dots, full)  # unrolled, XLA:CPU schedules both alike
  if unroll == 1:
    assert full < dots, (none, dots, full)


def test_presets_have_the_published_sizes():
  # Parameter counts of the released checkpoints (tied embeddings counted once).
  expected = {'llama3p2_1b': 1.236e9, 'llama3p2_3b': 3.213e9, 'llama3p1_8b': 8.030e9,
              'llama3p1_70b': 70.55e9}
  for name, count in expected.items():
    arch = llama.PRESETS[name]
    model = nnx.eval_shape(lambda arch=arch: llama.Llama(arch, rngs=nnx.Rngs(0)))
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
    assert n == pytest.approx(count, rel=2e-3), name


def test_the_projection_fixture_switches_the_path(projection):
  x, w = jnp.ones((2, 3, 4)), jnp.ones((4, 5))
  jaxpr = str(jax.make_jaxpr(lambda x, w: layers.project('BTD,DF->BTF', x, w))(x, w))
  # The CPU path flattens [B, T] into one matmul row axis; the einsum keeps them.
  assert ('f32[6,4]' in jaxpr) == (projection == 'cpu_2d'), jaxpr
