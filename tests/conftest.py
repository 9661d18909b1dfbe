"""Test setup: 8 fake CPU devices, strict numpy rank promotion and a compilation cache, set before
any backend starts; the fixtures several test modules share.

The compilation cache: XLA compiles are most of this suite's time on CPU, and many tests (and
the `ftjax` subprocesses they start, which inherit the environment set here) compile the same
programs. One directory per pytest session holds every compiled program, however small. Set
JAX_COMPILATION_CACHE_DIR yourself to keep the cache between sessions (it is then not removed),
or FTJAX_TEST_COMPILE_CACHE=0 to run without one. Under pytest-xdist (`-n auto`) the controller
process makes the directory and its workers inherit it, so they share one cache.
"""

import atexit
import os
import shutil
import tempfile

if os.environ.get('FTJAX_TEST_COMPILE_CACHE', '1') != '0':
  if not os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='ftjax-test-xla-cache-')
    atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

# The measured matmul peak (ftjax.throughput.peak): cached per session, never in the user's home.
if not os.environ.get('FTJAX_CACHE_DIR'):
  os.environ['FTJAX_CACHE_DIR'] = tempfile.mkdtemp(prefix='ftjax-test-cache-')
  atexit.register(shutil.rmtree, os.environ['FTJAX_CACHE_DIR'], ignore_errors=True)

import jax  # noqa: E402  (after the cache settings, which jax reads when imported)
import pytest  # noqa: E402
from helpers import (  # noqa: E402, F401
  REPO,
  add_bos_post_processor,
  add_bpe_tokenizer,
  digest,
  make_hf,
  make_policy_adapter,
  write_jsonl,
)

jax.config.update('jax_num_cpu_devices', 8)
jax.config.update('jax_numpy_rank_promotion', 'raise')
if os.environ.get('JAX_COMPILATION_CACHE_DIR'):  # also when a plugin imported jax before us
  jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
  jax.config.update('jax_persistent_cache_min_compile_time_secs',
                    float(os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS']))
  jax.config.update('jax_persistent_cache_min_entry_size_bytes',
                    int(os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES']))

ADDITION_TRAIN = [{'prompt': f'{a}+{b}=', 'completion': str(a + b)}
                  for a in range(8) for b in range(8)]
ADDITION_HELD_OUT = [{'prompt': f'{a}+{b}=', 'completion': str(a + b)} for a, b in [(9, 9), (8, 9)]]


@pytest.fixture(params=['cpu_2d', 'einsum'])
def projection(request, monkeypatch):
  """Runs a test through both projection paths: the CPU 2-D matmuls and the einsum TPU/GPU run."""
  from ftjax.models import layers

  monkeypatch.setattr(layers, 'CPU_2D_PROJECTION', request.param == 'cpu_2d')
  return request.param


@pytest.fixture
def addition_data(tmp_path):
  """A small prompt/completion task: train and held-out files."""
  return (write_jsonl(tmp_path / 'train.jsonl', ADDITION_TRAIN),
          write_jsonl(tmp_path / 'eval.jsonl', ADDITION_HELD_OUT))


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


@pytest.fixture(scope='session')
def _hf_folder(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp('hf') / 'base')
  make_hf('qwen3', folder, vocab_size=320)
  add_bpe_tokenizer(folder, [f'{r["prompt"]}{r["completion"]}\n' for r in ADDITION_TRAIN] * 4)
  return folder, digest(folder)


@pytest.fixture
def hf_folder(_hf_folder):
  """A tiny random Qwen3 checkpoint with a BPE tokenizer trained on the addition task.

  Built once per session and shared: tests read it and never write into it (copy it first);
  each test checks afterwards that the folder is as it was."""
  folder, files = _hf_folder
  yield folder
  assert digest(folder) == files, f'the test changed the shared {folder}: copy it first'


@pytest.fixture(scope='session')
def hf_checkpoints(tmp_path_factory):
  """make_hf(case, folder, max_shard_size) once per session for each (case, max_shard_size):
  `hf_checkpoints(case, max_shard_size='5GB')` gives (folder, transformers model). Read-only:
  tests that change the folder or the model make their own with make_hf."""
  made = {}

  def get(case, max_shard_size='5GB'):
    if (case, max_shard_size) not in made:
      folder = str(tmp_path_factory.mktemp(f'hf_{case}'))
      model = make_hf(case, folder, max_shard_size=max_shard_size)
      made[case, max_shard_size] = folder, model, digest(folder)
    folder, model, _ = made[case, max_shard_size]
    return folder, model

  yield get
  for folder, _, files in made.values():
    assert digest(folder) == files, f'a test changed the shared {folder}'


@pytest.fixture(scope='session')
def bos_folder(tmp_path_factory, _hf_folder):
  """The shared tiny checkpoint with a tokenizer that adds BOS as Llama's does, so TRL (which
  tokenizes with the tokenizer's special tokens) and ftjax (which prepends BOS) agree."""
  folder = str(tmp_path_factory.mktemp('bos') / 'base')
  shutil.copytree(_hf_folder[0], folder)
  add_bos_post_processor(folder)
  return folder


@pytest.fixture(scope='session')
def policy_adapter(tmp_path_factory, bos_folder):
  """A PEFT adapter with random A and B: the policy differs from the adapter-free base."""
  return make_policy_adapter(bos_folder, str(tmp_path_factory.mktemp('policy')))
