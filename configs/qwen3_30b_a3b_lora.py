"""LoRA fine-tuning of Qwen3-30B-A3B (a mixture of 128 experts, 8 per token, 3B active): the
settings of configs/llama3p1_8b_lora.py (bf16, rank-16 adapters on every linear, here also on
every expert's projections; the router stays frozen), with the experts split over an `expert`
mesh axis of 4.

Check it fits before booking the slice, then run it on every host of a v5p-16:

  ftjax plan --config configs/qwen3_30b_a3b_lora.py --topology v5p-16
  ftjax train --config configs/qwen3_30b_a3b_lora.py --workdir gs://BUCKET/runs/qwen3-moe-lora \
    --config.model.pretrained=/path/to/Qwen3-30B-A3B --config.data.path=train.jsonl
"""

from configs import llama3p1_8b_lora


def get_config():
  c = llama3p1_8b_lora.get_config()
  c.model.preset = 'qwen3_30b_a3b'
  c.mesh.shape = (1, -1, 4, 1)  # (data, fsdp, expert, tensor): 32 of the 128 experts per device
  return c
