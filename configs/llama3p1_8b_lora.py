"""LoRA fine-tuning of Llama 3.1 8B: bf16 weights and compute, rank-16 adapters on every linear.

Check it fits before booking the slice, then run it on every host of a v5e-8 (or 8 GPUs):

  ftjax plan --config configs/llama3p1_8b_lora.py --topology v5e-8
  ftjax train --config configs/llama3p1_8b_lora.py --workdir gs://BUCKET/runs/8b-lora \
    --config.model.pretrained=/path/to/Meta-Llama-3.1-8B-Instruct --config.data.path=train.jsonl
"""

from configs import base


def get_config():
  c = base.get_config()
  c.model.update(preset='llama3p1_8b', dtype='bfloat16', param_dtype='bfloat16', remat='full')
  c.lora.update(rank=16, alpha=32.0, targets='all-linear')
  c.data.update(seq_len=2048, global_batch=16, pack=True)
  c.optim.update(lr=2e-4, warmup_steps=50, weight_decay=0.0)
  c.train.update(steps=2000, log_every=10)
  c.ckpt.update(every_minutes=30.0, every_steps=0)
  return c
