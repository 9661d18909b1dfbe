"""Fine-tuning from a Hugging Face folder and exporting back; host memory of a sharded load."""

import json
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from helpers import hf_logits, make_hf, run_command, run_ftjax
from safetensors.numpy import load_file

import ftjax
import ftjax.export
from ftjax import config as config_lib
from ftjax import train


def _run(config, hf_folder, workdir, *, lr):
  config.model.update(**{k: None for k in ('vocab_size', 'embed_dim', 'mlp_dim', 'num_layers',
                                           'num_heads', 'num_kv_heads', 'head_dim')})
  config.model.pretrained = hf_folder
  config.data.tokenizer = ''
  config.optim.update(lr=lr, warmup_steps=0, schedule='constant', weight_decay=0.0)
  config.train.update(steps=3, log_every=1)
  return train.run(config, str(workdir))


def test_zero_lr_run_exports_the_original_weights_bit_exactly(small_config, hf_folder, tmp_path):
  _run(small_config, hf_folder, tmp_path / 'run', lr=0.0)
  ftjax.export.export(str(tmp_path / 'run'), str(tmp_path / 'out'), dtype='float32')
  before, after = load_file(f'{hf_folder}/model.safetensors'), load_file(
      tmp_path / 'out' / 'model.safetensors')
  assert set(before) == set(after)
  for name in before:
    np.testing.assert_array_equal(after[name], before[name], err_msg=name)
  # The tokenizer files travel with the weights.
  tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / 'out'))
  assert tok.eos_token == '</s>' and tok('12+7=').input_ids == ftjax.load_tokenizer(
      hf_folder).encode('12+7=')


@pytest.mark.slow
def test_fine_tuned_export_loads_in_transformers(small_config, hf_folder, tmp_path):
  summary = _run(small_config, hf_folder, tmp_path / 'run', lr=1e-2)
  assert summary['final_loss'] is not None
  result = run_ftjax('export', f'--workdir={tmp_path / "run"}', f'--out={tmp_path / "out"}',
                     '--dtype=float32')
  assert result.returncode == 0, result.stderr[-2000:]
  tokens = np.random.default_rng(0).integers(0, 320, size=(2, 24))
  theirs = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path / 'out'), attn_implementation='eager').eval()
  ours = ftjax.load_pretrained(str(tmp_path / 'out'))
  np.testing.assert_allclose(np.asarray(ours(jnp.asarray(tokens))), hf_logits(theirs, tokens),
                             atol=1e-4)
  original = transformers.AutoModelForCausalLM.from_pretrained(hf_folder).eval()
  assert np.max(np.abs(hf_logits(original, tokens) - hf_logits(theirs, tokens))) > 1e-3


def test_pretrained_rejects_architecture_overrides(small_config, hf_folder):
  small_config.model.pretrained = hf_folder
  with pytest.raises(config_lib.ConfigError, match='cannot be overridden when model.pretrained'):
    config_lib.resolve(small_config)


MEMORY_PROBE = r'''
import json, os, sys, threading, time
import jax
jax.config.update('jax_num_cpu_devices', 8)
import ftjax, jax.numpy as jnp
from ftjax import sharding

def rss():  # resident bytes now (ru_maxrss would keep the peak of the imports)
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')

mesh = sharding.make_mesh((1, 8, 1))
jax.block_until_ready(jnp.ones(8))
before, peak, done = rss(), [0], threading.Event()
def sample():
  while not done.is_set():
    peak[0] = max(peak[0], rss())
    time.sleep(0.002)
thread = threading.Thread(target=sample)
thread.start()
model = ftjax.load_pretrained(sys.argv[1], mesh=mesh)
jax.block_until_ready(jax.tree.leaves(ftjax.hf.pretrained.nnx.state(model)))
done.set()
thread.join()
print(json.dumps(dict(before=before, peak=max(peak[0], rss()))))
'''


def test_sharded_load_peak_host_memory(tmp_path):
  # ~100 MB of float32 weights, loaded onto 8 devices.
  make_hf('llama', str(tmp_path), hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
          num_attention_heads=8, num_key_value_heads=4, head_dim=64, vocab_size=8000)
  size = os.path.getsize(tmp_path / 'model.safetensors')
  # XLA_FLAGS left alone: the probe asks for 8 devices itself.
  result = run_command([sys.executable, '-c', MEMORY_PROBE, tmp_path], devices=None, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  rss = json.loads(result.stdout.strip().splitlines()[-1])
  growth = rss['peak'] - rss['before']
  print(f'checkpoint {size / 2**20:.0f} MiB; peak host memory growth during an 8-device load '
        f'{growth / 2**20:.0f} MiB ({growth / size:.2f}x the checkpoint)')
  # On CPU the 8 "devices" live in host memory too: 1x for the sharded arrays, up to 1x of
  # memory-mapped (reclaimable) file pages, and a few transient single-tensor copies.
  assert growth < 2.5 * size < 8 * size
