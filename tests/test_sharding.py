"""Sharded training equals single-device training; parameters really are sharded."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ftjax import config as config_lib
from ftjax import data, sharding
from ftjax import step as step_lib
from ftjax import trainer as trainer_lib
from ftjax.models import llama

ARCH = llama.Config(vocab_size=512, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=16, mlp_dim=256, rope_theta=10_000.0)
OPTIM = dict(lr=1e-3, steps=10, warmup_steps=0, schedule_kind='constant', end_lr_ratio=1.0,
             weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0, decay_embeddings=False)


def _setup(shape, devices, rules='fsdp_tp'):
  return trainer_lib.setup(arch=ARCH, model_options={}, mesh_shape=shape, rules_name=rules,
                     optim_kwargs=OPTIM, grad_accum=1, global_batch=8, seed=0, devices=devices)


def _batch(addition_data):
  rows = data.eval_batches([data.Source(addition_data[0])],
                           data.Options(tokenizer='byte', seq_len=16, train_on='all'),
                           global_batch=8, max_examples=8)
  return rows[0]


def _grads_and_step(trainer, local_batch):
  batch = data.to_global(local_batch, trainer.batch_sharding)
  with sharding.use(trainer.mesh, trainer.rules):
    grads_fn = jax.jit(lambda p, f, b: step_lib.loss_grads(p, f, b, graphdef=trainer.graphdef))
    grads, loss_sum, _ = grads_fn(trainer.state.params, trainer.frozen, batch)
    grads = jax.device_get(grads)
    state, first = trainer.train_step(trainer.state, trainer.frozen, batch, trainer.ref)
    _, second = trainer.train_step(state, trainer.frozen, batch, trainer.ref)
  return grads, float(loss_sum), jax.device_get(first), jax.device_get(second)


def test_logical_names_are_a_closed_set():
  model = nnx.eval_shape(lambda: llama.Llama(ARCH, rngs=nnx.Rngs(0)))
  names = set()
  for v in jax.tree.leaves(nnx.state(model), is_leaf=lambda x: isinstance(x, nnx.Variable)):
    names.update(sharding.logical_names(v))
  assert names <= sharding.LOGICAL_NAMES | {None}
  with pytest.raises(ValueError, match='unknown logical axis name'):
    sharding.spec(('batch', 'hidden'), sharding.RULES['fsdp'])


@pytest.mark.slow
@pytest.mark.parametrize('shape', [(2, 2, 2), (1, 8, 1)])
def test_sharded_step_equals_single_device(shape, addition_data):
  local = _batch(addition_data)
  ref = _grads_and_step(_setup((1, 1, 1), jax.devices()[:1]), local)
  trainer = _setup(shape, jax.devices())
  assert_same_step(_grads_and_step(trainer, local), ref)


def assert_same_step(got, ref):
  """Two `_grads_and_step` results agree: loss sum, every gradient, the step's own metrics, and
  the loss after one AdamW update (which must have lowered it)."""
  assert got[1] == pytest.approx(ref[1], rel=1e-6)
  jax.tree.map(_assert_close, got[0], ref[0])
  for key in ('loss', 'grad_norm'):
    assert got[2][key] == pytest.approx(ref[2][key], rel=1e-5)
  assert got[3]['loss'] == pytest.approx(ref[3]['loss'], rel=1e-5)
  assert got[3]['loss'] < got[2]['loss']


def _assert_close(actual, desired):
  # fp32 sums reduced in a different order across shards: errors scale with the array's size.
  scale = float(np.max(np.abs(desired)))
  np.testing.assert_allclose(actual, desired, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.slow
def test_large_parameters_are_sharded():
  trainer = _setup((2, 2, 2), jax.devices())
  leaves = jax.tree.leaves(trainer.state.params)
  big = [x for x in leaves if x.size >= 4096]
  assert big
  sharding.assert_sufficiently_sharded(trainer.state, min_bytes=4096 * 4)
  replicated = jax.device_put(trainer.state.params, NamedSharding(trainer.mesh, P()))
  with pytest.raises(AssertionError, match=f'{len(big)} arrays of >= 16384 bytes are not sharded'):
    sharding.assert_sufficiently_sharded(replicated, min_bytes=4096 * 4)
  for x in big:
    assert not x.sharding.is_fully_replicated, x.shape
    assert x.addressable_shards[0].data.size < x.size
  # Adam moments follow their parameters' layout instead of being replicated.
  mu = trainer.state.opt_state[1][0].mu
  for p, m in zip(jax.tree.leaves(trainer.state.params), jax.tree.leaves(mu), strict=True):
    assert m.sharding == p.sharding


def test_mesh_errors():
  with pytest.raises(config_lib.ConfigError, match=r'needs 6 devices, but 8 are available'):
    _setup((3, 2, 1), jax.devices())
  with pytest.raises(config_lib.ConfigError, match='do not divide the 8 available devices'):
    _setup((3, -1, 1), jax.devices())
  with pytest.raises(config_lib.ConfigError, match='global_batch=8 must be divisible'):
    trainer_lib.setup(arch=ARCH, model_options={}, mesh_shape=(1, 8, 1), rules_name='fsdp',
                optim_kwargs=OPTIM, grad_accum=2, global_batch=8, seed=0)


@pytest.mark.slow
def test_an_8b_model_is_initialised_sharded_without_ever_being_whole():
  # Compiled, not run: the per-device memory of the sharded init of Llama 3.1 8B in bf16.
  arch = llama.PRESETS['llama3p1_8b']
  mesh = sharding.make_mesh((1, 8, 1))
  make = lambda: llama.Llama(arch, rngs=nnx.Rngs(0), param_dtype=jax.numpy.bfloat16)
  _, init = sharding.sharded_init(make, mesh, sharding.RULES['fsdp_tp'])
  memory = init.lower().compile().memory_analysis()
  whole = 8.03e9 * 2  # bytes of the full model
  assert memory.output_size_in_bytes < 1.01 * whole / 8
  # The random draws are made in float32 per shard, so temporaries exceed the bf16 shard, but
  # a device's peak stays well under the size of the whole model.
  assert memory.output_size_in_bytes + memory.temp_size_in_bytes < 0.75 * whole
