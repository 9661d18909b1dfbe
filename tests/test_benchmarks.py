"""benchmarks/compare_torch.py runs both frameworks on the same shapes (a small, fast case)."""

import json
import sys

import pytest
from helpers import run_command


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
