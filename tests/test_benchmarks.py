"""The benchmark scripts under benchmarks/ run (small, fast cases)."""

import json
import os
import sys

import pytest
from helpers import REPO, run_command


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
