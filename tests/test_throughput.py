"""Model FLOPs (by hand and against XLA's count), peak FLOP/s, and `ftjax bench`."""

import itertools
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import run_ftjax

from conftest import REPO
from ftjax import bench, throughput
from ftjax.models import llama

# 1 layer, D=4, 2 heads x 2 of 2 dims, 1 kv head, MLP 8, vocab 10.
SMALL = llama.Config(vocab_size=10, embed_dim=4, num_layers=1, num_heads=2, num_kv_heads=1,
                     head_dim=2, mlp_dim=8)


def test_flops_by_hand():
  # q,o: 2*4*2*2 = 32; k,v: 2*4*1*2 = 16; mlp: 3*4*8 = 96; head: 10*4 = 40 -> 184.
  assert throughput.matmul_params(SMALL) == 184
  # One row packed with segments of 4 and 2 tokens.
  lengths = throughput.segment_lengths(np.array([[1, 1, 1, 1, 2, 2]]))
  assert lengths.tolist() == [4, 2]
  f = throughput.train_flops(SMALL, tokens=6, lengths=lengths)
  assert f.weights == 6 * 184 * 6
  assert f.attention == 12 * (4 * 4 / 2 + 2 * 2 / 2) * 2 * 2  # pairs 10, 2 heads x 2 dims
  # LoRA: frozen weights 4 FLOPs per weight and token, 20 adapter weights 6.
  assert throughput.train_flops(SMALL, tokens=6, lengths=lengths, adapter_params=20).weights == (
      (4 * 184 + 6 * 20) * 6)
  # A sliding window of 4 over a segment of 8: 4*4/2 for the first 4 queries, 4 each after.
  assert throughput.causal_pairs([8], window=4) == 8 + 4 * 4
  assert throughput.causal_pairs([8]) == 32


def test_segment_lengths_skip_padding():
  ids = np.array([[1, 1, 2, 0], [3, 3, 3, 3], [0, 0, 0, 0]])
  assert sorted(throughput.segment_lengths(ids).tolist()) == [1, 2, 4]


def test_formula_matches_xla_cost_analysis(small_config):
  """One layer (XLA counts a scanned loop body once), full attention counted unhalved (XLA
  computes the whole T x T score matrix, then masks): within 5% of the compiled step's FLOPs;
  the rest is softmax, norms, rope, the loss and AdamW, which the model-FLOPs convention omits."""
  c = small_config
  c.model.update(vocab_size=512, embed_dim=256, mlp_dim=1024, num_layers=1, num_heads=4,
                 num_kv_heads=2, head_dim=64)
  c.data.update(seq_len=64, global_batch=4)
  c.mesh.shape = (1, 1, 1)
  resolved, trainer = bench.trainer_for(c, abstract=True, devices=jax.devices()[:1])
  arch = resolved.model.arch
  batch = {k: jax.ShapeDtypeStruct((4, 64), np.int32, sharding=trainer.batch_sharding)
           for k in ('tokens', 'targets', 'positions', 'segment_ids', 'loss_mask')}
  compiled = trainer.train_step.lower(trainer.state, trainer.frozen, batch, trainer.ref).compile()
  xla = compiled.cost_analysis()['flops']
  f = throughput.train_flops(arch, tokens=256, lengths=[64] * 4)
  ours = f.weights + 2 * f.attention  # undo the causal halving, as XLA does not skip masked work
  print(f'XLA {xla:.4e} FLOPs vs model FLOPs without causal halving {ours:.4e}: '
        f'ratio {xla / ours:.4f}')
  assert 1.0 <= xla / ours < 1.05


def test_meter_reports_mfu():
  meter = throughput.Meter(SMALL, num_devices=2, adapter_params=None)
  seg = np.ones((3, 6), np.int32)
  assert meter.add(seg) == 18
  out = meter.report(seconds=2.0, steps=1)
  flops = throughput.train_flops(SMALL, tokens=18, lengths=[6, 6, 6]).total
  assert out['tokens_per_s'] == 9.0 and out['tokens_per_s_per_device'] == 4.5
  assert out['mfu'] == pytest.approx(flops / (2.0 * 2 * meter.peak.flops_per_s))
  assert 'measured' in meter.peak.source  # a CPU has no table entry
  assert meter.report(seconds=1.0, steps=1)['tokens_per_s'] == 0.0  # a fresh window


def test_peak_table_names_known_chips():
  class Fake:
    device_kind, platform = 'TPU v5 lite', 'tpu'

  p = throughput.peak(Fake())
  assert p.flops_per_s == 197e12 and p.source.startswith('table')


def test_calibration_is_a_median_with_its_spread():
  record = throughput.calibrate(jnp.float32, sizes=(128, 256), rounds=3, min_s=0.01,
                                settle_s=0.5, max_s=2.0)
  assert record['rounds'] >= 3 and record['settle_s'] == 0.5 and record['seconds'] <= 3.0
  assert record['sizes'] == [128, 256] and set(record['per_size_best']) == {'128', '256'}
  assert 0 < record['min'] <= record['flops_per_s'] <= record['max']
  assert record['spread'] == pytest.approx((record['max'] - record['min'])
                                           / record['flops_per_s'])
  assert record['platform'] == 'cpu' and record['dtype'] == 'float32' and record['machine']


def test_calibration_rounds_go_on_until_the_best_settles(monkeypatch):
  """A run that starts on a busy machine: rounds continue past the minimum while any size's
  best still rises by more than 1%, and stop `settle_s` seconds after the last rise; a machine
  that never settles stops at `max_s`."""
  now = [0.0]
  monkeypatch.setattr(throughput, '_clock', lambda: now[0])

  def timing(rate):  # every timing takes half a second
    now[0] += 0.5
    return float(rate)

  rates = {128: iter([50, 60, 100, 100, 100.5, 100, 100, 101] + [100] * 50),
           256: iter([80, 80, 80, 90, 80, 80, 80, 80] + [80] * 50)}

  def timer(dtype, size, min_s):
    return lambda: timing(next(rates[size]))

  monkeypatch.setattr(throughput, '_square_matmul', timer)
  record = throughput.calibrate(jnp.float32, sizes=(128, 256), rounds=3, settle_s=1.5)
  # Gains in rounds 0-2 (128) and 3 (256, at 4 s); 100.5 (round 4) is within 1% of 100, so
  # nothing rises after 4 s, and the round ending 1.5 s later (at 6 s) is the last.
  assert record['rounds'] == 6
  assert record['per_size_best'] == {'128': 100.5, '256': 90.0}
  assert record['flops_per_s'] == (100.5 + 90.0) / 2
  assert record['min'] == 50 and record['max'] == 100.5
  assert 'best of 6 rounds' in throughput._measured(record, cached=False).source

  climbing = itertools.count(1.0, 1.0)
  monkeypatch.setattr(throughput, '_square_matmul',
                      lambda dtype, size, min_s: lambda: timing(next(climbing)))
  now[0] = 0.0
  record = throughput.calibrate(jnp.float32, sizes=(128,), rounds=2, settle_s=1.0, max_s=10.0)
  assert record['rounds'] == 20 and record['seconds'] == 10.0


def test_measured_peak_is_cached_per_machine_with_its_record(tmp_path, monkeypatch):
  """The first run measures and writes the cache; a later process (a fresh in-memory table)
  reads the same figure back and says so; `recalibrate` measures again; a broken cache file is
  measured over, never fatal."""
  monkeypatch.setenv('FTJAX_CACHE_DIR', str(tmp_path))
  monkeypatch.setattr(throughput, 'CALIBRATION_SIZES', (128, 256))
  monkeypatch.setattr(throughput, 'CALIBRATION_SETTLE_S', 0.2)
  monkeypatch.setattr(throughput, '_CALIBRATED', {})
  first = throughput.peak(dtype=jnp.float32)
  assert first.provenance['cached'] is False and 'cached in' not in first.source
  assert 'spread' in first.source and 'median over sizes 128/256 of the best of' in first.source
  assert first.provenance['rounds'] >= 15
  stored = json.loads((tmp_path / 'peak.json').read_text())
  (record,) = stored.values()
  assert record['flops_per_s'] == first.flops_per_s
  monkeypatch.setattr(throughput, '_CALIBRATED', {})
  again = throughput.peak(dtype=jnp.float32)
  assert again.flops_per_s == first.flops_per_s and again.provenance['cached'] is True
  assert str(tmp_path / 'peak.json') in again.source
  fresh = throughput.peak(dtype=jnp.float32, recalibrate=True)
  assert fresh.provenance['cached'] is False
  assert json.loads((tmp_path / 'peak.json').read_text()) == {
      next(iter(stored)): {k: v for k, v in fresh.provenance.items() if k != 'cached'}}
  (tmp_path / 'peak.json').write_text('{not json')
  monkeypatch.setattr(throughput, '_CALIBRATED', {})
  assert throughput.peak(dtype=jnp.float32).provenance['cached'] is False


@pytest.mark.slow
def test_bench_calibrate_cli_prints_and_caches_the_record(tmp_path):
  out = run_ftjax('bench', '--calibrate', env=dict(os.environ, FTJAX_CACHE_DIR=str(tmp_path)))
  assert out.returncode == 0, out.stderr[-3000:]
  record = json.loads(out.stdout.strip().splitlines()[-1])
  assert record['cache'] == str(tmp_path / 'peak.json') and (tmp_path / 'peak.json').exists()
  assert record['sizes'] == list(throughput.CALIBRATION_SIZES) and record['rounds'] >= 15
  assert record['peak_tflops_per_device'] * 1e12 == pytest.approx(record['flops_per_s'])
  assert record['flops_per_s'] > 0


def _bench_cli(*overrides):
  out = run_ftjax('bench', '--config', f'{REPO}/configs/demo.py', '--steps', '3', *overrides,
                  devices=None)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_bench_cli_full_and_lora_side_by_side():
  out = _bench_cli('--vs', 'lora.rank=4')
  full, lora = out['base'], out['vs']
  for key in ('tokens_per_s', 'tokens_per_s_per_device', 'compile_s', 'mfu',
              'model_tflops_per_step', 'params', 'trainable_params', 'device_kind', 'mesh'):
    assert key in full, key
  assert full['step_s']['steps'] == lora['step_s']['steps'] == 3
  assert 0 < full['step_s']['median'] <= full['step_s']['p90']
  assert full['params'] == full['trainable_params'] > 0
  assert 0 < full['mfu'] < 1.5 and full['peak_memory_bytes']['compiled'] > 0
  assert full['tokens_per_s'] == pytest.approx(64 * 16 / full['step_s']['median'])
  assert lora['trainable_params'] < lora['params'] == full['params'] + lora['trainable_params']
  assert lora['shapes']['lora_rank'] == 4 and full['shapes']['lora_rank'] == 0
  assert out['overrides'] == ['lora.rank=4']
  assert out['vs_over_base'] == pytest.approx(lora['tokens_per_s'] / full['tokens_per_s'])
  # Frozen weights skip their weight-gradient matmuls: fewer model FLOPs than full training.
  assert lora['model_tflops_per_step'] < full['model_tflops_per_step']


def test_bench_overrides_copy_the_config_and_name_a_bad_key():
  from configs import demo
  from ftjax.config import ConfigError

  c = demo.get_config()
  vs = bench.with_overrides(c, ['lora.rank=16', 'lora.targets=q,v', 'model.scan_unroll=2'])
  assert (vs.lora.rank, vs.lora.targets, vs.model.scan_unroll) == (16, 'q,v', 2)
  assert (c.lora.rank, c.model.scan_unroll) == (0, 0)  # the original is untouched
  for bad, said in (('lora.rnak=16', 'lora.rnak=16'), ('rank=16', 'section.key=value'),
                    ('lora.rank', 'section.key=value'), ('lora.rank=abc', "'lora.rank=abc'")):
    with pytest.raises(ConfigError, match=re.escape(said)):
      bench.with_overrides(c, [bad])


def test_train_flops_count_the_reference_forward():
  from ftjax.models import llama

  arch = llama.Config(vocab_size=256, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=16, mlp_dim=128)
  plain = throughput.train_flops(arch, tokens=64, lengths=[32, 32], adapter_params=100)
  dpo = throughput.train_flops(arch, tokens=64, lengths=[32, 32], adapter_params=100,
                               reference_forward=True)
  n = throughput.matmul_params(arch)
  assert dpo.weights - plain.weights == pytest.approx(2.0 * n * 64)
  assert dpo.attention == pytest.approx(plain.attention * 4 / 3)


@pytest.mark.slow
def test_bench_times_a_dpo_step_beside_the_sft_step():
  out = _bench_cli('--config.objective.kind=dpo', '--config.lora.rank=4')
  assert out['shapes']['objective'] == 'dpo'
  vs = out['vs_sft']
  assert vs['ratio'] == pytest.approx(out['step_s']['median'] / vs['sft_step_s'])
  assert 0.8 < vs['ratio'] < 3.0  # one extra forward pass: dearer than SFT, not absurdly


def test_bench_times_lora_on_int8_and_int4_bases():
  """QLoRA side by side with LoRA on the demo model: int4 weights are packed two per byte in
  the compiled step's layout (the step is then timed through the jitted function)."""
  from configs import demo

  c = demo.get_config()
  c.lora.update(rank=4, alpha=8.0)
  c.data.update(seq_len=32, global_batch=8)
  out = bench.side_by_side({q: bench.with_overrides(c, [f'lora.quantize_base={q}'] if q else [])
                            for q in ('', 'int8', 'int4')}, steps=2, warmup=1)
  for name, figures in out.items():
    assert figures['step_s']['steps'] == 2 and figures['tokens_per_s'] > 0, name
  # The frozen base is stored at 1/4 and 1/8 of its float32 bytes.
  args = {name: figures['memory_analysis']['arguments'] for name, figures in out.items()}
  assert args['int4'] < args['int8'] < args['']
