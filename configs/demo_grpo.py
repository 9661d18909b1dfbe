"""The GRPO demo: online RL on the demo's addition task, from a partly trained demo base.

  ftjax train --config configs/demo.py --workdir /tmp/demo_grpo_sft --config.train.steps=700
  ftjax export --workdir /tmp/demo_grpo_sft --out /tmp/demo_grpo_base
  ftjax train --config configs/demo_grpo.py --workdir /tmp/demo_grpo

Each step samples 8 completions of each of 16 training prompts with the live weights, scores
them with the `number` reward (the sum is right or not) and pushes the policy toward the
better ones. The held-out exact match of greedy completions (`eval_generation_score`) is
printed before and after; `rollout_samples` in metrics.jsonl shows completions with their
rewards. Set --config.model.pretrained to start from another base.
"""

import os

from configs import base

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'data', 'demo')


def get_config():
  c = base.get_config()
  c.model.pretrained = '/tmp/demo_grpo_base'
  c.objective.update(kind='grpo', group_size=8, prompts_per_step=16, max_new_tokens=4,
                     rewards=[{'fn': 'number', 'weight': 1.0}])
  c.data.update(path=os.path.join(DATA, 'train.jsonl'), eval_path=os.path.join(DATA, 'eval.jsonl'),
                tokenizer='byte', seq_len=16)
  c.optim.update(lr=1e-4, warmup_steps=10, weight_decay=0.0)
  c.train.update(steps=150, log_every=10)
  c.eval.update(every_steps=50, generate_path=os.path.join(DATA, 'eval.jsonl'), max_new_tokens=4,
                batch_size=64)
  c.ckpt.update(every_steps=0)
  return c
