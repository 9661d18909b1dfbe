"""Full fine-tuning of Llama 3.1 70B: float32 master weights and Adam state, bf16 compute, FSDP
over the whole slice, full rematerialisation.

  ftjax plan --config configs/llama3p1_70b_full.py --topology v5p-64
  ftjax train --config configs/llama3p1_70b_full.py --workdir gs://BUCKET/runs/70b \
    --config.model.pretrained=/path/to/Meta-Llama-3.1-70B --config.data.path=train.jsonl
"""

from configs import base


def get_config():
  c = base.get_config()
  c.model.update(preset='llama3p1_70b', dtype='bfloat16', param_dtype='float32', remat='full')
  c.data.update(seq_len=4096, global_batch=32, pack=True)
  c.optim.update(lr=1e-5, warmup_steps=100, weight_decay=0.1)
  c.train.update(steps=1000, log_every=10)
  c.ckpt.update(every_minutes=30.0, every_steps=0)
  return c
