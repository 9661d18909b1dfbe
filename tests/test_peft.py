"""LoRA adapters to and from Hugging Face PEFT, checked against PyTorch."""

import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from helpers import hf_logits

import ftjax
import ftjax.export
from ftjax import lora, peft_io, train

TOKENS = np.random.default_rng(0).integers(0, 320, size=(2, 24))


def _lora_run(config, hf_folder, workdir, **lora_settings):
  config.model.update(**{k: None for k in ('vocab_size', 'embed_dim', 'mlp_dim', 'num_layers',
                                           'num_heads', 'num_kv_heads', 'head_dim')})
  config.model.pretrained = hf_folder
  config.data.tokenizer = ''
  config.lora.update(rank=4, alpha=8.0, **lora_settings)
  config.optim.update(lr=3e-2, warmup_steps=0, schedule='constant')
  config.train.update(steps=4, log_every=1)
  return train.run(config, str(workdir))


@pytest.mark.slow
@pytest.mark.parametrize('settings', [{}, dict(use_rslora=True), dict(use_dora=True)],
                         ids=['lora', 'rslora', 'dora'])
def test_exported_adapter_loads_in_peft_with_the_same_logits(small_config, hf_folder, tmp_path,
                                                             settings):
  _lora_run(small_config, hf_folder, tmp_path / 'run', **settings)
  ftjax.export.export(str(tmp_path / 'run'), str(tmp_path / 'adapter'), fmt='peft')
  ftjax.export.export(str(tmp_path / 'run'), str(tmp_path / 'merged'), fmt='hf', dtype='float32')
  base = transformers.AutoModelForCausalLM.from_pretrained(hf_folder,
                                                           attn_implementation='eager')
  with torch.no_grad():
    before = hf_logits(base, TOKENS)
  theirs = peft.PeftModel.from_pretrained(base, str(tmp_path / 'adapter')).eval()
  with torch.no_grad():
    peft_logits = theirs(torch.tensor(TOKENS)).logits.float().numpy()
  merged = ftjax.load_pretrained(str(tmp_path / 'merged'))
  ours = np.asarray(merged(jnp.asarray(TOKENS)))
  assert np.max(np.abs(peft_logits - before)) > 1e-3  # the adapter does something
  np.testing.assert_allclose(ours, peft_logits, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize('use_dora', [False, True], ids=['lora', 'dora'])
def test_peft_adapter_loads_into_ftjax_with_the_same_logits(hf_folder, tmp_path, use_dora):
  base = transformers.AutoModelForCausalLM.from_pretrained(hf_folder,
                                                           attn_implementation='eager')
  config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=['q_proj', 'v_proj', 'down_proj'],
                           init_lora_weights=False, use_dora=use_dora, task_type='CAUSAL_LM')
  torch.manual_seed(0)
  theirs = peft.get_peft_model(base, config).eval()
  theirs.save_pretrained(str(tmp_path / 'adapter'))
  with torch.no_grad():
    want = theirs(torch.tensor(TOKENS)).logits.float().numpy()
  model = ftjax.load_pretrained(hf_folder)
  peft_io.load(model, str(tmp_path / 'adapter'))
  assert sorted(lora.adapters(model)) == ['attn.q', 'attn.v', 'mlp.down']
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(TOKENS))), want, atol=1e-4)


@pytest.mark.slow
def test_training_continues_from_a_peft_adapter(small_config, hf_folder, tmp_path):
  base = transformers.AutoModelForCausalLM.from_pretrained(hf_folder)
  config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=['q_proj', 'v_proj'],
                           init_lora_weights=False, task_type='CAUSAL_LM')
  peft.get_peft_model(base, config).save_pretrained(str(tmp_path / 'adapter'))
  small_config.lora.adapter = str(tmp_path / 'adapter')
  summary = _lora_run(small_config, hf_folder, tmp_path / 'run')
  assert np.isfinite(summary['final_loss'])
  ftjax.export.export(str(tmp_path / 'run'), str(tmp_path / 'out'), fmt='peft')
  assert peft.PeftConfig.from_pretrained(str(tmp_path / 'out')).target_modules == {'q_proj',
                                                                                   'v_proj'}
