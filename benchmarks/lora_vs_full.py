"""LoRA against full fine-tuning of the same Llama shape, with `ftjax bench`'s own timing.

The shape is issue 20's: hidden 512, 8 layers, 8 query / 4 kv heads, ffn 1408, vocab 8192,
seq 256, batch 4, float32, AdamW. LoRA is rank 16 on every linear layer. The two are timed
alternately (full, LoRA, full, LoRA, ...; `--rounds` each) in one process, and the last line is
a JSON summary: both medians, their ratio (LoRA does about 0.72x the model FLOPs of a full
step, so it should run at least 1.3x as fast), and the full step's MFU against this machine's
measured matmul peak.

  python benchmarks/lora_vs_full.py
  python benchmarks/lora_vs_full.py --rounds 3 --steps 5 --set model.loss_chunk=0
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import statistics

from configs import base
from ftjax import bench

SHAPE = dict(vocab_size=8192, embed_dim=512, num_layers=8, num_heads=8, num_kv_heads=4,
             head_dim=64, mlp_dim=1408, rope_theta=10_000.0)


def config(args, *, lora: bool):
  c = base.get_config()
  c.model.update(preset='tiny', **SHAPE)
  c.data.update(seq_len=args.seq_len, global_batch=args.batch)
  c.mesh.shape = (1, 1, 1)
  c.optim.update(lr=1e-4, weight_decay=0.0)
  if lora:
    c.lora.update(rank=16, alpha=32.0, targets='all-linear')
  for item in args.set:  # section.key=value, as --config.section.key=value on the CLI
    key, _, value = item.partition('=')
    section, _, name = key.partition('.')
    with contextlib.suppress(ValueError, SyntaxError):  # else the text itself
      value = ast.literal_eval(value)
    c[section][name] = value
  return c


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--seq_len', type=int, default=256)
  p.add_argument('--batch', type=int, default=4)
  p.add_argument('--steps', type=int, default=8)
  p.add_argument('--rounds', type=int, default=2)
  p.add_argument('--set', action='append', default=[], help='section.key=value (both runs)')
  args = p.parse_args()
  runs: dict[str, list[dict]] = {'full': [], 'lora': []}
  for _ in range(args.rounds):
    for name in runs:
      out = bench.run(config(args, lora=name == 'lora'), steps=args.steps)
      runs[name].append(out)
      print(name, f"{out['tokens_per_s']:.0f} tokens/s", f"MFU {100 * out['mfu']:.1f}%",
            f"compile {out['compile_s']:.1f} s", flush=True)
  tokens = {k: [r['tokens_per_s'] for r in v] for k, v in runs.items()}
  full, lora = statistics.median(tokens['full']), statistics.median(tokens['lora'])
  peak = runs['full'][-1]['peak']
  print(json.dumps(dict(
      full_tokens_per_s=full, lora_tokens_per_s=lora, lora_vs_full=lora / full, runs=tokens,
      full_mfu=statistics.median(r['mfu'] for r in runs['full']),
      lora_mfu=statistics.median(r['mfu'] for r in runs['lora']),
      peak_gflops=peak['flops_per_s'] / 1e9, peak_spread=peak.get('spread'),
      shape=dict(SHAPE, seq_len=args.seq_len, batch=args.batch), overrides=args.set)))


if __name__ == '__main__':
  main()
