"""KV-cache generation equals full recomputation and `transformers`; one compile per bucket."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from helpers import CASES, run_command

import ftjax
from ftjax import generation, sharding
from ftjax.models import llama

PROMPTS = np.random.default_rng(1).integers(3, 160, size=(2, 11))
NEW = 12  # with 11 prompt tokens this crosses the window of 8 of mistral and gemma 2/3


def recompute_greedy(model, tokens, n):
  """Greedy tokens by running the full forward over the whole sequence for each new token.

  The sequence lives in a fixed-length buffer (causal attention ignores what follows the
  current position), so the forward compiles once.
  """
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))
  batch, length = tokens.shape
  buffer = np.zeros((batch, length + n), np.int32)
  buffer[:, :length] = tokens
  for i in range(length, length + n):
    buffer[:, i] = np.argmax(np.asarray(forward(state, jnp.asarray(buffer)))[:, i - 1], axis=-1)
  return buffer[:, length:]


def hf_greedy(hf, tokens, n, mask=None):
  hf.generation_config.eos_token_id = None  # no early stop: compare all n tokens
  hf.generation_config.pad_token_id = 0
  ids = torch.tensor(np.asarray(tokens))
  mask = torch.ones_like(ids) if mask is None else torch.tensor(np.asarray(mask))
  with torch.no_grad():
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False)
  return out[:, ids.shape[1]:].numpy()


@pytest.mark.parametrize('case', [c if c == 'llama_bias' else
                                  pytest.param(c, marks=pytest.mark.slow) for c in CASES])
def test_cached_greedy_equals_recompute_and_transformers(case, hf_checkpoints):
  folder, hf = hf_checkpoints(case)
  model = ftjax.load_pretrained(folder, dtype='float32')
  got = np.asarray(ftjax.generate(model, PROMPTS, max_new_tokens=NEW))
  assert got.shape == (2, NEW)
  np.testing.assert_array_equal(got, recompute_greedy(model, PROMPTS, NEW))
  np.testing.assert_array_equal(got, hf_greedy(hf, PROMPTS, NEW))


@pytest.mark.slow
@pytest.mark.parametrize('case', ['llama', 'gemma2'])
def test_padded_batches_match_transformers_and_unpadded_rows(case, hf_checkpoints):
  folder, hf = hf_checkpoints(case)
  model = ftjax.load_pretrained(folder, dtype='float32')
  lengths = [11, 6]
  left = np.zeros((2, 11), np.int64)
  left_mask = np.zeros_like(left)
  right, right_mask = left.copy(), left_mask.copy()
  for row, n in enumerate(lengths):
    left[row, 11 - n:], left_mask[row, 11 - n:] = PROMPTS[row, :n], 1
    right[row, :n], right_mask[row, :n] = PROMPTS[row, :n], 1
  from_left = np.asarray(ftjax.generate(model, left, max_new_tokens=NEW, prompt_mask=left_mask))
  from_right = np.asarray(ftjax.generate(model, right, max_new_tokens=NEW,
                                         prompt_mask=right_mask))
  np.testing.assert_array_equal(from_left, from_right)
  for row, n in enumerate(lengths):
    alone = np.asarray(ftjax.generate(model, PROMPTS[row:row + 1, :n], max_new_tokens=NEW))
    np.testing.assert_array_equal(from_left[row:row + 1], alone)
  np.testing.assert_array_equal(from_left, hf_greedy(hf, left, NEW, left_mask))


def tiny_model():
  cfg = llama.PRESETS['tiny']
  return llama.Llama(cfg, rngs=nnx.Rngs(0))


@pytest.mark.slow
def test_decode_loop_compiles_once_per_bucket():
  model = tiny_model()
  before = len(generation.DECODE_TRACES)
  for length in (3, 9, 16):  # all in the 16-token bucket
    ftjax.generate(model, PROMPTS[:, :length], max_new_tokens=5)
  assert len(generation.DECODE_TRACES) == before + 1
  ftjax.generate(model, PROMPTS[:, :5], max_new_tokens=5, temperature=0.7, seed=3)
  ftjax.generate(model, PROMPTS[:, :5], max_new_tokens=5, temperature=0.7, seed=4)
  assert len(generation.DECODE_TRACES) == before + 2  # the seed is not baked in
  assert generation.bucket(17) == 32 and generation.bucket(1) == generation.MIN_BUCKET


@pytest.mark.slow
def test_eos_pads_the_rest_of_a_row():
  model = tiny_model()
  greedy = np.asarray(ftjax.generate(model, PROMPTS, max_new_tokens=8))
  eos = int(greedy[0, 2])
  out = np.asarray(ftjax.generate(model, PROMPTS, max_new_tokens=8, eos_id=eos, pad_id=-1))
  for row in range(2):
    stop = next((i for i, t in enumerate(greedy[row]) if t == eos), None)
    if stop is None:
      np.testing.assert_array_equal(out[row], greedy[row])
    else:
      np.testing.assert_array_equal(out[row, :stop + 1], greedy[row, :stop + 1])
      assert (out[row, stop + 1:] == -1).all()
  assert stop is not None or eos in greedy[0]


@pytest.mark.slow
def test_sampling_is_seeded_and_filters_reduce_to_greedy():
  model = tiny_model()
  greedy = np.asarray(ftjax.generate(model, PROMPTS, max_new_tokens=6))
  a = np.asarray(ftjax.generate(model, PROMPTS, max_new_tokens=6, temperature=1.0, seed=1))
  b = np.asarray(ftjax.generate(model, PROMPTS, max_new_tokens=6, temperature=1.0, seed=1))
  c = np.asarray(ftjax.generate(model, PROMPTS, max_new_tokens=6, temperature=1.0, seed=2))
  np.testing.assert_array_equal(a, b)
  assert (a != c).any()
  for kw in (dict(top_k=1), dict(top_p=1e-6)):
    out = ftjax.generate(model, PROMPTS, max_new_tokens=6, temperature=1.0, seed=5, **kw)
    np.testing.assert_array_equal(np.asarray(out), greedy)


@pytest.mark.slow
def test_sharded_generation_equals_single_device(hf_checkpoints):
  folder, _ = hf_checkpoints('qwen3')
  one = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  eight = sharding.make_mesh((2, 2, 2))
  rules = sharding.get_rules('fsdp_tp')
  single = ftjax.load_pretrained(folder, dtype='float32', mesh=one)
  sharded = ftjax.load_pretrained(folder, dtype='float32', mesh=eight)
  assert len(sharded.blocks.mlp.gate.w.get_value().sharding.device_set) == 8
  prompts = np.concatenate([PROMPTS, PROMPTS[:, ::-1]])
  want = np.asarray(ftjax.generate(single, prompts, max_new_tokens=NEW, mesh=one, rules=rules))
  # 3 rows on 2 batch shards: the batch is padded with filler rows and cut back.
  got = np.asarray(ftjax.generate(sharded, prompts[:3], max_new_tokens=NEW, mesh=eight,
                                  rules=rules))
  np.testing.assert_array_equal(got, want[:3])


@pytest.mark.slow
def test_generation_through_a_peft_adapter_equals_the_merged_model(hf_folder, tmp_path):
  from ftjax import lora, peft_io, trained

  base, *_ = trained.for_generation(pretrained_path=hf_folder, dtype=jnp.float32)
  lora.apply(base, rank=4, alpha=8.0, targets='all-linear')
  for i, node in enumerate(lora.adapters(base).values()):  # b starts at zero: make it count
    b = node.b.get_value()
    node.b.set_value(0.3 * jax.random.normal(jax.random.key(i), b.shape, b.dtype))
  peft_io.save(base, str(tmp_path / 'adapter'), base_model=hf_folder)
  model, _, mesh, rules = trained.for_generation(pretrained_path=hf_folder,
                                               adapter=str(tmp_path / 'adapter'),
                                               dtype=jnp.float32)
  assert lora.adapters(model)
  plain, *_ = trained.for_generation(pretrained_path=hf_folder, dtype=jnp.float32)
  prompts = PROMPTS[:, :6] % 200
  with_adapter = np.asarray(ftjax.generate(model, prompts, max_new_tokens=NEW, mesh=mesh,
                                           rules=rules))
  assert (with_adapter != np.asarray(ftjax.generate(plain, prompts, max_new_tokens=NEW))).any()
  lora.merge(model)
  merged = np.asarray(ftjax.generate(model, prompts, max_new_tokens=NEW, mesh=mesh, rules=rules))
  np.testing.assert_array_equal(with_adapter, merged)


@pytest.mark.slow
def test_decode_benchmark_script_reports_throughput():
  out = run_command([sys.executable, 'benchmarks/decode.py', 'demo'], devices=1)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{')]
  assert rows[0]['params'] == 509_312 and [r['batch'] for r in rows[1:]] == [1, 64]
  assert all(r['decode_tokens_per_s'] > 0 for r in rows[1:])
