"""ftjax vs PyTorch (Hugging Face transformers + peft) training throughput, side by side.

The same Llama architecture and shapes, the same optimizer (AdamW), float32, random tokens,
on this machine's CPU (or whatever device JAX uses; torch runs on CPU). Both are timed in one
process, one after the other, after warm-up steps; the last line is a JSON summary.

  python benchmarks/compare_torch.py                 # full fine-tuning and LoRA, ~100M params
  python benchmarks/compare_torch.py --mode lora --steps 5 --layers 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from configs import base
from ftjax import bench

SHAPES = dict(vocab_size=32_000, embed_dim=768, num_layers=12, num_heads=12, num_kv_heads=4,
              head_dim=64, mlp_dim=2048, tie_embeddings=True, rope_theta=10_000.0)
LORA = dict(rank=16, alpha=32.0)


def ftjax_tokens_per_s(args, lora: bool) -> dict:
  c = base.get_config()
  c.model.update(preset='tiny', **{**SHAPES, 'num_layers': args.layers}, remat=args.remat,
                 loss_chunk=args.loss_chunk)
  c.data.update(seq_len=args.seq_len, global_batch=args.batch)
  c.mesh.shape = (1, 1, 1)
  c.optim.update(lr=1e-4, weight_decay=0.0, clip_norm=1.0)
  if lora:
    c.lora.update(**LORA)
  return bench.run(c, steps=args.steps, warmup=args.warmup)


def torch_tokens_per_s(args, lora: bool) -> dict:
  from transformers import LlamaConfig, LlamaForCausalLM

  torch.manual_seed(0)
  cfg = LlamaConfig(vocab_size=SHAPES['vocab_size'], hidden_size=SHAPES['embed_dim'],
                    num_hidden_layers=args.layers, num_attention_heads=SHAPES['num_heads'],
                    num_key_value_heads=SHAPES['num_kv_heads'], head_dim=SHAPES['head_dim'],
                    intermediate_size=SHAPES['mlp_dim'], tie_word_embeddings=True,
                    rope_theta=SHAPES['rope_theta'], max_position_embeddings=args.seq_len,
                    attn_implementation='sdpa')
  model = LlamaForCausalLM(cfg)
  if lora:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(
        r=LORA['rank'], lora_alpha=LORA['alpha'], lora_dropout=0.0,
        target_modules=['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj',
                        'down_proj']))
  model.train()
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
  ids = torch.randint(3, SHAPES['vocab_size'], (args.batch, args.seq_len))
  times = []
  for i in range(args.warmup + args.steps):
    start = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if i >= args.warmup:
      times.append(time.perf_counter() - start)
  median = statistics.median(times)
  return dict(tokens_per_s=args.batch * args.seq_len / median, step_s=median,
              params=sum(p.numel() for p in model.parameters()),
              trainable_params=sum(p.numel() for p in params), threads=torch.get_num_threads())


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--mode', choices=['full', 'lora', 'both'], default='both')
  p.add_argument('--layers', type=int, default=SHAPES['num_layers'])
  p.add_argument('--vocab', type=int, default=SHAPES['vocab_size'])
  p.add_argument('--batch', type=int, default=4)
  p.add_argument('--seq-len', type=int, default=256)
  p.add_argument('--steps', type=int, default=4)
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--remat', default='none')
  p.add_argument('--loss-chunk', type=int, default=512)
  args = p.parse_args()
  SHAPES['vocab_size'] = args.vocab
  summary = {}
  for mode in (['full', 'lora'] if args.mode == 'both' else [args.mode]):
    ours = ftjax_tokens_per_s(args, mode == 'lora')
    theirs = torch_tokens_per_s(args, mode == 'lora')
    ratio = ours['tokens_per_s'] / theirs['tokens_per_s']
    print(f'{mode:>4}: ftjax {ours["tokens_per_s"]:8.1f} tokens/s ({ours["params"]:,} params, '
          f'{ours["trainable_params"]:,} trained, MFU {ours["mfu"]:.2f} of '
          f'{ours["peak_source"]})\n'
          f'      torch {theirs["tokens_per_s"]:8.1f} tokens/s ({theirs["params"]:,} params, '
          f'{theirs["trainable_params"]:,} trained, {theirs["threads"]} threads)\n'
          f'      ratio ftjax / torch = {ratio:.2f}', flush=True)
    summary[mode] = dict(ftjax_tokens_per_s=ours['tokens_per_s'],
                         torch_tokens_per_s=theirs['tokens_per_s'], ratio=ratio,
                         ftjax_params=ours['params'], torch_params=theirs['params'],
                         ftjax_mfu=ours['mfu'], ftjax_compile_s=ours['compile_s'])
  summary['shapes'] = dict(SHAPES, num_layers=args.layers, batch=args.batch, seq_len=args.seq_len,
                           remat=args.remat, loss_chunk=args.loss_chunk)
  print(json.dumps(summary))


if __name__ == '__main__':
  main()
