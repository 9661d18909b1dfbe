"""The DPO demo: preference pairs on the demo's addition task, from a partly trained demo base.

  ftjax train --config configs/demo.py --workdir /tmp/demo_sft --config.train.steps=500
  ftjax export --workdir /tmp/demo_sft --out /tmp/demo_base
  ftjax train --config configs/demo_dpo.py --workdir /tmp/demo_dpo

Each pair (data/demo_dpo/, made by `data/demo_dpo/make.py --base /tmp/demo_base`) has the
correct sum chosen and, rejected, that base's own wrong answer (else a near miss). The
reference is the starting point itself (a frozen copy; with
--config.objective.precompute_ref=True, reference log-probabilities computed once instead).
Watch `eval_reward_accuracy` and the held-out exact match (`eval_accuracy`) in metrics.jsonl;
set --config.model.pretrained to start from another base.
"""

import os

from configs import base

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'data')


def get_config():
  c = base.get_config()
  c.model.pretrained = '/tmp/demo_base'
  c.objective.update(kind='dpo', beta=2.0)
  c.data.update(path=os.path.join(DATA, 'demo_dpo', 'train.jsonl'),
                eval_path=os.path.join(DATA, 'demo_dpo', 'eval.jsonl'), tokenizer='byte',
                seq_len=24, global_batch=64)
  c.optim.update(lr=2e-4, warmup_steps=10, weight_decay=0.0)
  c.train.update(steps=400, log_every=25)
  c.eval.update(every_steps=100, generate_path=os.path.join(DATA, 'demo', 'eval.jsonl'),
                max_new_tokens=4, batch_size=64)
  c.ckpt.update(every_steps=0)
  return c
