"""The benchmark scripts under benchmarks/ run (small, fast cases)."""

import json
import os
import sys

import pytest
from helpers import REPO, run_command, run_ftjax


@pytest.mark.slow
def test_compare_torch_runs_the_same_model_in_both():
  out = run_command([sys.executable, 'benchmarks/compare_torch.py', '--layers', '1', '--vocab',
                     '512', '--seq-len', '32', '--batch', '2', '--steps', '1', '--warmup', '1'],
                    devices=None)
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.loads(out.stdout.strip().splitlines()[-1])
  for mode in ('full', 'lora'):
    r = summary[mode]
    assert r['ftjax_params'] == r['torch_params']  # the same architecture on both sides
    assert r['ftjax_tokens_per_s'] > 0 and r['torch_tokens_per_s'] > 0
    assert r['ratio'] == r['ftjax_tokens_per_s'] / r['torch_tokens_per_s']
  assert 'ratio ftjax / torch' in out.stdout


@pytest.mark.slow
def test_moe_vs_dense_benchmark_times_both_with_equal_active_parameters():
  from ftjax import config as config_lib
  from ftjax import throughput

  sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
  import moe_vs_dense

  args = type('Args', (), dict(seq_len=32, batch=2))
  archs = [config_lib.model_config(moe_vs_dense.config(args, moe=m, layers=2).model)
           for m in (False, True)]
  dense, moe = (throughput.matmul_params(a) for a in archs)
  assert moe - dense == 2 * archs[1].embed_dim * archs[1].num_experts  # only the routers differ
  out = run_command([sys.executable, 'benchmarks/moe_vs_dense.py', '--layers', '1', '--seq_len',
                     '32', '--batch', '2', '--steps', '1', '--rounds', '1', '--compile_layers',
                     '1', '2'], devices=None)
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.loads(out.stdout.strip().splitlines()[-1])
  assert summary['moe_tokens_per_s'] > 0 and summary['dense_tokens_per_s'] > 0
  assert summary['moe_vs_dense'] == summary['moe_tokens_per_s'] / summary['dense_tokens_per_s']
  assert set(summary['moe_compile_s']) == {'1', '2'}


def test_gpu_suite_dry_run_prints_every_command_and_its_configs_resolve(monkeypatch):
  """`benchmarks/gpu.sh --dry-run` runs nothing and prints each step: the CUDA install, the GPU
  tests, and the three benchmarks, whose configs and overrides resolve as `ftjax bench` would
  read them (the 8B shape fully and with LoRA r16, the 1B shape)."""
  import shlex

  from absl import flags

  from ftjax import cli
  from ftjax import config as config_lib
  from ftjax import main as main_lib

  results = os.path.join(REPO, 'benchmarks', 'results')
  before = sorted(os.listdir(results)) if os.path.isdir(results) else []
  out = run_command(['bash', 'benchmarks/gpu.sh', '--dry-run'], devices=None)
  assert out.returncode == 0, out.stderr[-3000:]
  assert (sorted(os.listdir(results)) if os.path.isdir(results) else []) == before  # ran nothing
  commands = [shlex.split(line[2:]) for line in out.stdout.splitlines() if line.startswith('+ ')]
  assert any('.[test,cuda]' in c for c in commands)
  assert any(c[:3] == ['python', '-m', 'pytest'] and '-m' in c[3:] and 'gpu' in c for c in commands)
  benches = [c for c in commands if c[:2] == ['ftjax', 'bench']]
  shapes = []
  for command in benches:
    fv, argv = flags.FlagValues(), ['ftjax bench', *command[2:]]
    main_lib._bench_flags(fv)
    monkeypatch.setattr(sys, 'argv', argv)  # ml_collections reads overrides from sys.argv
    cli.parse(fv, argv)
    resolved = config_lib.resolve(fv.config, check_files=False)
    arch = resolved.model.arch
    shapes.append((arch.num_layers, arch.embed_dim, resolved.lora.rank if resolved.lora else 0,
                   resolved.model.dtype, resolved.model.remat))
  assert shapes == [(32, 4096, 0, 'bfloat16', 'full'), (32, 4096, 16, 'bfloat16', 'full'),
                    (16, 2048, 0, 'bfloat16', 'full')]


@pytest.mark.slow
def test_gpu_summary_reads_a_real_bench_result(tmp_path):
  out = run_ftjax('bench', '--config', 'configs/demo.py', '--steps', '2')
  assert out.returncode == 0, out.stderr[-3000:]
  (tmp_path / 'bench_demo.txt').write_text(out.stdout)
  summary = run_command([sys.executable, 'benchmarks/gpu_summary.py', str(tmp_path)],
                        devices=None)
  assert summary.returncode == 0, summary.stderr[-3000:]
  rows = json.loads((tmp_path / 'summary.json').read_text())
  bench_result = json.loads(out.stdout.strip().splitlines()[-1])
  assert rows['demo']['tokens_per_s'] == bench_result['tokens_per_s']
  assert 'tokens/s' in summary.stdout and 'MFU' in summary.stdout


@pytest.mark.slow
def test_lora_vs_full_benchmark_times_both():
  out = run_command([sys.executable, 'benchmarks/lora_vs_full.py', '--seq_len', '32', '--batch',
                     '2', '--steps', '1', '--rounds', '1', '--set', 'model.num_layers=1'],
                    devices=None)
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.loads(out.stdout.strip().splitlines()[-1])
  assert summary['lora_vs_full'] == [summary['lora_tokens_per_s'] / summary['full_tokens_per_s']]
  assert summary['full_mfu'][0] > 0 and summary['peak_gflops'] > 0
  assert summary['overrides'] == ['model.num_layers=1']
  assert 'round 1:' in out.stdout and 'LoRA/full' in out.stdout


@pytest.mark.slow
def test_plain_loop_benchmark_times_both_steps():
  out = run_command([sys.executable, 'benchmarks/plain_loop.py', '--seq_len', '32', '--batch',
                     '1', '--steps', '1'], devices=None)
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.loads(out.stdout.strip().splitlines()[-1])
  assert summary['ftjax_vs_plain'] == pytest.approx(
      summary['ftjax_tokens_per_s'] / summary['plain_tokens_per_s'])
  assert summary['ftjax_fraction_of_peak'] > 0 and summary['plain_fraction_of_peak'] > 0
  assert summary['shape']['num_layers'] == 8 and summary['shape']['seq_len'] == 32


def _plain_loop():
  sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
  import plain_loop

  return plain_loop


def test_plain_reference_loop_computes_the_same_loss_and_gradients_as_ftjax():
  """benchmarks/plain_loop.py is a fair reference only if it is the same model: with ftjax's
  weights copied in, its loss and its gradients equal ftjax's (a Llama with grouped-query
  attention, rope, RMSNorm, SwiGLU, untied head)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from ftjax import losses, models

  plain_loop = _plain_loop()
  shape = dict(vocab_size=256, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
               head_dim=16, mlp_dim=128, rope_theta=10_000.0)
  model = models.create(models.config_from_preset('tiny', shape), seed=3)
  graphdef, state = nnx.split(model)

  def to_plain(s):
    b = s['blocks']
    layer = lambda i: dict(  # noqa: E731
        attn_norm=b['attn_norm']['scale'][i], q=b['attn']['q']['w'][i].reshape(64, -1),
        k=b['attn']['k']['w'][i].reshape(64, -1), v=b['attn']['v']['w'][i].reshape(64, -1),
        o=b['attn']['o']['w'][i].reshape(-1, 64), mlp_norm=b['mlp_norm']['scale'][i],
        gate=b['mlp']['gate']['w'][i], up=b['mlp']['up']['w'][i], down=b['mlp']['down']['w'][i])
    return dict(embed=s['embed'], layers=[layer(i) for i in range(2)],
                final_norm=s['final_norm']['scale'], lm_head=s['lm_head']['w'])

  pure = nnx.to_pure_dict(state)
  rng = np.random.default_rng(0)
  for norm in ('attn_norm', 'mlp_norm'):  # scales away from one: a mix-up would show
    pure['blocks'][norm]['scale'] = jnp.asarray(rng.uniform(0.5, 1.5, (2, 64)), jnp.float32)
  tokens = jnp.asarray(rng.integers(0, 256, (2, 33)), jnp.int32)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]

  def ftjax_loss(pure):
    s = jax.tree.map(lambda x: x, state)
    nnx.replace_by_pure_dict(s, pure)
    sums = losses.next_token_xent(nnx.merge(graphdef, s)(inputs), targets, jnp.ones_like(inputs))
    return sums['loss_sum'] / sums['tokens']

  ours, our_grads = jax.value_and_grad(ftjax_loss)(pure)
  theirs, their_grads = jax.value_and_grad(
      lambda p: plain_loop.loss_fn(to_plain(p), inputs, targets, shape))(pure)
  assert abs(float(ours) - float(theirs)) < 1e-5, (ours, theirs)
  for a, b in zip(jax.tree.leaves(our_grads), jax.tree.leaves(their_grads), strict=True):
    scale = float(jnp.max(jnp.abs(a)))
    np.testing.assert_allclose(a, b, atol=1e-5 * scale + 1e-8)
