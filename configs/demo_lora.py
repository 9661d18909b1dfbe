"""LoRA on the demo task, starting from a Hugging Face folder (e.g. an exported demo run).

  ftjax train --config configs/demo.py --workdir /tmp/base --config.train.steps=300
  ftjax export --workdir /tmp/base --out /tmp/base_hf --dtype float32
  ftjax train --config configs/demo_lora.py --config.model.pretrained=/tmp/base_hf \
    --workdir /tmp/demo_lora
"""

from configs import base, demo


def get_config():
  c = base.get_config()
  c.data.update(demo.get_config().data.to_dict())
  c.lora.update(rank=16, alpha=32.0, targets='all-linear')
  c.optim.update(lr=5e-3, warmup_steps=50, weight_decay=0.0)
  c.train.update(steps=400, log_every=50)
  c.eval.update(every_steps=200)
  return c
