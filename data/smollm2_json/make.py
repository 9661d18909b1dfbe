"""Makes the SmolLM2 demo's task: one sentence about a person -> one line of JSON with fixed keys.

  python data/smollm2_json/make.py   # writes train.jsonl and eval.jsonl next to this file

Deterministic (seeded); names, cities and phrasings are drawn so that held-out sentences are
new combinations, not copies of training ones.
"""

import json
import os
import random

NAMES = ['Maria', 'Ahmed', 'Yuki', 'Lars', 'Chloe', 'Ravi', 'Olga', 'Tomas', 'Amara', 'Chen',
         'Fatima', 'Diego', 'Ingrid', 'Kwame', 'Sofia', 'Mateo', 'Aiko', 'Hugo', 'Leila', 'Noah',
         'Elena', 'Jonas', 'Priya', 'Omar', 'Zoe', 'Ivan', 'Nadia', 'Felix', 'Mina', 'Pablo']
CITIES = ['Lisbon', 'Oslo', 'Nairobi', 'Kyoto', 'Lima', 'Dublin', 'Cairo', 'Toronto', 'Hanoi',
          'Krakow', 'Porto', 'Seoul', 'Quito', 'Accra', 'Munich', 'Austin', 'Perth', 'Riga',
          'Tunis', 'Bogota']
TEMPLATES = [
    '{name} is {age} and lives in {city}.',
    'At {age}, {name} moved to {city} for work.',
    '{city} has been home to {name} since turning {age}.',
    'My neighbour {name}, who is {age}, grew up in {city}.',
    '{name} ({age}) runs a small bakery in {city}.',
    'Last week {name} celebrated a {age}th birthday back in {city}.',
    'In {city} you will often meet {name}, aged {age}.',
    '{name}, {age} years old, teaches music in {city}.',
]
INSTRUCTION = 'Extract the person as JSON.\n'


def record(rng: random.Random) -> dict:
  name, city, age = rng.choice(NAMES), rng.choice(CITIES), rng.randint(18, 89)
  sentence = rng.choice(TEMPLATES).format(name=name, age=age, city=city)
  answer = json.dumps({'name': name, 'age': age, 'city': city})
  return {'messages': [{'role': 'user', 'content': INSTRUCTION + sentence},
                       {'role': 'assistant', 'content': answer}]}


def main() -> None:
  rng = random.Random(0)
  here = os.path.dirname(os.path.abspath(__file__))
  seen, rows = set(), []
  while len(rows) < 1100:
    r = record(rng)
    key = r['messages'][0]['content']
    if key not in seen:
      seen.add(key)
      rows.append(r)
  for name, part in (('train.jsonl', rows[:1000]), ('eval.jsonl', rows[1000:])):
    with open(os.path.join(here, name), 'w', encoding='utf-8') as f:
      f.writelines(json.dumps(r) + '\n' for r in part)


if __name__ == '__main__':
  main()
