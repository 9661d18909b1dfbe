"""Test setup: 8 fake CPU devices and strict numpy rank promotion, set before any backend starts."""

import json
import os

import jax
import pytest

jax.config.update('jax_num_cpu_devices', 8)
jax.config.update('jax_numpy_rank_promotion', 'raise')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_jsonl(path, records):
  with open(path, 'w') as f:
    for r in records:
      f.write(json.dumps(r) + '\n')
  return str(path)


@pytest.fixture(params=['cpu_2d', 'einsum'])
def projection(request, monkeypatch):
  """Runs a test through both projection paths: the CPU 2-D matmuls and the einsum TPU/GPU run."""
  from ftjax.models import layers

  monkeypatch.setattr(layers, 'CPU_2D_PROJECTION', request.param == 'cpu_2d')
  return request.param


@pytest.fixture
def addition_data(tmp_path):
  """A small prompt/completion task: train and held-out files."""
  train = [{'prompt': f'{a}+{b}=', 'completion': str(a + b)} for a in range(8) for b in range(8)]
  held_out = [{'prompt': f'{a}+{b}=', 'completion': str(a + b)} for a, b in [(9, 9), (8, 9)]]
  return (write_jsonl(tmp_path / 'train.jsonl', train),
          write_jsonl(tmp_path / 'eval.jsonl', held_out))


@pytest.fixture
def small_config(addition_data):
  """The base config shrunk to a fast tiny model on the addition task."""
  from configs import base

  c = base.get_config()
  c.model.update(vocab_size=259, embed_dim=32, mlp_dim=64, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=8)
  c.data.update(path=addition_data[0], eval_path=addition_data[1], seq_len=16,
                global_batch=8)
  c.optim.update(lr=3e-3, warmup_steps=2)
  c.train.update(steps=6, log_every=2, progress=False)
  c.eval.update(every_steps=0)
  return c


@pytest.fixture
def hf_folder(tmp_path, addition_data):
  """A tiny random Qwen3 checkpoint with a BPE tokenizer trained on the addition task."""
  from test_pretrained_run import add_bpe_tokenizer
  from test_weights import make_hf

  folder = str(tmp_path / 'base')
  make_hf('qwen3', folder, vocab_size=320)
  with open(addition_data[0]) as f:
    add_bpe_tokenizer(folder, f.readlines() * 4)
  return folder
