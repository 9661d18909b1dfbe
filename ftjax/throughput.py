"""Throughput and an honest MFU: model FLOPs per step, peak FLOP/s per device, the meter.

Model FLOPs per training step (the convention of PaLM, MaxText and Levanter; see
docs/performance.md for a worked example):

  weights    6 * N * tokens       N = every matmul weight, the LM head included, the embedding
                                  lookup not (a gather). Forward 2, activation gradient 2,
                                  weight gradient 2 FLOPs per weight and token.
  LoRA       4 * N_frozen * tokens + 6 * N_adapters * tokens: a frozen weight's weight-gradient
                                  matmul is never executed, so it is not counted.
  attention  12 * pairs * heads * head_dim per layer, where pairs = the (query, key) pairs a
             causal mask allows, s**2 / 2 per segment of length s (the causal halving), fewer
             in sliding-window layers; packed rows count each segment separately.

Peak FLOP/s per device come from a table of known chips (dense bf16), or for CPUs and unknown
devices from a matmul calibration (several sizes, repeated, the median), measured once per
machine and cached with its record; the result says which, and how much the samples spread.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform as platform_lib
import socket
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

# Dense bf16 peak FLOP/s per JAX device, matched against `device.device_kind` (first match wins,
# so longer names come first). TPU v4 and v5p devices are megacore chips (one device per chip).
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ('TPU v6 lite', 918e12),  # v6e (Trillium)
    ('TPU v6e', 918e12),
    ('TPU v5 lite', 197e12),  # v5e
    ('TPU v5e', 197e12),
    ('TPU v5p', 459e12),
    ('TPU v5', 459e12),
    ('TPU v4', 275e12),
    ('H200', 989e12),  # SXM, dense (no sparsity)
    ('H100 PCIe', 756e12),
    ('H100', 989e12),
    ('A100', 312e12),
)


def matmul_params(arch: Any) -> int:
  """Weights each token's matmuls use: attention, MLP and LM head (tied or not). In a mixture of
  experts that is the router and the `num_experts_per_tok` experts a token is routed to (the
  active parameters) and any shared expert, not every expert."""
  d, n, k, h, f = arch.embed_dim, arch.num_heads, arch.num_kv_heads, arch.head_dim, arch.mlp_dim
  mlp = 3 * d * f
  if getattr(arch, 'num_experts', 0):
    mlp = arch.num_experts_per_tok * 3 * d * arch.moe_mlp_dim + d * arch.num_experts
    if getattr(arch, 'shared_expert_dim', 0):  # and a shared expert with its gate
      mlp += 3 * d * arch.shared_expert_dim + d
  per_layer = 2 * d * n * h + 2 * d * k * h + mlp
  return arch.num_layers * per_layer + arch.vocab_size * d


def segment_lengths(segment_ids: np.ndarray) -> np.ndarray:
  """Segment lengths in `[rows, T]` segment ids (0 = padding; a run of one id = a segment)."""
  ids = np.asarray(segment_ids)
  starts = np.ones(ids.shape, bool)
  starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
  starts &= ids != 0
  run_id = np.cumsum(starts.ravel())
  lengths = np.bincount(run_id[ids.ravel() != 0])
  return lengths[lengths > 0]


def causal_pairs(lengths: Sequence[int] | np.ndarray, window: int = 0) -> float:
  """(query, key) pairs a causal mask keeps: s**2 / 2 per segment; with a window w < s, w**2 / 2
  for the first w queries and w each after them."""
  s = np.asarray(lengths, np.float64)
  if not window:
    return float(np.sum(s * s / 2))
  w = np.minimum(s, window)
  return float(np.sum(w * w / 2 + (s - w) * w))


@dataclasses.dataclass(frozen=True)
class StepFlops:
  weights: float
  attention: float

  @property
  def total(self) -> float:
    return self.weights + self.attention


def train_flops(arch: Any, *, tokens: float, lengths: Sequence[int] | np.ndarray,
                adapter_params: int | None = None, reference_forward: bool = False) -> StepFlops:
  """Model FLOPs of one training step over `tokens` tokens in segments of `lengths`.

  `adapter_params`: None for full fine-tuning; the number of LoRA adapter weights otherwise (the
  base is then frozen). `reference_forward`: the step also runs a reference model's forward
  pass over the same tokens (DPO, IPO): 2 FLOPs per weight and token, and the forward third of
  the attention.
  """
  n = matmul_params(arch)
  if adapter_params is None:
    weights = 6.0 * n * tokens
  else:
    weights = (4.0 * n + 6.0 * adapter_params) * tokens
  global_layers = sum(arch.is_global(i) for i in range(arch.num_layers))
  pairs = global_layers * causal_pairs(lengths)
  if global_layers < arch.num_layers:
    pairs += (arch.num_layers - global_layers) * causal_pairs(lengths, arch.sliding_window)
  attention = 12.0 * pairs * arch.num_heads * arch.head_dim
  if reference_forward:
    weights += 2.0 * n * tokens
    attention += 4.0 * pairs * arch.num_heads * arch.head_dim
  return StepFlops(weights=weights, attention=attention)


@dataclasses.dataclass(frozen=True)
class Peak:
  flops_per_s: float  # per device
  source: str  # where the figure comes from, said in every report
  # A measured peak's record (`calibrate`): the samples, their spread, when and where.
  provenance: dict[str, Any] | None = dataclasses.field(default=None, compare=False)


CALIBRATION_SIZES = (1024, 1536, 2048)
CALIBRATION_SETTLE_S = 4.0  # seconds without a new best that end a calibration
_clock = time.perf_counter  # calibration's clock (tests drive it)


def _square_matmul(dtype, size: int, min_s: float):
  """A function timing one round of `size` x `size` matmuls lasting at least `min_s`: its FLOP/s."""
  a = jax.jit(lambda: jnp.ones((size, size), dtype))()  # made on the device: no transfer
  dot = jax.jit(jnp.dot)
  dot(a, a).block_until_ready()  # compile and warm up
  start = time.perf_counter()
  dot(a, a).block_until_ready()
  calls = max(1, int(np.ceil(min_s / max(time.perf_counter() - start, 1e-9))))

  def one_round() -> float:
    start = time.perf_counter()
    for _ in range(calls):
      out = dot(a, a)
    out.block_until_ready()
    return 2.0 * size**3 * calls / (time.perf_counter() - start)

  return one_round


def calibrate(dtype=jnp.float32, *, sizes: Sequence[int] = CALIBRATION_SIZES, rounds: int = 15,
              min_s: float = 0.02, settle_s: float = CALIBRATION_SETTLE_S,
              max_s: float = 30.0) -> dict[str, Any]:
  """The matmul rate of the default device: for each size, the best of its timings of at least
  `min_s` each (on a shared machine noise only ever slows a timing down), the sizes taking
  turns so that a burst of load elsewhere hits them alike; the figure is the median of those
  bests over sizes, and `spread` the range of every sample relative to it (how far one timing
  can be off on this machine, said in every report).

  Rounds go on after the first `rounds` until no size's best has risen by more than 1% for
  `settle_s` seconds (or `max_s` have passed): a best taken over a busy stretch is low, and
  how long the machine stays busy is not known in advance. Many short timings over several
  seconds are what find a shared machine's quiet moments."""
  device = jax.devices()[0]
  timers = {int(s): _square_matmul(dtype, int(s), min_s) for s in sizes}
  per_size = {s: [] for s in timers}
  best = dict.fromkeys(timers, 0.0)
  start = last_gain = _clock()
  done = 0
  while done < rounds or (_clock() - last_gain < settle_s and _clock() - start < max_s):
    for s, one_round in timers.items():
      rate = one_round()
      per_size[s].append(rate)
      if rate > 1.01 * best[s]:
        last_gain = _clock()
      best[s] = max(best[s], rate)
    done += 1
  samples = [x for r in per_size.values() for x in r]
  figure = float(np.median(list(best.values())))
  return dict(flops_per_s=figure, dtype=jnp.dtype(dtype).name, sizes=list(per_size),
              rounds=done, settle_s=settle_s, seconds=round(_clock() - start, 1),
              per_size_best={str(k): v for k, v in best.items()},
              min=min(samples), max=max(samples), spread=(max(samples) - min(samples)) / figure,
              platform=device.platform, device_kind=device.device_kind,
              measured_at=datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
              jax=jax.__version__, machine=_machine())


def _machine() -> str:
  """This machine, as the calibration cache tells machines apart: host, CPU model, cores."""
  model = ''
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      model = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')),
                   '')
  except OSError:
    pass
  return f'{socket.gethostname()} | {model or platform_lib.processor()} | {os.cpu_count()} cores'


def cache_path() -> str:
  """Where measured peaks are kept: $FTJAX_CACHE_DIR, else $XDG_CACHE_HOME/ftjax, else
  ~/.cache/ftjax; the file is peak.json."""
  root = os.environ.get('FTJAX_CACHE_DIR') or os.path.join(
      os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'ftjax')
  return os.path.join(root, 'peak.json')


def _read_cache() -> dict[str, Any]:
  try:
    with open(cache_path(), encoding='utf-8') as f:
      cached = json.load(f)
    return cached if isinstance(cached, dict) else {}
  except (OSError, ValueError):
    return {}  # none yet, or unreadable: measure again


def _write_cache(key: str, record: dict[str, Any]) -> None:
  """Adds `record` under `key`, atomically (parallel processes may calibrate at once)."""
  path = cache_path()
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cached = _read_cache()
    cached[key] = record
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
      json.dump(cached, f, indent=1)
    os.replace(tmp, path)
  except OSError as e:
    logging.warning('could not cache the measured peak in %s (%s): it is measured again next '
                    'time', path, e)


def _measured(record: dict[str, Any], cached: bool) -> Peak:
  where = f', cached in {cache_path()} (ftjax bench --calibrate measures again)' if cached else ''
  sizes = '/'.join(map(str, record['sizes']))
  settled = (f", the last {record['settle_s']:g} s raising no best" if 'settle_s' in record
             else '')
  return Peak(record['flops_per_s'],
              f"measured: {record['dtype']} matmul on {record['platform']} "
              f"({record['device_kind']}), median over sizes {sizes} of the best of "
              f"{record['rounds']} rounds ({record.get('seconds', '?')} s{settled}), "
              f"samples {record['min'] / 1e9:.0f}-{record['max'] / 1e9:.0f} GFLOP/s "
              f"(spread {100 * record['spread']:.0f}%), at {record['measured_at']}{where}; "
              'not a datasheet figure', provenance=dict(record, cached=cached))


_CALIBRATED: dict[str, Peak] = {}


def peak(device: jax.Device | None = None, dtype=jnp.bfloat16, *,
         recalibrate: bool = False) -> Peak:
  """Peak FLOP/s of one device: the table's dense bf16 figure, else a measured matmul rate
  (`calibrate`), kept per machine in `cache_path()` so that every run here divides by the same
  figure; `recalibrate` (or FTJAX_RECALIBRATE=1) measures it again."""
  device = device or jax.devices()[0]
  kind = device.device_kind
  for name, flops in PEAK_FLOPS:
    if name.lower() in kind.lower():
      return Peak(flops, f'table: {name} dense bf16')
  key = ' | '.join([device.platform, kind, jnp.dtype(dtype).name, f'{jax.device_count()} devices',
                    f'jax {jax.__version__}', _machine()])
  # FTJAX_RECALIBRATE: once per process, not at every call.
  recalibrate = recalibrate or (key not in _CALIBRATED
                                and os.environ.get('FTJAX_RECALIBRATE') == '1')
  if key not in _CALIBRATED or recalibrate:
    record = None if recalibrate else _read_cache().get(key)
    if record is None:
      record = calibrate(dtype, sizes=CALIBRATION_SIZES, settle_s=CALIBRATION_SETTLE_S)
      _write_cache(key, record)
      _CALIBRATED[key] = _measured(record, cached=False)
    else:
      _CALIBRATED[key] = _measured(record, cached=True)
  return _CALIBRATED[key]


def mfu(flops_per_step: float, step_s: float, num_devices: int, peak_per_device: float) -> float:
  return flops_per_step / (step_s * num_devices * peak_per_device)


def adapter_params(params) -> int:
  """LoRA adapter weights that take part in matmuls (a and b; DoRA magnitudes are elementwise)."""
  leaves = jax.tree_util.tree_leaves_with_path(params)
  return sum(int(np.prod(x.shape)) for path, x in leaves
             if 'magnitude' not in jax.tree_util.keystr(path))


class Meter:
  """Accumulates a log window's tokens and model FLOPs from each batch's segment ids."""

  def __init__(self, arch: Any, *, num_devices: int, adapter_params: int | None,
               compute_dtype=jnp.bfloat16, reference_forward: bool = False):
    self.arch, self.num_devices, self.adapters = arch, num_devices, adapter_params
    self.reference_forward = reference_forward
    self.peak = peak(dtype=compute_dtype)
    self._tokens = self._flops = 0.0

  def add(self, segment_ids: np.ndarray) -> int:
    """Counts one step's batch (this host's rows); returns this host's real tokens."""
    lengths = segment_lengths(segment_ids)
    tokens = int(lengths.sum())
    hosts = jax.process_count()  # every host has the same shape of rows; count them all
    self._tokens += tokens * hosts
    self._flops += train_flops(self.arch, tokens=tokens, lengths=lengths,
                               adapter_params=self.adapters,
                               reference_forward=self.reference_forward).total * hosts
    return tokens

  def report(self, seconds: float, steps: int) -> dict[str, float]:
    """The window's rates, then a fresh window."""
    seconds = max(seconds, 1e-9)
    out = dict(tokens_per_s=self._tokens / seconds,
               tokens_per_s_per_device=self._tokens / seconds / self.num_devices,
               step_s=seconds / max(steps, 1),
               model_tflops_per_step=self._flops / max(steps, 1) / 1e12,
               mfu=mfu(self._flops, seconds, self.num_devices, self.peak.flops_per_s))
    self._tokens = self._flops = 0.0
    return out
