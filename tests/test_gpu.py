"""What needs an NVIDIA GPU: the cuDNN attention path against XLA's (values and gradients), and
bf16 training against float32. Skipped elsewhere; benchmarks/gpu.sh runs them (`-m gpu`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import bench, objectives
from ftjax import step as step_lib
from ftjax import trainer as trainer_lib
from ftjax.models import layers, llama

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(jax.default_backend() != 'gpu', reason='needs an NVIDIA GPU')]

# cuDNN flash attention: bf16/fp16 inputs, head_dim a multiple of 8.
CFG = llama.Config(vocab_size=1024, embed_dim=256, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=64, mlp_dim=512, rope_theta=10_000.0)


def _packed(rows=2, length=256, seed=0):
  """Rows of two packed documents each (segments 1 and 2, positions restarting)."""
  rng = np.random.default_rng(seed)
  half = length // 3
  segments = np.where(np.arange(length) < half, 1, 2)[None].repeat(rows, 0)
  positions = np.concatenate([np.arange(half), np.arange(length - half)])[None].repeat(rows, 0)
  tokens = rng.integers(0, CFG.vocab_size, (rows, length + 1))
  return dict(tokens=jnp.asarray(tokens[:, :-1], jnp.int32),
              targets=jnp.asarray(tokens[:, 1:], jnp.int32),
              positions=jnp.asarray(positions, jnp.int32),
              segment_ids=jnp.asarray(segments, jnp.int32),
              loss_mask=jnp.ones((rows, length), jnp.int32))


def test_cudnn_is_used_on_a_gpu():
  assert layers.attention_implementation('cudnn') == 'cudnn'


def test_cudnn_attention_equals_xla_values_and_gradients():
  """Packed causal attention in bf16: cuDNN's output and its gradients are as close to a float32
  XLA reference as XLA's own bf16 path is (within 2x its error, plus bf16 rounding)."""
  rng = np.random.default_rng(0)
  b, t, n, kv, h = 2, 256, 8, 2, 64
  q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32)
             for s in ((b, t, n, h), (b, t, kv, h), (b, t, kv, h)))
  batch = _packed(b, t)
  seg, pos = batch['segment_ids'], batch['positions']

  def run(impl, dtype):
    def loss(q, k, v):
      out = layers.attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), seg, pos,
                             scale=h**-0.5, implementation=impl)
      return jnp.sum(out.astype(jnp.float32) ** 2), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return [np.asarray(x, np.float32) for x in (out, *grads)]

  ref = run('xla', jnp.float32)
  xla, cudnn = run('xla', jnp.bfloat16), run('cudnn', jnp.bfloat16)
  for name, r, x, c in zip(('out', 'dq', 'dk', 'dv'), ref, xla, cudnn, strict=True):
    err_xla, err_cudnn = np.max(np.abs(x - r)), np.max(np.abs(c - r))
    print(f'{name}: max |bf16 - f32| xla {err_xla:.3e} cudnn {err_cudnn:.3e}')
    assert err_cudnn <= 2 * err_xla + 1e-2 * np.max(np.abs(r)), name


def _trainer(dtype, attention='xla'):
  optim = dict(lr=1e-3, steps=20, warmup_steps=0, schedule_kind='constant', end_lr_ratio=1.0,
               weight_decay=0.0, b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0, decay_embeddings=False)
  return trainer_lib.setup(arch=CFG, model_options=dict(dtype=dtype, attention_impl=attention),
                           mesh_shape=(1, 1, 1), rules_name='fsdp', optim_kwargs=optim,
                           grad_accum=1, global_batch=8, seed=0, devices=jax.devices()[:1])


def test_bf16_training_follows_float32():
  """Ten steps on one batch: bf16 compute (float32 weights and optimizer) with cuDNN attention
  tracks the float32 XLA run's losses within 2% and lowers the loss as much."""
  batch = _packed(8, 256, seed=1)
  losses = {}
  for name, dtype, attention in (('f32', jnp.float32, 'xla'), ('bf16', jnp.bfloat16, 'cudnn')):
    trainer = _trainer(dtype, attention)
    state, out = trainer.state, []
    for _ in range(10):
      state, metrics = trainer.train_step(state, trainer.frozen, batch, trainer.ref)
      out.append(float(metrics['loss']))
    losses[name] = np.array(out)
  print({k: np.round(v, 4).tolist() for k, v in losses.items()})
  assert np.all(np.isfinite(losses['bf16']))
  np.testing.assert_allclose(losses['bf16'], losses['f32'], rtol=0.02)
  assert losses['bf16'][-1] < losses['bf16'][0] - 0.5


def test_sft_gradients_in_bf16_match_float32_direction():
  """One batch's full gradient in bf16 (cuDNN attention) points the way float32's does."""
  batch = _packed(4, 256, seed=2)
  grads = {}
  for name, dtype, attention in (('f32', jnp.float32, 'xla'), ('bf16', jnp.bfloat16, 'cudnn')):
    trainer = _trainer(dtype, attention)
    g, _, _ = jax.jit(lambda p, f, b, t=trainer: step_lib.loss_grads(
        p, f, b, graphdef=t.graphdef, objective=objectives.SFT))(
            trainer.state.params, trainer.frozen, batch)
    grads[name] = np.concatenate([np.ravel(np.asarray(x, np.float32))
                                  for x in jax.tree.leaves(g)])
  cosine = grads['bf16'] @ grads['f32'] / (np.linalg.norm(grads['bf16'])
                                           * np.linalg.norm(grads['f32']))
  print(f'cosine(bf16 grads, f32 grads) = {cosine:.5f}')
  assert cosine > 0.99


def test_bench_reports_the_gpu_table_peak():
  from configs import base

  c = base.get_config()
  c.model.update(preset='tiny', dtype='bfloat16')
  c.data.update(seq_len=256, global_batch=8)
  result = bench.run(c, steps=3)
  assert result['peak_source'].startswith('table: ') and 0 < result['mfu'] < 1
