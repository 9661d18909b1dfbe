"""A small mixture of experts against a dense model with the same active parameters, and the
compile time of a 4- vs a 32-layer mixture of experts, with `ftjax bench`'s own timing.

The MoE has 8 experts of width F/2 and routes each token to 2, so per token it uses as many MLP
weights as the dense model's one MLP of width F (plus a router of E * D weights). The two are
timed alternately (dense, MoE, dense, MoE, ...; `--rounds` each) in one process, and the
last line is a JSON summary with both medians and their ratio.

  python benchmarks/moe_vs_dense.py                       # full fine-tuning, float32
  python benchmarks/moe_vs_dense.py --rounds 3 --steps 5
"""

from __future__ import annotations

import argparse
import json
import statistics

from configs import base
from ftjax import bench

SHAPES = dict(vocab_size=4096, embed_dim=384, num_heads=6, num_kv_heads=2, head_dim=64,
              rope_theta=10_000.0)
DENSE_MLP, EXPERTS, TOP_K = 1536, 8, 2


def config(args, *, moe: bool, layers: int):
  c = base.get_config()
  arch = dict(SHAPES, num_layers=layers, mlp_dim=DENSE_MLP)
  if moe:
    arch.update(num_experts=EXPERTS, num_experts_per_tok=TOP_K, moe_mlp_dim=DENSE_MLP // TOP_K,
                family='qwen3_moe', qk_norm=True)
  else:
    arch.update(family='qwen3', qk_norm=True)
  c.model.update(preset='tiny', **arch)
  c.data.update(seq_len=args.seq_len, global_batch=args.batch)
  c.mesh.shape = (1, 1, 1)
  c.optim.update(lr=1e-4, weight_decay=0.0)
  return c


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--layers', type=int, default=4)
  p.add_argument('--seq_len', type=int, default=256)
  p.add_argument('--batch', type=int, default=4)
  p.add_argument('--steps', type=int, default=8)
  p.add_argument('--rounds', type=int, default=2)
  p.add_argument('--compile_layers', type=int, nargs=2, default=(4, 32))
  args = p.parse_args()
  runs: dict[str, list[float]] = {'dense': [], 'moe': []}
  for _ in range(args.rounds):
    for name in runs:
      out = bench.run(config(args, moe=name == 'moe', layers=args.layers), steps=args.steps)
      runs[name].append(out['tokens_per_s'])
      print(name, f"{out['tokens_per_s']:.0f} tokens/s", f"compile {out['compile_s']:.1f} s",
            flush=True)
  compile_s = {}
  for layers in args.compile_layers:
    out = bench.run(config(args, moe=True, layers=layers), steps=2, warmup=1)
    compile_s[layers] = out['compile_s']
    print(f'moe {layers} layers: compile {out["compile_s"]:.1f} s', flush=True)
  dense, moe = statistics.median(runs['dense']), statistics.median(runs['moe'])
  small, big = args.compile_layers
  print(json.dumps(dict(
      dense_tokens_per_s=dense, moe_tokens_per_s=moe, moe_vs_dense=moe / dense, runs=runs,
      moe_compile_s=compile_s, compile_ratio=compile_s[big] / compile_s[small],
      shapes=dict(SHAPES, layers=args.layers, dense_mlp=DENSE_MLP, experts=EXPERTS, top_k=TOP_K,
                  moe_mlp=DENSE_MLP // TOP_K, seq_len=args.seq_len, batch=args.batch))))


if __name__ == '__main__':
  main()
