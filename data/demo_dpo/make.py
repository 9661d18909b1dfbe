"""Writes the DPO demo's preference pairs on the demo's addition task (data/demo/).

  python data/demo_dpo/make.py [--base /tmp/demo_base]   # rewrites train.jsonl and eval.jsonl

Each pair: the prompt `a+b=`, the correct sum chosen, and as rejected the base model's own
greedy answer where it is wrong (its real mistakes), else a near miss (one digit off, or the
carry forgotten). Without --base every rejected answer is a near miss. Train and eval keep the
demo's split, so held-out pairs are unseen sums. The shipped files were made from the base of
configs/demo_dpo.py's docstring (the demo trained 500 steps, exported).
"""

import argparse
import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO = os.path.join(os.path.dirname(HERE), 'demo')


def near_miss(a: int, b: int, rng: random.Random) -> int:
  right = a + b
  no_carry = (a // 10 + b // 10) * 10 + (a % 10 + b % 10) % 10
  options = {right + 1, right - 1, right + 10, right - 10, no_carry} - {right}
  return rng.choice(sorted(x for x in options if x >= 0))


def base_answers(base: str, prompts: list[str]) -> list[str]:
  """The base model's greedy completions of `prompts` (byte tokenizer, as the demo trains)."""
  import ftjax
  from ftjax import generation, tokenizer

  tok = tokenizer.byte_level()
  model = ftjax.load_pretrained(base)
  ids = [[tok.bos_id, *tok.encode(p)] for p in prompts]
  out = generation.complete(model, ids, batch_size=512, stop_ids=[tok.eos_id],
                            decode=tok.decode, max_new_tokens=4)
  return [r['completion'] for r in out]


def main(base: str = '', seed: int = 0) -> None:
  rng = random.Random(seed)
  for name in ('train.jsonl', 'eval.jsonl'):
    with open(os.path.join(DEMO, name)) as src:
      records = [json.loads(line) for line in src]
    answers = base_answers(base, [r['prompt'] for r in records]) if base else None
    with open(os.path.join(HERE, name), 'w') as out:
      for i, record in enumerate(records):
        a, b = map(int, record['prompt'].rstrip('=').split('+'))
        wrong = answers and answers[i] != record['completion'] and answers[i]
        out.write(json.dumps({'prompt': record['prompt'], 'chosen': record['completion'],
                              'rejected': wrong or str(near_miss(a, b, rng))}) + '\n')


if __name__ == '__main__':
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--base', default='', help='a demo base (HF folder) whose mistakes to use')
  main(parser.parse_args().base)
