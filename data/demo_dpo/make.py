"""Writes the DPO demo's preference pairs on the demo's addition task (data/demo/).

  python data/demo_dpo/make.py   # rewrites train.jsonl and eval.jsonl next to this file

Each pair: the prompt `a+b=`, the correct sum chosen, a near miss rejected (one digit off, or
the carry forgotten). Train and eval keep the demo's split, so held-out pairs are unseen sums.
"""

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


def main(seed: int = 0) -> None:
  rng = random.Random(seed)
  for name in ('train.jsonl', 'eval.jsonl'):
    with open(os.path.join(DEMO, name)) as src, open(os.path.join(HERE, name), 'w') as out:
      for line in src:
        record = json.loads(line)
        a, b = map(int, record['prompt'].rstrip('=').split('+'))
        out.write(json.dumps({'prompt': record['prompt'], 'chosen': record['completion'],
                              'rejected': str(near_miss(a, b, rng))}) + '\n')


if __name__ == '__main__':
  main()
