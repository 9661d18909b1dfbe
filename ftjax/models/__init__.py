"""Model families and their presets."""

from __future__ import annotations

import dataclasses
from typing import Any

from ftjax.models import llama

PRESETS = dict(llama.PRESETS)


def config_from_preset(preset: str, overrides: dict[str, Any] | None = None) -> llama.Config:
  """The architecture of `preset` with the non-None `overrides` applied on top.

  Raises:
    KeyError: the preset or an override key is unknown (the message names it).
  """
  if preset not in PRESETS:
    raise KeyError(
        f'model.preset={preset!r} is not a known preset; choose one of {sorted(PRESETS)}')
  cfg = PRESETS[preset]
  overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
  fields = {f.name for f in dataclasses.fields(cfg)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise KeyError(f'model.{unknown[0]} is not an architecture field; known: {sorted(fields)}')
  return dataclasses.replace(cfg, **overrides)
