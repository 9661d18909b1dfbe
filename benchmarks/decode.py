"""Decode throughput of `ftjax.generate` on a randomly initialised model (nothing downloaded).

  XLA_FLAGS=--xla_force_host_platform_device_count=1 python benchmarks/decode.py demo
  XLA_FLAGS=--xla_force_host_platform_device_count=1 python benchmarks/decode.py llama3p2_1b 16

Each case is compiled first, then timed (best of 3) with 1 and with N new tokens: the
difference is N - 1 steps of the jitted decode loop, without prefill or compilation.
One JSON line per case.
"""

import json
import sys
import time

import jax
import numpy as np
from flax import nnx

from ftjax import generation, models, sharding
from ftjax.models import llama


def bench(model: llama.Llama, batch: int, prompt_len: int, new: int, repeats: int = 3) -> dict:
  ids = np.random.default_rng(0).integers(3, 250, (batch, prompt_len))

  def best(n):
    jax.block_until_ready(generation.generate(model, ids, max_new_tokens=n))  # compile
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(generation.generate(model, ids, max_new_tokens=n))
      times.append(time.perf_counter() - start)
    return min(times)

  one, many = best(1), best(new)
  return dict(batch=batch, prompt_len=prompt_len, new_tokens=new, prefill_s=round(one, 4),
              per_step_ms=round(1e3 * (many - one) / (new - 1), 2),
              decode_tokens_per_s=round(batch * (new - 1) / (many - one), 1))


def main(which: str, layers: int | None = None) -> None:
  if which == 'demo':  # configs/demo.py's architecture
    cfg = models.config_from_preset('tiny', dict(vocab_size=259, embed_dim=128, mlp_dim=512,
                                                 num_layers=2))
    cases = [(1, 8, 64), (64, 8, 64)]
  else:
    cfg = models.config_from_preset(which, dict(num_layers=layers))
    cases = [(1, 16, 16), (8, 16, 16)]
  mesh = sharding.make_mesh((1, -1, 1))
  model = sharding.create_sharded(lambda: llama.Llama(cfg, rngs=nnx.Rngs(0)), mesh,
                                  sharding.get_rules('fsdp_tp'))
  params = sharding.count_params(nnx.state(model))
  print(json.dumps(dict(model=which, layers=cfg.num_layers, params=params,
                        devices=jax.device_count())), flush=True)
  for batch, prompt_len, new in cases:
    print(json.dumps(bench(model, batch, prompt_len, new)), flush=True)


if __name__ == '__main__':
  main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None)
