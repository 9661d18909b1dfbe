"""The benchmark shape of `docs/performance.md`: a small Llama (hidden 512, 8 layers, 8 query /
4 kv heads, ffn 1408, vocab 8192), seq 256, batch 4, float32, AdamW, one device, random weights.

  ftjax bench --config configs/bench_llama.py
  ftjax bench --config configs/bench_llama.py --vs lora.rank=16 --vs lora.alpha=32.0
"""

from configs import base

SHAPE = dict(vocab_size=8192, embed_dim=512, num_layers=8, num_heads=8, num_kv_heads=4,
             head_dim=64, mlp_dim=1408, rope_theta=10_000.0)


def get_config():
  c = base.get_config()
  c.model.update(preset='tiny', **SHAPE)
  c.data.update(seq_len=256, global_batch=4)
  c.mesh.shape = (1, 1, 1)
  c.optim.update(lr=1e-4, weight_decay=0.0)
  return c
