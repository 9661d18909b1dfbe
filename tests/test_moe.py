"""Mixture-of-experts models (Qwen3-MoE, Qwen2-MoE, Mixtral): logits and greedy tokens equal
transformers', routing is dropless, export round-trips, router losses equal transformers', and
expert-parallel meshes equal one device."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from helpers import CASES, COMMON, hf_logits, make_hf

import ftjax
from ftjax import sharding
from ftjax import trainer as trainer_lib
from ftjax.models import llama

TOKENS = np.random.default_rng(0).integers(0, 160, size=(2, 48))
MOE = ('qwen3_moe', 'qwen3_moe_norm', 'mixtral', 'qwen2_moe')


def _routed(hf, tokens):
  """Per layer, how many (token, slot) pairs transformers routes to each expert."""
  counts, hooks = [], []
  for layer in hf.model.layers:
    router = layer.mlp.gate if hasattr(layer, 'mlp') else layer.block_sparse_moe.gate
    hooks.append(router.register_forward_hook(
        lambda m, i, out: counts.append(np.bincount(out[2].reshape(-1).numpy(),
                                                    minlength=m.num_experts))))
  hf_logits(hf, tokens)
  for h in hooks:
    h.remove()
  return counts


@pytest.mark.parametrize('case', MOE)
def test_logits_and_greedy_tokens_match_transformers(case, hf_checkpoints):
  folder, hf = hf_checkpoints(case)
  assert all((c > 0).all() for c in _routed(hf, TOKENS))  # every expert of every layer is used
  model = ftjax.load_pretrained(folder, dtype='float32')
  assert model.cfg.num_experts == 4 and model.cfg.num_experts_per_tok == 2
  diff = float(np.max(np.abs(np.asarray(model(jnp.asarray(TOKENS))) - hf_logits(hf, TOKENS))))
  print(f'{case}: max |logit diff| = {diff:.2e}')
  assert diff <= 1e-4
  prompt = TOKENS[:, :12]
  theirs = hf.generate(torch.tensor(prompt), max_new_tokens=8, do_sample=False,
                       pad_token_id=0).numpy()[:, 12:]
  ours = ftjax.generate(model, prompt, max_new_tokens=8)  # greedy, through the KV cache
  np.testing.assert_array_equal(np.asarray(ours), theirs)


def test_routing_is_dropless_when_every_token_picks_one_expert(tmp_path):
  """Hidden dim 0 of the residual stream is a constant +10 (set in every embedding; attention
  and experts write nothing to it) and the routers read only that dim, for expert 0: every token
  picks expert 0 (top-1). With no capacity limit that one expert computes all of them, and the
  logits still agree."""
  hf = make_hf('qwen3_moe', str(tmp_path), num_experts_per_tok=1)
  with torch.no_grad():
    hf.model.embed_tokens.weight[:, 0] = 10.0
    for layer in hf.model.layers:
      layer.self_attn.o_proj.weight[0] = 0.0
      layer.mlp.experts.down_proj[:, 0] = 0.0
      layer.mlp.gate.weight.zero_()
      layer.mlp.gate.weight[0, 0] = 1.0
  hf.save_pretrained(str(tmp_path))
  counts = _routed(hf, TOKENS)
  assert all(c[0] == TOKENS.size and c[1:].sum() == 0 for c in counts)
  model = ftjax.load_pretrained(str(tmp_path), dtype='float32')
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(TOKENS))), hf_logits(hf, TOKENS),
                             atol=1e-4)


@pytest.mark.parametrize('case', ['qwen3_moe', 'mixtral', 'qwen2_moe'])
def test_export_round_trip_loads_in_transformers(case, tmp_path, hf_checkpoints):
  folder, hf = hf_checkpoints(case)
  model = ftjax.load_pretrained(folder, dtype='float32')
  ftjax.save_pretrained(model, str(tmp_path / 'out'), dtype='float32')
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'out')).eval()
  assert type(back) is type(hf)
  np.testing.assert_allclose(hf_logits(back, TOKENS), hf_logits(hf, TOKENS), atol=1e-5)
  assert set(back.state_dict()) == set(hf.state_dict())


def test_moe_config_json_is_read_and_written_back():
  for case in MOE:
    model_type, extra = CASES[case]
    hf = transformers.AutoConfig.for_model(model_type, **{**COMMON, **extra}).to_dict()
    cfg = llama.Config(**llama.llama_hf.fields_from_hf(hf))
    again = llama.Config(**llama.llama_hf.fields_from_hf(llama.config_to_hf(cfg, 'float32')))
    assert again == cfg and cfg.num_experts == 4, case


@pytest.mark.parametrize('case', ['qwen3_moe'] + [pytest.param(c, marks=pytest.mark.slow)
                                                  for c in ('mixtral', 'qwen2_moe')])
def test_router_losses_and_gradients_match_transformers(case, hf_checkpoints):
  """With padding in the batch: our SFT loss with router_aux_loss_coef equals transformers'
  loss with output_router_logits (cross-entropy + coef x load balancing over unpadded tokens),
  its router and attention gradients equal theirs, and the logged z-loss is the mean squared
  logsumexp of their router logits; the z-loss coefficient adds exactly coef x z."""
  from flax import nnx

  from ftjax import objectives
  from ftjax import step as step_lib

  folder, _ = hf_checkpoints(case)
  hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
  hf.router_aux_loss_coef = coef = 0.05
  valid = np.ones(TOKENS.shape, bool)
  valid[1, 40:] = False  # right padding in the second row
  labels = np.where(valid, TOKENS, -100)
  out = hf(torch.tensor(TOKENS), attention_mask=torch.tensor(valid.astype(np.int64)),
           labels=torch.tensor(labels), output_router_logits=True)
  out.loss.backward()
  loss_theirs, aux_theirs = float(out.loss.detach()), float(out.aux_loss.detach())
  valid_flat = torch.tensor(valid.reshape(-1))
  z_theirs = float(torch.cat([torch.logsumexp(r[valid_flat].detach().float(), -1) ** 2
                              for r in out.router_logits]).mean())

  model = ftjax.load_pretrained(folder, dtype='float32')
  graphdef, params = nnx.split(model)
  batch = dict(tokens=jnp.asarray(TOKENS), positions=jnp.broadcast_to(jnp.arange(48), (2, 48)),
               segment_ids=jnp.asarray(valid.astype(np.int32)),
               targets=jnp.asarray(np.roll(TOKENS, -1, axis=1)),
               loss_mask=jnp.asarray(np.roll(labels, -1, axis=1) >= 0).at[:, -1].set(False))

  def ours(aux_coef, z_coef):
    options = objectives.Options(router_aux_loss_coef=aux_coef, router_z_loss_coef=z_coef)
    grads, loss_sum, metrics = step_lib.loss_grads(params, nnx.State({}), batch,
                                                   graphdef=graphdef, objective=options)
    tokens = float(jnp.sum(batch['loss_mask']))
    return float(loss_sum) / tokens, jax.tree.map(lambda g: np.asarray(g) / tokens, grads), metrics

  loss, grads, metrics = ours(coef, 0.0)
  print(f'{case}: loss {loss:.6f} vs {loss_theirs:.6f}, aux {float(metrics["router_aux_loss"]):.6f}'
        f' vs {aux_theirs:.6f}, z {float(metrics["router_z_loss"]):.6f} vs {z_theirs:.6f}')
  np.testing.assert_allclose(float(metrics['router_aux_loss']), aux_theirs, rtol=1e-5)
  np.testing.assert_allclose(loss, loss_theirs, rtol=1e-5)
  np.testing.assert_allclose(float(metrics['router_z_loss']), z_theirs, rtol=1e-5)
  assert aux_theirs > 1.0 + 1e-3  # unbalanced enough that the term is not constant
  for i, layer in enumerate(hf.model.layers):
    mlp = layer.mlp if hasattr(layer, 'mlp') else layer.block_sparse_moe
    theirs = {'router': mlp.gate.weight.grad.numpy().T,
              'q': layer.self_attn.q_proj.weight.grad.numpy().T}
    mine = {'router': grads['blocks']['mlp']['router'].get_value()[i],
            'q': grads['blocks']['attn']['q']['w'].get_value()[i].reshape(theirs['q'].shape)}
    for name in theirs:
      np.testing.assert_allclose(mine[name], theirs[name], atol=2e-5 * np.abs(theirs[name]).max(),
                                 err_msg=f'{case} layer {i} {name}')
  with_z = ours(coef, 0.3)[0]
  np.testing.assert_allclose(with_z - loss, 0.3 * float(metrics['router_z_loss']), rtol=1e-4)


def test_lora_on_a_shared_expert_merges_into_an_export_transformers_reads(tmp_path,
                                                                         hf_checkpoints):
  """Qwen2-MoE: 'all-linear' adapts the routed experts and the shared expert (not its sigmoid
  gate, nor the router); trained adapters merge into an export whose logits transformers
  reproduces."""
  from ftjax import lora

  folder, _ = hf_checkpoints('qwen2_moe')
  model = ftjax.load_pretrained(folder, dtype='float32')
  chosen = lora.apply(model, rank=4, alpha=8.0, targets='all-linear')
  assert {'blocks.mlp.shared.gate', 'blocks.mlp.shared.up', 'blocks.mlp.shared.down',
          'blocks.mlp.gate'} <= set(chosen)
  assert not any('router' in p or 'shared_gate' in p for p in chosen)
  key = jax.random.key(2)
  for node in lora.adapters(model).values():
    key, sub = jax.random.split(key)
    node.b.set_value(0.1 * jax.random.normal(sub, node.b.shape))
  tuned = np.asarray(model(jnp.asarray(TOKENS)))
  lora.merge(model)
  ftjax.save_pretrained(model, str(tmp_path / 'merged'), dtype='float32')
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'merged')).eval()
  np.testing.assert_allclose(hf_logits(back, TOKENS), tuned, atol=2e-5)


@pytest.mark.parametrize('kind', ['int8', pytest.param('int4', marks=pytest.mark.slow)])
def test_qlora_quantizes_the_experts_and_adapts_them(kind, hf_checkpoints):
  """`lora.quantize_base` turns the expert projections into integers with float32 block
  scales (the router stays float): logits stay close to the float model's, adapters on top
  change nothing at init and train in float32, and the merged weight is the dequantized one
  plus the adapter."""
  from flax import nnx

  from ftjax import lora, quantize

  folder, _ = hf_checkpoints('qwen3_moe')
  model = ftjax.load_pretrained(folder, dtype='float32')
  base = np.asarray(model(jnp.asarray(TOKENS)))
  done = quantize.apply(model, kind)
  assert {'blocks.mlp.gate', 'blocks.mlp.up', 'blocks.mlp.down', 'blocks.attn.q'} <= set(done)
  assert isinstance(model.blocks.mlp.gate, quantize.QuantizedGrouped)
  assert str(model.blocks.mlp.gate.q.get_value().dtype) == kind
  quantized = np.asarray(model(jnp.asarray(TOKENS)))
  error = np.mean(np.abs(quantized - base)) / np.mean(np.abs(base))
  print(f'{kind}: mean |logit change| / mean |logit| = {error:.4f}')
  # int4 rounds a Gaussian weight to 7 levels per sign: about 12% error per weight (measured
  # 0.11 here, int8 0.007); a changed top-k choice moves a token's logits further.
  assert 0 < error < {'int8': 0.02, 'int4': 0.2}[kind]
  lora.apply(model, rank=4, alpha=8.0, targets='all-linear')
  np.testing.assert_array_equal(np.asarray(model(jnp.asarray(TOKENS))), quantized)
  gate = model.blocks.mlp.gate
  assert isinstance(gate, lora.LoRAGrouped) and gate.a.get_value().dtype == jnp.float32
  gate.b.set_value(0.1 * jax.random.normal(jax.random.key(0), gate.b.shape))
  np.testing.assert_allclose(np.asarray(gate.merged_weight()),
                             np.asarray(gate.base.weight() + gate.delta()), rtol=1e-6)
  _, trainable, frozen = nnx.split(model, nnx.LoRAParam, ...)
  assert {str(x.dtype) for x in jax.tree.leaves(trainable)} == {'float32'}
  assert kind in {str(x.dtype) for x in jax.tree.leaves(frozen)}


MOE_ARCH = llama.Config(vocab_size=512, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                        head_dim=16, mlp_dim=128, rope_theta=10_000.0, num_experts=8,
                        num_experts_per_tok=2, moe_mlp_dim=32, norm_topk_prob=False)


def _moe_setup(shape, devices, lora_options=None):
  from test_sharding import OPTIM

  from ftjax import objectives

  # Both router losses weigh in, so their statistics (summed over every token) are checked too.
  return trainer_lib.setup(arch=MOE_ARCH, model_options={}, mesh_shape=shape,
                           rules_name='fsdp_tp', optim_kwargs=OPTIM, grad_accum=1, global_batch=8,
                           seed=0, devices=devices, lora_options=lora_options,
                           objective=objectives.Options(router_aux_loss_coef=0.1,
                                                        router_z_loss_coef=0.01))


def _logits(trainer, tokens):
  """The model's logits on `tokens` and the compiled forward pass's HLO text."""
  from flax import nnx

  args = trainer.state.params, trainer.frozen, jnp.asarray(tokens)
  with sharding.use(trainer.mesh, trainer.rules):
    forward = jax.jit(lambda p, f, t: nnx.merge(trainer.graphdef, p, f)(t)).lower(*args).compile()
    return np.asarray(forward(*args)), forward.as_text()


@pytest.mark.parametrize('shape,adapters', [((1, 2, 4, 1), None)] + [
    pytest.param(s, a, marks=pytest.mark.slow)
    for s, a in (((1, 2, 4, 1), 'lora'), ((1, 1, 8, 1), None), ((2, 1, 2, 2), None),
                 ((2, 1, 2, 2), 'lora'), ((1, 2, 4, 1), 'qlora'), ((1, 8, 1), None))])
def test_expert_parallel_step_equals_single_device(shape, adapters, addition_data):
  """On 8 devices, with the experts split over the `expert` mesh axis (with fsdp, alone, with
  data and tensor) or over fsdp only, fully, with LoRA on the experts or with QLoRA (int8
  experts): the same logits,
  gradients, loss and one AdamW step as on one device. With an expert axis the tokens travel
  by all-to-all and no device holds every expert."""
  from test_sharding import _batch, _grads_and_step, assert_same_step

  from ftjax import lora

  options = adapters and lora.Options(rank=4, alpha=8.0,
                                      quantize_base='int8' if adapters == 'qlora' else None)
  local = _batch(addition_data)
  single = _moe_setup((1, 1, 1), jax.devices()[:1], options)
  want = _logits(single, local['tokens'])[0]
  ref = _grads_and_step(single, local)  # (the steps donate the state: logits and HLO first)
  trainer = _moe_setup(shape, jax.devices(), options)
  experts = (trainer.frozen['blocks']['mlp']['gate']['base'] if adapters
             else trainer.state.params['blocks']['mlp']['gate'])
  held = experts['q' if adapters == 'qlora' else 'w'].get_value().addressable_shards[0].data.shape
  assert held[1] * held[2] < MOE_ARCH.num_experts * MOE_ARCH.embed_dim  # no device holds all
  logits, hlo = _logits(trainer, local['tokens'])
  np.testing.assert_allclose(logits, want, atol=1e-5)
  if len(shape) == 4:  # the tokens travel to the experts' devices
    assert 'all-to-all' in hlo
  got = _grads_and_step(trainer, local)
  assert got[2]['router_aux_loss'] == pytest.approx(ref[2]['router_aux_loss'], rel=1e-6)
  assert got[2]['router_z_loss'] == pytest.approx(ref[2]['router_z_loss'], rel=1e-6)
  assert_same_step(got, ref)


def test_lora_on_experts_trains_adapters_only_and_merges_exactly(tmp_path, hf_checkpoints,
                                                                  addition_data):
  """Per-expert adapters (stacked on the expert axis) and attention adapters: logits unchanged
  at init, equal to the base with adapters off, merged exactly into an HF export transformers
  reads; one training step on 8 devices (expert axis 4) moves adapters only, never the router;
  PEFT export is refused with the reason."""
  from test_sharding import OPTIM, _batch

  from ftjax import lora, peft_io

  folder, hf = hf_checkpoints('qwen3_moe')
  model = ftjax.load_pretrained(folder, dtype='float32')
  base = np.asarray(model(jnp.asarray(TOKENS)))
  chosen = lora.apply(model, rank=4, alpha=8.0, targets='all-linear')
  assert {'blocks.mlp.gate', 'blocks.mlp.up', 'blocks.mlp.down', 'blocks.attn.q'} <= set(chosen)
  expert_gate = model.blocks.mlp.gate
  assert isinstance(expert_gate, lora.LoRAGrouped) and expert_gate.a.shape == (2, 4, 64, 4)
  assert expert_gate.a.get_metadata()['out_sharding'] == ('layers', 'expert', 'embed', 'lora')
  np.testing.assert_array_equal(np.asarray(model(jnp.asarray(TOKENS))), base)
  key = jax.random.key(1)
  for node in lora.adapters(model).values():
    key, sub = jax.random.split(key)
    node.b.set_value(0.1 * jax.random.normal(sub, node.b.shape))
  tuned = np.asarray(model(jnp.asarray(TOKENS)))
  assert np.max(np.abs(tuned - base)) > 1e-2
  with lora.adapters_off():
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(TOKENS))), base, atol=1e-6)
  with pytest.raises(peft_io.PeftError, match='mixture-of-experts projections'):
    peft_io.save(model, str(tmp_path / 'peft'))
  lora.merge(model)
  ftjax.save_pretrained(model, str(tmp_path / 'merged'), dtype='float32')
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'merged')).eval()
  np.testing.assert_allclose(hf_logits(back, TOKENS), tuned, atol=2e-5)

  trainer = trainer_lib.setup(
      arch=MOE_ARCH, model_options={}, mesh_shape=(1, 2, 4, 1), rules_name='fsdp_tp',
      optim_kwargs=OPTIM, grad_accum=1, global_batch=8, seed=0,
      lora_options=lora.Options(rank=4, alpha=8.0))
  frozen_before = jax.device_get(trainer.frozen)
  params_before = jax.device_get(trainer.state.params)
  assert 'router' in frozen_before['blocks']['mlp']
  from ftjax import data

  batch = data.to_global(_batch(addition_data), trainer.batch_sharding)
  with sharding.use(trainer.mesh, trainer.rules):
    state, metrics = trainer.train_step(trainer.state, trainer.frozen, batch, trainer.ref)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(trainer.frozen), frozen_before)
  after = jax.device_get(state.params)
  moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), after, params_before)
  assert moved['blocks']['mlp']['gate']['b'].get_value()  # b starts at zero, so b moves first
  assert moved['blocks']['mlp']['down']['b'].get_value() and np.isfinite(float(metrics['loss']))


@pytest.mark.slow
def test_plan_fits_qwen3_30b_a3b_lora_on_v5p_16():
  """Measured with libtpu installed: 35.2 GB per device of 95 GiB (arguments 9.6 GB,
  temporaries 25.6 GB), 30.5B weights plus 0.84B adapters, compiled in 71 s on 2 cores."""
  import json
  import os

  from helpers import REPO, run_ftjax

  pytest.importorskip('libtpu', reason="libtpu is not installed (pip install -e '.[tpu]')")
  env = dict(os.environ, TPU_SKIP_MDS_QUERY='1', TPU_WORKER_HOSTNAMES='localhost',
             TPU_ACCELERATOR_TYPE='v5p-16')
  out = run_ftjax('plan', '--config', f'{REPO}/configs/qwen3_30b_a3b_lora.py', '--topology',
                  'v5p-16', devices=None, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  plan = json.loads(out.stdout.strip().splitlines()[-1])
  assert plan['fits'] and plan['mesh'] == {'data': 1, 'fsdp': 2, 'expert': 4, 'tensor': 1}
  assert 30e9 < plan['params'] - plan['trainable_params'] < 31e9
  assert plan['per_device_bytes']['total'] < plan['device_hbm_bytes']


@pytest.mark.parametrize('sizes', [None, [0, 290, 10, 0], [0, 0, 5, 0]],
                         ids=['random', 'skewed', 'one_group'])
def test_cpu_grouped_matmul_equals_ragged_dot_with_gradients(sizes):
  """The CPU tiled grouped matmul (and its own backward pass) equals `jax.lax.ragged_dot`,
  including empty groups, groups smaller than a tile, and every row in one group."""
  from ftjax.models import moe

  rng = np.random.default_rng(0)
  groups = np.asarray(sizes) if sizes else np.bincount(rng.integers(0, 8, 700), minlength=8)
  n, d, f = int(groups.sum()), 48, 40
  x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(len(groups), d, f)), jnp.float32)
  gs = jnp.asarray(groups, jnp.int32)

  def value_and_grads(matmul):
    return jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(jnp.sin(matmul(x, w, gs))),
                                      argnums=(0, 1)))(x, w)

  got, want = value_and_grads(moe._tiled), value_and_grads(jax.lax.ragged_dot)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4), got, want)


@pytest.mark.slow
def test_a_moe_run_logs_router_losses_and_its_step_compiles_once(small_config, tmp_path):
  """`ftjax train` of a small MoE on 8 devices with an expert axis, both router losses weighted:
  they are logged at every log step, the loss stays finite, and the grouped-matmul train step
  traced once for every batch (routings differ, shapes do not)."""
  from ftjax import train

  small_config.model.update(num_experts=4, num_experts_per_tok=2, moe_mlp_dim=32,
                            family='qwen3_moe', qk_norm=True)
  small_config.objective.update(router_aux_loss_coef=0.01, router_z_loss_coef=0.001)
  small_config.mesh.shape = (1, 2, 4, 1)
  summary = train.run(small_config, str(tmp_path))
  assert summary['train_step_compiles'] == 1 and np.isfinite(summary['final_loss'])
  with open(tmp_path / 'metrics.jsonl') as f:
    rows = [json.loads(line) for line in f][1:]
  assert [r['step'] for r in rows] == [2, 4, 6]
  for r in rows:
    # top-2 of 4 experts: E * sum_e f_e p_e is 2 when perfectly balanced, at most 2E.
    assert 0.5 < r['router_aux_loss'] < 8 and r['router_z_loss'] > 0
