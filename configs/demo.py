"""The built-in demo: teach a small Llama two-digit addition in ~2 minutes on a laptop CPU.

  ftjax train --config configs/demo.py --workdir /tmp/demo

Data (data/demo/, made by data/demo/make.py) and the byte-level tokenizer ship with the
repo, so nothing is downloaded. It prints the held-out exact-match accuracy before and after,
and every eval also scores greedy completions (`eval_generation_score`). Then:

  ftjax generate --workdir /tmp/demo --prompt 12+34= --max-new-tokens 4
  ftjax plot --workdir /tmp/demo
"""

import os

from configs import base

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'data', 'demo')


def get_config():
  c = base.get_config()
  c.model.update(preset='tiny', vocab_size=259, embed_dim=128, mlp_dim=512, num_layers=2)
  c.data.update(path=os.path.join(DATA, 'train.jsonl'), eval_path=os.path.join(DATA, 'eval.jsonl'),
                tokenizer='byte', seq_len=16, global_batch=64, pack=False)
  c.optim.update(lr=3e-3, warmup_steps=50, weight_decay=0.01)
  c.train.update(steps=1000, log_every=50)
  c.eval.update(every_steps=250, generate_path=os.path.join(DATA, 'eval.jsonl'), max_new_tokens=4,
                batch_size=64)
  return c
