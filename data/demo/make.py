"""Writes the demo's synthetic instruction task: two-digit addition, as prompt/completion JSONL.

  python data/demo/make.py   # rewrites train.jsonl and eval.jsonl next to this file

Train and eval pairs are disjoint, so held-out accuracy measures generalisation.
"""

import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))


def main(num_eval: int = 200, seed: int = 0) -> None:
  pairs = [(a, b) for a in range(100) for b in range(100)]
  random.Random(seed).shuffle(pairs)
  splits = {'eval.jsonl': pairs[:num_eval], 'train.jsonl': pairs[num_eval:]}
  for name, rows in splits.items():
    with open(os.path.join(HERE, name), 'w') as f:
      for a, b in rows:
        f.write(json.dumps({'prompt': f'{a}+{b}=', 'completion': str(a + b)}) + '\n')


if __name__ == '__main__':
  main()
