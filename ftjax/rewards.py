"""Reward functions for grpo (`objective.rewards`): the built-ins and how a list of them scores
completions on the host.

A reward function is `fn(completion, reference, record, **options) -> float`: the decoded
completion, the record's reference answer (its `reference`, `completion`, `answer` or `output`
field, or the field `options['field']` names), the whole prompt record, and the spec's other
keys. `objective.rewards` lists `{'fn': NAME, 'weight': w, ...options}` with NAME a built-in
(`exact_match`, `regex`, `number`) or `'module:function'`.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ftjax.errors import UserError

REFERENCE_FIELDS = ('reference', 'completion', 'answer', 'output')
_NUMBER = re.compile(r'-?\d+(?:\.\d+)?')
_SPEC_KEYS = ('fn', 'weight', 'name')


class RewardError(UserError):
  """A reward function failed or returned something that is not a finite number."""


def exact_match(completion: str, reference: str, record: dict[str, Any]) -> float:
  """1.0 when the completion equals the reference, ignoring surrounding whitespace."""
  return float(completion.strip() == reference.strip())


def regex(completion: str, reference: str, record: dict[str, Any], *, pattern: str,
          search: bool = False) -> float:
  """1.0 when the stripped completion matches `pattern` whole (or anywhere, with `search`)."""
  match = re.search if search else re.fullmatch
  return float(match(pattern, completion.strip(), flags=re.DOTALL) is not None)


def last_number(text: str) -> float | None:
  """The last number written in `text` (thousands separators ignored), or None."""
  found = _NUMBER.findall(text.replace(',', ''))
  return float(found[-1]) if found else None


def number(completion: str, reference: str, record: dict[str, Any]) -> float:
  """1.0 when the last number in the completion equals the last number in the reference."""
  got, want = last_number(completion), last_number(str(reference))
  return float(got is not None and want is not None and math.isclose(got, want, abs_tol=1e-9))


BUILTINS: dict[str, Callable[..., float]] = dict(exact_match=exact_match, regex=regex,
                                                 number=number)


def resolve(name: str, where: str) -> Callable[..., float]:
  """A built-in by name, or `module:function` imported; ValueError naming `where` if neither."""
  if name in BUILTINS:
    return BUILTINS[name]
  module_name, sep, attr = name.partition(':')
  if not sep or not module_name or not attr:
    raise ValueError(f"{where}: fn={name!r}: expected one of {sorted(BUILTINS)} or "
                     "'module:function'")
  try:
    fn = getattr(importlib.import_module(module_name), attr)
  except (ImportError, AttributeError) as e:
    raise ValueError(f'{where}: fn={name!r}: {e}') from None
  if not callable(fn):
    raise ValueError(f'{where}: fn={name!r} is not callable')
  return fn


def reference_of(record: dict[str, Any], field: str | None = None) -> str:
  """The reference answer of a prompt record (`field`, else the first of REFERENCE_FIELDS)."""
  if field is not None:
    return str(record.get(field, ''))
  for name in REFERENCE_FIELDS:
    if name in record:
      return str(record[name])
  messages = record.get('messages')
  if isinstance(messages, list) and messages and isinstance(messages[-1], dict) and (
      messages[-1].get('role') == 'assistant'):
    return str(messages[-1].get('content', ''))
  return ''


@dataclasses.dataclass(frozen=True)
class Scorer:
  """The reward functions of `objective.rewards`, loaded once."""

  names: tuple[str, ...]
  specs: tuple[dict[str, Any], ...]
  fns: tuple[Callable[..., float], ...]

  @classmethod
  def load(cls, specs: Sequence[dict[str, Any]], names: Sequence[str]) -> Scorer:
    fns = tuple(resolve(s['fn'], f'objective.rewards[{i}]') for i, s in enumerate(specs))
    return cls(tuple(names), tuple(dict(s) for s in specs), fns)

  def score(self, completion: str, record: dict[str, Any], where: str) -> np.ndarray:
    """One completion's rewards, one per function (`[F]` float32).

    Raises:
      RewardError: naming the record (`where`), the function and what went wrong.
    """
    out = np.zeros(len(self.fns), np.float32)
    for i, (spec, fn) in enumerate(zip(self.specs, self.fns, strict=True)):
      options = {k: v for k, v in spec.items() if k not in _SPEC_KEYS}
      field = options.pop('field', None)
      try:
        value = fn(completion, reference_of(record, field), record, **options)
        value = float(value)
      except Exception as e:  # noqa: BLE001 (user code: report which record and function)
        raise RewardError(f'reward {self.names[i]} (fn={spec["fn"]!r}) failed on {where}: '
                          f'{type(e).__name__}: {e}') from None
      if not math.isfinite(value):
        raise RewardError(f'reward {self.names[i]} (fn={spec["fn"]!r}) returned {value} on '
                          f'{where}: rewards must be finite numbers')
      out[i] = value
    return out
