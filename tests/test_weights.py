"""Hugging Face checkpoints in and out, proven by logits parity with `transformers`."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx
from helpers import CASES, COMMON, hf_logits, make_hf

import ftjax
from ftjax import lora, models, peft_io, sharding
from ftjax.errors import CheckpointError
from ftjax.hf import weights
from ftjax.models import llama


def greedy(step, tokens, n):
  for _ in range(n):
    nxt = np.argmax(step(tokens)[:, -1], axis=-1)
    tokens = np.concatenate([tokens, nxt[:, None]], axis=1)
  return tokens[:, -n:]


TOKENS = np.random.default_rng(0).integers(0, 160, size=(2, 40))


@pytest.mark.slow
@pytest.mark.parametrize('case', list(CASES))
def test_logits_and_greedy_tokens_match_transformers(case, hf_checkpoints):
  folder, hf = hf_checkpoints(case, max_shard_size='40KB')  # several shards + an index
  assert os.path.isfile(os.path.join(folder, weights.INDEX))
  model = ftjax.load_pretrained(folder, dtype='float32')
  got = np.asarray(model(jnp.asarray(TOKENS)))
  want = hf_logits(hf, TOKENS)
  diff = float(np.max(np.abs(got - want)))
  print(f'{case}: max |logit diff| = {diff:.2e}')
  assert diff <= 1e-4
  ours = greedy(lambda t: np.asarray(model(jnp.asarray(t))), TOKENS[:, :12], 6)
  theirs = greedy(lambda t: hf_logits(hf, t), TOKENS[:, :12], 6)
  np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize('case', ['llama3_mha_tied', 'llama_bias', 'qwen2', 'gemma2', 'gemma3'])
def test_export_round_trip_loads_in_transformers(case, tmp_path, hf_checkpoints):
  folder, hf = hf_checkpoints(case)
  model = ftjax.load_pretrained(folder, dtype='float32')
  ftjax.save_pretrained(model, str(tmp_path / 'out'), dtype='float32')
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'out'),
                                                           attn_implementation='eager').eval()
  np.testing.assert_allclose(hf_logits(back, TOKENS), hf_logits(hf, TOKENS), atol=1e-5)
  assert set(back.state_dict()) == set(hf.state_dict())


@pytest.mark.parametrize('path', [pytest.param('cpu_2d', marks=pytest.mark.slow), 'einsum'])
def test_llama_attention_bias_in_and_out(path, tmp_path, monkeypatch, hf_checkpoints):
  if path == 'einsum':  # the projections TPU and GPU run, instead of CPU's 2-D matmuls
    monkeypatch.setattr(sharding, 'platform', lambda: 'gpu')
  folder, hf = hf_checkpoints('llama_bias')
  model = ftjax.load_pretrained(folder, dtype='float32')
  assert model.cfg.qkv_bias and model.cfg.o_bias
  want = np.stack([hf.state_dict()[f'model.layers.{i}.self_attn.o_proj.bias'].numpy()
                   for i in range(2)])
  assert np.abs(want).min() > 0  # perturbed: HF's zero init would hide a dropped bias
  np.testing.assert_array_equal(np.asarray(model.blocks.attn.o_bias.get_value()), want)
  logits = np.asarray(model(jnp.asarray(TOKENS)))
  np.testing.assert_allclose(logits, hf_logits(hf, TOKENS), atol=1e-5)
  model.blocks.attn.o_bias.set_value(jnp.zeros_like(model.blocks.attn.o_bias.get_value()))
  assert np.max(np.abs(np.asarray(model(jnp.asarray(TOKENS))) - logits)) > 1e-2
  model.blocks.attn.o_bias.set_value(jnp.asarray(want))
  ftjax.save_pretrained(model, str(tmp_path / 'out'), dtype='float32')
  assert json.loads((tmp_path / 'out' / 'config.json').read_text())['attention_bias'] is True
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'out'),
                                                           attn_implementation='eager').eval()
  np.testing.assert_array_equal(back.state_dict()['model.layers.1.self_attn.o_proj.bias'],
                                hf.state_dict()['model.layers.1.self_attn.o_proj.bias'])
  np.testing.assert_allclose(hf_logits(back, TOKENS), logits, atol=1e-5)


@pytest.mark.parametrize('use_dora', [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=['lora', 'dora'])
def test_lora_on_biased_o_matches_peft_and_keeps_the_bias_frozen(use_dora, tmp_path):
  hf = make_hf('llama_bias', str(tmp_path / 'in'))
  adapter = peft.LoraConfig(r=4, lora_alpha=8, target_modules=['o_proj'], use_dora=use_dora,
                            init_lora_weights=False, task_type='CAUSAL_LM')
  torch.manual_seed(1)
  theirs = peft.get_peft_model(hf, adapter).eval()
  theirs.save_pretrained(str(tmp_path / 'adapter'))
  want = hf_logits(theirs, TOKENS)
  model = ftjax.load_pretrained(str(tmp_path / 'in'), dtype='float32')
  peft_io.load(model, str(tmp_path / 'adapter'))
  assert sorted(lora.adapters(model)) == ['attn.o']
  trainable = nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))
  assert not any('o_bias' in path for path, _ in trainable)
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(TOKENS))), want, atol=1e-5)
  lora.merge(model)
  ftjax.save_pretrained(model, str(tmp_path / 'merged'), dtype='float32')
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'merged'),
                                                           attn_implementation='eager').eval()
  np.testing.assert_allclose(hf_logits(back, TOKENS), want, atol=1e-5)


def test_biases_without_a_hugging_face_form_are_refused_on_export():
  cfg = models.config_from_hf(transformers.AutoConfig.for_model('llama', **COMMON).to_dict())
  for fields in (dict(qkv_bias=True), dict(o_bias=True), dict(family='qwen2', o_bias=True)):
    with pytest.raises(ValueError, match='no Hugging Face form'):
      llama.config_to_hf(dataclasses.replace(cfg, **fields), 'float32')
  qwen2 = models.config_from_hf(transformers.AutoConfig.for_model('qwen2', **COMMON).to_dict())
  assert qwen2.qkv_bias and not qwen2.o_bias
  assert 'attention_bias' not in llama.config_to_hf(qwen2, 'float32')


@pytest.mark.slow
def test_sharded_load_equals_single_device_load(hf_checkpoints):
  folder, _ = hf_checkpoints('gemma3')
  one = ftjax.load_pretrained(folder, mesh=sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
  eight = ftjax.load_pretrained(folder, mesh=sharding.make_mesh((1, 4, 2)))
  q = eight.blocks.attn.q.w.get_value()
  assert len(q.sharding.device_set) == 8 and not q.sharding.is_fully_replicated
  np.testing.assert_allclose(np.asarray(eight(jnp.asarray(TOKENS))),
                             np.asarray(one(jnp.asarray(TOKENS))), atol=1e-5)


def test_bf16_load_keeps_bf16_weights(hf_checkpoints):
  folder, _ = hf_checkpoints('llama')
  model = ftjax.load_pretrained(folder, dtype='bfloat16')
  assert model.embed.get_value().dtype == jnp.bfloat16
  assert model(jnp.asarray(TOKENS)).dtype == jnp.bfloat16


def test_unsupported_architecture_is_refused(tmp_path):
  make_hf('llama', str(tmp_path))
  config = json.loads((tmp_path / 'config.json').read_text())
  (tmp_path / 'config.json').write_text(json.dumps({**config, 'model_type': 'falcon'}))
  with pytest.raises(CheckpointError, match="model_type 'falcon' is not supported"):
    ftjax.load_pretrained(str(tmp_path))
  (tmp_path / 'config.json').write_text(json.dumps({**config, 'mlp_bias': True}))
  with pytest.raises(CheckpointError, match='mlp_bias=True is not supported'):
    ftjax.load_pretrained(str(tmp_path))
  rope = {'rope_type': 'yarn', 'factor': 4.0, 'rope_theta': 1e4}
  (tmp_path / 'config.json').write_text(json.dumps({**config, 'rope_parameters': rope}))
  with pytest.raises(CheckpointError, match="rope_type 'yarn' is not supported"):
    ftjax.load_pretrained(str(tmp_path))


def test_shape_mismatch_names_file_and_tensor(tmp_path):
  make_hf('llama', str(tmp_path))
  config = json.loads((tmp_path / 'config.json').read_text())
  (tmp_path / 'config.json').write_text(json.dumps({**config, 'intermediate_size': 128}))
  with pytest.raises(CheckpointError,
                     match=r"model.safetensors: tensor 'model.layers.0.mlp.\w+_proj.weight' has "
                           r'shape \(\d+, \d+\), but config.json implies'):
    ftjax.load_pretrained(str(tmp_path))


def test_truncated_and_missing_shards_name_the_file(tmp_path):
  make_hf('llama', str(tmp_path), max_shard_size='40KB')
  index = json.loads((tmp_path / weights.INDEX).read_text())
  files = sorted(set(index['weight_map'].values()))
  data = (tmp_path / files[-1]).read_bytes()
  (tmp_path / files[-1]).write_bytes(data[: len(data) // 2])
  with pytest.raises(CheckpointError, match=rf'{files[-1]}.*truncated'):
    ftjax.load_pretrained(str(tmp_path))
  (tmp_path / files[-1]).write_bytes(data)
  os.remove(tmp_path / files[0])
  with pytest.raises(CheckpointError, match=rf'{files[0]}: listed in .* but missing'):
    ftjax.load_pretrained(str(tmp_path))


def test_pickle_only_folder_is_refused(tmp_path):
  make_hf('llama', str(tmp_path))
  os.remove(tmp_path / 'model.safetensors')
  (tmp_path / 'pytorch_model.bin').write_bytes(b'not unpickled')
  with pytest.raises(CheckpointError, match='never unpickles.*convert them to safetensors'):
    ftjax.load_pretrained(str(tmp_path))


@pytest.mark.parametrize('case', list(CASES))
def test_config_json_round_trips(case):
  model_type, extra = CASES[case]
  hf_config = transformers.AutoConfig.for_model(model_type, **{**COMMON, **extra}).to_dict()
  cfg = models.config_from_hf(hf_config)
  assert models.config_from_hf(llama.config_to_hf(cfg, 'bfloat16')) == cfg
  # The keys of transformers 4.x (rope_theta, rope_scaling) say the same as rope_parameters.
  legacy = {k: v for k, v in llama.config_to_hf(cfg, 'bfloat16').items()
            if k != 'rope_parameters'}
  assert models.config_from_hf(legacy) == cfg
