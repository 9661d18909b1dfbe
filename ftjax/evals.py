"""Generation-based evaluation during training: greedy completions of held-out prompts, scored.

The prompts file is JSONL: `{"prompt": ..., "reference": ...}` (or `"completion"`), alpaca
records, or chat `{"messages": [...]}` whose last assistant turn is the reference. Prompts are
tokenized exactly as training tokenizes them (`data.formats.Encoder.prompt`).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Callable, Mapping
from typing import Any

import jax

from ftjax import generation
from ftjax.data import formats

# A score is a float, or named floats ({'valid': 1.0, 'exact': 0.0}): the first is
# `eval_generation_score`, and each is also logged as `eval_generation_<name>`.
Score = Callable[[str, str], float | Mapping[str, float]]


def exact_match(prediction: str, reference: str) -> float:
  """1.0 when the completion equals the reference, ignoring surrounding whitespace."""
  return float(prediction.strip() == reference.strip())


def score_function(name: str) -> Score:
  """'exact_match', or 'module.path:function' taking (prediction, reference) -> a float, or a
  dict of named floats (several scores of one completion, e.g. format validity and exact match).

  Raises:
    ValueError: the name does not resolve to a callable (the message says why).
  """
  if name == 'exact_match':
    return exact_match
  module_name, sep, attr = name.partition(':')
  if not sep or not module_name or not attr:
    raise ValueError(f"eval.score_fn={name!r}: expected 'exact_match' or 'module:function'")
  try:
    fn = getattr(importlib.import_module(module_name), attr)
  except (ImportError, AttributeError) as e:
    raise ValueError(f'eval.score_fn={name!r}: {e}') from None
  if not callable(fn):
    raise ValueError(f'eval.score_fn={name!r} is not callable')
  return fn


@dataclasses.dataclass
class GenerationEval:
  """Held-out prompts with references, and how to complete and score them."""

  prompts: list[list[int]]
  references: list[str]
  decode: Callable[[list[int]], str]
  stop_ids: list[int]
  score: Score
  max_new_tokens: int
  batch_size: int
  num_samples: int

  @classmethod
  def load(cls, path: str, encoder: formats.Encoder, *, score_fn: str, max_new_tokens: int,
           batch_size: int, num_samples: int, max_examples: int = -1) -> GenerationEval:
    """Reads and tokenizes the prompts file (a bad line raises ValueError naming it)."""
    prompts, references = [], []
    with open(path, encoding='utf-8') as f:
      for number, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          ids, reference = encoder.prompt(json.loads(line))
        except (json.JSONDecodeError, formats.BadRecord) as e:
          raise ValueError(f'eval.generate_path {path}:{number}: {e}') from None
        prompts.append(ids)
        references.append(reference)
        if len(prompts) == max_examples:
          break
    if not prompts:
      raise ValueError(f'eval.generate_path {path}: no prompts')
    tok = encoder.tokenizer
    return cls(prompts=prompts, references=references, decode=tok.decode, stop_ids=[tok.eos_id],
               score=score_function(score_fn), max_new_tokens=max_new_tokens,
               batch_size=batch_size, num_samples=num_samples)

  def run(self, model: Any, mesh: jax.sharding.Mesh, rules: dict) -> dict[str, Any]:
    """`eval_generation_score` (mean over prompts; with named scores also each one as
    `eval_generation_<name>`) and the first `num_samples` completions."""
    results = generation.complete(model, self.prompts, batch_size=self.batch_size,
                                  stop_ids=self.stop_ids, decode=self.decode, mesh=mesh,
                                  rules=rules, max_new_tokens=self.max_new_tokens)
    scores = [self.score(r['completion'], ref)
              for r, ref in zip(results, self.references, strict=True)]
    named = isinstance(scores[0], Mapping)
    if not named:
      scores = [{'score': s} for s in scores]
    means = {k: sum(float(s[k]) for s in scores) / len(scores) for k in scores[0]}
    samples = [dict(prompt=self.decode(p), completion=r['completion'], reference=ref)
               for p, r, ref in zip(self.prompts, results, self.references, strict=False)]
    out = dict(eval_generation_score=next(iter(means.values())),
               eval_samples=samples[:self.num_samples])
    if named:
      out.update({f'eval_generation_{k}': v for k, v in means.items()})
    return out
