"""LoRA, rsLoRA and DoRA: unchanged at init, only adapters train, merge exactly, small state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ftjax import config as config_lib
from ftjax import lora, quantize, train
from ftjax import trainer as trainer_lib
from ftjax.models import layers, llama

TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 512, (2, 12)))
VARIANTS = {'lora': {}, 'rslora': dict(use_rslora=True), 'dora': dict(use_dora=True)}


def _perturb_adapters(model):
  """Non-zero B (and magnitudes), as after some training."""
  key = jax.random.key(1)
  for _, node in nnx.iter_graph(model):
    if isinstance(node, lora.LoRAEinsum):
      key, sub = jax.random.split(key)
      node.b.set_value(0.1 * jax.random.normal(sub, node.b.shape))
      if node.use_dora:
        node.magnitude.set_value(node.magnitude.get_value() * 1.2)


@pytest.mark.parametrize('projection', [pytest.param('cpu_2d', marks=pytest.mark.slow), 'einsum'],
                         indirect=True)
@pytest.mark.parametrize('variant', [v if v == 'lora' else pytest.param(v, marks=pytest.mark.slow)
                                     for v in VARIANTS])
def test_logits_unchanged_at_init_and_merge_is_exact(variant, projection):
  model = llama.Llama(llama.PRESETS['tiny'], rngs=nnx.Rngs(0))
  base = np.asarray(model(TOKENS))
  lora.apply(model, rank=4, alpha=8.0, targets='all-linear', **VARIANTS[variant])
  at_init = np.asarray(model(TOKENS))
  if variant == 'dora':
    # DoRA rescales by magnitude / ||W|| = 1 at init, which is exact only up to rounding.
    np.testing.assert_allclose(at_init, base, atol=1e-6)
  else:
    np.testing.assert_array_equal(at_init, base)
  _perturb_adapters(model)
  unmerged = np.asarray(model(TOKENS))
  assert np.max(np.abs(unmerged - base)) > 1e-2
  lora.merge(model)
  assert not any(isinstance(n, lora.LoRAEinsum) for _, n in nnx.iter_graph(model))
  np.testing.assert_allclose(np.asarray(model(TOKENS)), unmerged, atol=2e-6, rtol=1e-5)


@pytest.mark.slow
def test_one_step_changes_only_adapters(small_config):
  small_config.lora.update(rank=4, alpha=8.0)
  arch = config_lib.model_config(small_config.model)
  optim_kwargs = {**config_lib.resolve(small_config).optim.make_kwargs(), 'steps': 10}
  trainer = trainer_lib.setup(
      arch=arch, model_options={}, mesh_shape=(1, -1, 1), rules_name='fsdp_tp',
      optim_kwargs=optim_kwargs, grad_accum=1, global_batch=8, seed=0,
      lora_options=config_lib.lora_options(small_config.lora))
  names = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(
      trainer.state.params)}
  assert names and all(("['a']" in n or "['b']" in n) for n in names)
  frozen_before = jax.device_get(trainer.frozen)
  params_before = jax.device_get(trainer.state.params)
  batch = train.data.to_global(
      train.data.eval_batches([train.data.Source(small_config.data.path)],
                              config_lib.resolve(small_config).data.options, global_batch=8)[0],
      trainer.batch_sharding)
  with train.sharding.use(trainer.mesh, trainer.rules):
    state, _ = trainer.train_step(trainer.state, trainer.frozen, batch, trainer.ref)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(trainer.frozen), frozen_before)
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), jax.device_get(state.params),
                         params_before)
  assert any(jax.tree.leaves(changed))
  # Adapters shard with their base kernels: the stacked 'layers' axis plus the base's names.
  q_a = state.params['blocks']['attn']['q']['a']
  assert q_a.get_metadata()['out_sharding'] == ('layers', 'embed', 'lora')


def _optimizer_bytes(arch, rank):
  model = nnx.eval_shape(lambda: llama.Llama(arch, rngs=nnx.Rngs(0)))
  if rank:
    lora.apply(model, rank=rank, alpha=16.0, targets='all-linear')
  _, params, _ = nnx.split(model, nnx.LoRAParam if rank else nnx.Param, ...)
  opt_state = jax.eval_shape(optax.adamw(1e-4).init, params)
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(opt_state))


@pytest.mark.slow
@pytest.mark.parametrize('preset,rank,bound', [('tiny', 8, 0.15), ('llama3p2_1b', 16, 0.01)])
def test_lora_optimizer_state_is_a_small_fraction(preset, rank, bound):
  arch = llama.PRESETS[preset]
  ratio = _optimizer_bytes(arch, rank) / _optimizer_bytes(arch, 0)
  print(f'{preset}: LoRA rank {rank} optimizer state / full = {ratio:.4f}')
  assert ratio < bound


def test_targets_that_match_nothing_list_the_modules():
  model = llama.Llama(llama.PRESETS['tiny'], rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"matches no module; the model has \['blocks.attn.k'"):
    lora.apply(model, rank=4, alpha=8.0, targets=r'self_attn\.q_proj')
  with pytest.raises(ValueError, match=r"unknown modules \['qproj'\]"):
    lora.apply(model, rank=4, alpha=8.0, targets='qproj,v')
  assert lora.apply(model, rank=4, alpha=8.0, targets='q,v') == ['blocks.attn.q', 'blocks.attn.v']


@pytest.mark.parametrize('projection', [pytest.param('cpu_2d', marks=pytest.mark.slow), 'einsum'],
                         indirect=True)
@pytest.mark.parametrize('kind,tolerance', [('int8', 0.02),
                                            pytest.param('int4', 0.35, marks=pytest.mark.slow)])
def test_quantized_base_stays_close_and_merges(kind, tolerance, projection):
  model = llama.Llama(llama.PRESETS['tiny'], rngs=nnx.Rngs(0))
  base = np.asarray(model(TOKENS))
  assert len(quantize.apply(model, kind)) == 7
  quantized = np.asarray(model(TOKENS))
  # Relative to the logits' scale: int8 per-channel is tight, int4 per-64-block is coarse.
  assert np.max(np.abs(quantized - base)) < tolerance * np.max(np.abs(base))
  lora.apply(model, rank=4, alpha=8.0, targets='all-linear')
  np.testing.assert_array_equal(np.asarray(model(TOKENS)), quantized)
  _, trainable, frozen = nnx.split(model, nnx.LoRAParam, ...)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(trainable))
  assert {str(x.dtype) for x in jax.tree.leaves(frozen)} >= {kind}


def _frozen_bytes(kind):
  def make():
    model = llama.Llama(llama.PRESETS['llama3p2_1b'], rngs=nnx.Rngs(0),
                        param_dtype=jnp.bfloat16)
    if kind:
      quantize.apply(model, kind)
    return model

  bits = {'int4': 4}
  return sum(x.size * bits.get(str(x.dtype), 8 * x.dtype.itemsize) / 8
             for x in jax.tree.leaves(nnx.state(nnx.eval_shape(make))))


def test_quantized_base_memory_for_a_1b_model():
  full, int8, int4 = _frozen_bytes(None), _frozen_bytes('int8'), _frozen_bytes('int4')
  print(f'llama3p2_1b frozen weights: bf16 {full / 2**30:.2f} GiB, int8 {int8 / 2**30:.2f} GiB, '
        f'int4 {int4 / 2**30:.2f} GiB (embeddings stay bf16)')
  assert int8 < 0.65 * full and int4 < 0.45 * full


@pytest.mark.slow
def test_adapter_dropout_only_in_training():
  model = llama.Llama(llama.PRESETS['tiny'], rngs=nnx.Rngs(0))
  lora.apply(model, rank=4, alpha=8.0, targets='all-linear', dropout=0.5)
  _perturb_adapters(model)
  clean = np.asarray(model(TOKENS))
  np.testing.assert_array_equal(np.asarray(model(TOKENS)), clean)  # inference: no dropout
  key = jax.random.key(3)
  dropped = np.asarray(model(TOKENS, dropout_key=key))
  assert np.max(np.abs(dropped - clean)) > 1e-3
  np.testing.assert_array_equal(np.asarray(model(TOKENS, dropout_key=key)), dropped)
  other = np.asarray(model(TOKENS, dropout_key=jax.random.key(4)))
  assert np.max(np.abs(other - dropped)) > 1e-3
  # The frozen path never sees dropout: with B = 0 the adapters add nothing, masks or not.
  fresh = llama.Llama(llama.PRESETS['tiny'], rngs=nnx.Rngs(0))
  base = np.asarray(fresh(TOKENS))
  lora.apply(fresh, rank=4, alpha=8.0, targets='all-linear', dropout=0.5)
  np.testing.assert_array_equal(np.asarray(fresh(TOKENS, dropout_key=key)), base)


@pytest.mark.slow
def test_lora_dropout_trains(small_config, tmp_path):
  small_config.lora.update(rank=4, alpha=8.0, dropout=0.1)
  small_config.optim.lr = 1e-2
  small_config.train.update(steps=6, log_every=3)
  summary = train.run(small_config, str(tmp_path))
  assert np.isfinite(summary['final_loss']) and summary['train_step_compiles'] == 1


@pytest.mark.slow
def test_compiled_lora_step_keeps_only_adapter_state(small_config):
  small_config.model.update(embed_dim=128, mlp_dim=512, num_heads=4, num_kv_heads=4, head_dim=32)
  arch = config_lib.model_config(small_config.model)
  resolved = config_lib.resolve(small_config)
  batch_rows = train.data.eval_batches([train.data.Source(small_config.data.path)],
                                       resolved.data.options, global_batch=8)[0]
  optim_kwargs = {**resolved.optim.make_kwargs(), 'steps': 10}

  def memory(lora_settings):
    trainer = trainer_lib.setup(arch=arch, model_options={}, mesh_shape=(1, 1, 1),
                                rules_name='fsdp', optim_kwargs=optim_kwargs, grad_accum=1,
                                global_batch=8, seed=0, lora_options=lora_settings,
                                devices=jax.devices()[:1])
    batch = train.data.to_global(batch_rows, trainer.batch_sharding)
    compiled = trainer.train_step.lower(trainer.state, trainer.frozen, batch, trainer.ref).compile()
    return compiled.memory_analysis()

  full = memory(None)
  adapters = memory(lora.Options(rank=4, alpha=8.0, targets='all-linear'))
  # The step's outputs are the new train state: for LoRA only adapters and their moments.
  assert adapters.output_size_in_bytes < 0.1 * full.output_size_in_bytes
  # And no full-size weight-gradient buffers: those would add the weights' bytes (a third of
  # a full step's outputs: weights and two AdamW moments) to LoRA's temporaries. Full training
  # itself may hold less, as XLA fuses each weight's update into its gradient.
  weight_bytes = full.output_size_in_bytes / 3
  assert adapters.temp_size_in_bytes < full.temp_size_in_bytes + 0.5 * weight_bytes


@pytest.mark.parametrize('projection', ['cpu_2d', 'einsum'], indirect=True)
@pytest.mark.parametrize('eqn,in_letters,out_letters,w_shape', [
    ('BTD,DNH->BTNH', 'D', 'NH', (24, 4, 6)),  # q/k/v
    ('BTNH,NHD->BTD', 'NH', 'D', (4, 6, 24)),  # o
    ('BTD,DF->BTF', 'D', 'F', (24, 40)),  # gate/up/down
    ('BTF,DF->BTD', 'F', 'D', (24, 40)),  # a weight stored [out, in]
])
def test_adapted_projection_equals_the_two_branch_form_values_and_gradients(
    eqn, in_letters, out_letters, w_shape, projection):
  """`_adapted` (one projection through the merged weight, its own backward pass) against
  autodiff of `x w + s (x a) b`: the output and the gradients of x, a and b; none for w."""
  xs, ws, ys = (part for part in eqn.replace('->', ',').split(','))
  size = dict(zip(ws, w_shape, strict=True)) | {'B': 2, 'T': 5}
  rank, scale = 3, 1.7
  keys = jax.random.split(jax.random.key(0), 5)
  x = jax.random.normal(keys[0], [size[c] for c in xs])
  w = jax.random.normal(keys[1], w_shape) / 5
  a = jax.random.normal(keys[2], [*(size[c] for c in in_letters), rank])
  b = jax.random.normal(keys[3], [rank, *(size[c] for c in out_letters)])
  dy = jax.random.normal(keys[4], [size[c] for c in ys])
  rest = ''.join(c for c in xs if c not in in_letters)

  def two_branch(x, w, a, b):
    xa = jnp.einsum(f'{xs},{in_letters}R->{rest}R', x, a)
    return jnp.einsum(eqn, x, w) + scale * jnp.einsum(f'{rest}R,R{out_letters}->{ys}', xa, b)

  spec = lora._Spec(eqn, in_letters, out_letters, scale)
  y_ref, vjp_ref = jax.vjp(two_branch, x, w, a, b)
  y, vjp = jax.vjp(jax.jit(lambda x, w, a, b: lora._adapted(spec, x, w, a, b)), x, w, a, b)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  got, want = vjp(dy), vjp_ref(dy)
  for name, g, g_ref in zip('xab', (got[0], got[2], got[3]), (want[0], want[2], want[3]),
                            strict=True):
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(g_ref))),
                               err_msg=name)
  np.testing.assert_array_equal(got[1], np.zeros(w_shape))  # the base is frozen


def test_a_small_adapter_update_survives_bfloat16_weights():
  """With bfloat16 weights the adapter keeps its own branch: merged into the weight, an update
  below half a bfloat16 step of it (w = 1, |s a b| < 2^-9) would round away entirely. Inputs
  in +c/-c pairs make `x w` exactly 0, so the output is the update alone."""
  base = layers.Einsum('BTD,DF->BTF', (64, 32), (None, None), rngs=nnx.Rngs(0),
                       dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  base.w.set_value(jnp.ones((64, 32), jnp.bfloat16))
  adapted = lora.LoRAEinsum(base, rank=4, alpha=4.0, use_rslora=False, use_dora=False,
                            rngs=nnx.Rngs(1))
  adapted.b.set_value(jax.random.normal(jax.random.key(2), adapted.b.shape, jnp.bfloat16))
  delta = np.asarray(adapted.delta())
  adapted.b.set_value(adapted.b.get_value() * (1.5e-3 / np.abs(delta).max()))
  delta = np.asarray(adapted.delta())
  assert 0 < np.abs(delta).max() < 2.0**-9
  c = np.asarray(jax.random.uniform(jax.random.key(3), (2, 8, 32), minval=0.5, maxval=2.0))
  x = jnp.asarray(np.stack([c, -c], axis=-1).reshape(2, 8, 64), jnp.bfloat16)
  assert not np.any(np.asarray(base(x), np.float32))  # x w = 0 exactly
  want = np.asarray(x, np.float32) @ delta
  np.testing.assert_allclose(np.asarray(adapted(x), np.float32), want,
                             atol=0.02 * np.abs(want).max())
