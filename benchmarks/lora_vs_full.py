"""LoRA against full fine-tuning of the same Llama shape, with `ftjax bench`'s own timing.

The shape is issue 20's: hidden 512, 8 layers, 8 query / 4 kv heads, ffn 1408, vocab 8192,
seq 256, batch 4, float32, AdamW. LoRA is rank 16 on every linear layer. In each round both
steps are compiled, then called alternately (full, LoRA, full, LoRA, ...; `bench.side_by_side`),
so a busy moment of a shared machine slows both. Each round prints its ratio; the last line is
a JSON summary: the medians, every round's ratio (LoRA does about 0.72x the model FLOPs of a
full step, so it should run at least 1.3x as fast), and the full step's MFU against this
machine's measured matmul peak.

  python benchmarks/lora_vs_full.py
  python benchmarks/lora_vs_full.py --rounds 3 --steps 5 --set model.loss_chunk=0
"""

from __future__ import annotations

import argparse
import json
import statistics

from configs import bench_llama
from ftjax import bench

SHAPE = bench_llama.SHAPE


def config(args, *, lora: bool):
  c = bench_llama.get_config()
  c.data.update(seq_len=args.seq_len, global_batch=args.batch)
  if lora:
    c.lora.update(rank=16, alpha=32.0, targets='all-linear')
  return bench.with_overrides(c, args.set)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--seq_len', type=int, default=256)
  p.add_argument('--batch', type=int, default=4)
  p.add_argument('--steps', type=int, default=8)
  p.add_argument('--rounds', type=int, default=2)
  p.add_argument('--set', action='append', default=[], help='section.key=value (both runs)')
  args = p.parse_args()
  rounds = []
  for i in range(args.rounds):
    out = bench.side_by_side({name: config(args, lora=name == 'lora') for name in ('full', 'lora')},
                             steps=args.steps)
    rounds.append(out)
    print(f'round {i + 1}:', *(f"{k} {v['tokens_per_s']:.0f} tokens/s MFU {100 * v['mfu']:.1f}%"
                              for k, v in out.items()),
          f"LoRA/full {out['lora']['tokens_per_s'] / out['full']['tokens_per_s']:.2f}", flush=True)
  tokens = {k: [r[k]['tokens_per_s'] for r in rounds] for k in ('full', 'lora')}
  ratios = [r['lora']['tokens_per_s'] / r['full']['tokens_per_s'] for r in rounds]
  peak = rounds[-1]['full']['peak']
  print(json.dumps(dict(
      full_tokens_per_s=statistics.median(tokens['full']),
      lora_tokens_per_s=statistics.median(tokens['lora']), lora_vs_full=ratios, runs=tokens,
      full_mfu=[r['full']['mfu'] for r in rounds], lora_mfu=[r['lora']['mfu'] for r in rounds],
      peak_gflops=peak['flops_per_s'] / 1e9, peak_spread=peak.get('spread'),
      steps=args.steps, shape=dict(SHAPE, seq_len=args.seq_len, batch=args.batch),
      overrides=args.set)))


if __name__ == '__main__':
  main()
