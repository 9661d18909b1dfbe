"""The model registry: architecture name -> family module; `create` builds any registered model.

A family module (llama.py is one) defines `Config` (a frozen dataclass), `PRESETS`, `Model`
(an `nnx.Module` taking `(cfg, *, rngs, dtype, param_dtype, remat, attention_impl)`), `KVCache`,
`LORA_TARGETS`, `PEFT_MODULES`, `HF_MODEL_TYPES`, `config_from_hf`, `config_to_hf` and
`hf_tensors`. Adding a family is one such file plus a line in `FAMILIES` (docs/adding_a_model.md).
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any

from flax import nnx

from ftjax.models import llama

FAMILIES: dict[str, types.ModuleType] = {'llama': llama}
PRESETS: dict[str, Any] = {name: cfg for family in FAMILIES.values()
                           for name, cfg in family.PRESETS.items()}
REQUIRED = ('Config', 'PRESETS', 'Model', 'KVCache', 'LORA_TARGETS', 'PEFT_MODULES',
            'HF_MODEL_TYPES', 'config_from_hf', 'config_to_hf', 'hf_tensors')


def family(arch: str) -> types.ModuleType:
  """The family module registered as `arch`."""
  if arch not in FAMILIES:
    raise KeyError(f'model architecture {arch!r} is not registered; known: {sorted(FAMILIES)}')
  return FAMILIES[arch]


def arch_of(cfg: Any) -> str:
  """The registry name of the family whose `Config` `cfg` is."""
  for name, module in FAMILIES.items():
    if type(cfg) is module.Config:
      return name
  raise TypeError(f'{type(cfg).__qualname__} is not the Config of a registered model family')


def family_of(cfg: Any) -> types.ModuleType:
  return FAMILIES[arch_of(cfg)]


def create(cfg: Any, *, seed: int = 0, **options: Any) -> nnx.Module:
  """The model `cfg` describes, initialised from `seed` (options: dtype, param_dtype, remat,
  attention_impl)."""
  return family_of(cfg).Model(cfg, rngs=nnx.Rngs(seed), **options)


def config_from_dict(arch: str, fields: dict[str, Any]) -> Any:
  """A family's `Config` from its fields (as `dataclasses.asdict` wrote them)."""
  return family(arch).Config(**fields)


def config_from_hf(hf: dict[str, Any]) -> Any:
  """The architecture of a Hugging Face config.json dict, from the family that reads its type."""
  from ftjax.errors import CheckpointError

  model_type = hf.get('model_type')
  for module in FAMILIES.values():
    if model_type in module.HF_MODEL_TYPES:
      return module.config_from_hf(hf)
  supported = [t for module in FAMILIES.values() for t in module.HF_MODEL_TYPES]
  hint = ' (use the text-only gemma3_text checkpoint)' if model_type == 'gemma3' else ''
  raise CheckpointError(f'config.json: model_type {model_type!r} is not supported{hint}; '
                        f'supported: {supported}')


def config_from_preset(preset: str, overrides: dict[str, Any] | None = None) -> Any:
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
