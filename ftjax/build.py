"""The model a run trains: a sharded base (random init or a Hugging Face folder) plus LoRA.

Used by training and by export, so both rebuild exactly the same module structure.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from ftjax import lora, pretrained, sharding
from ftjax.models import llama


def model(arch: llama.Config, *, model_options: dict[str, Any], mesh: jax.sharding.Mesh,
          rules: dict, seed: int, pretrained_path: str = '',
          lora_options: dict[str, Any] | None = None) -> tuple[nnx.Module, type]:
  """The sharded model and the variable type that is trained (Param, or LoRAParam)."""
  with sharding.use(mesh, rules):
    if pretrained_path:
      graphdef, abstract = pretrained.abstract_model(arch, **model_options)
      module = nnx.merge(graphdef, pretrained.load_params(pretrained_path, arch, abstract, mesh,
                                                          rules))
    else:
      module = sharding.create_sharded(
          lambda: llama.Llama(arch, rngs=nnx.Rngs(seed), **model_options), mesh, rules)
  if not lora_options or not lora_options['rank']:
    return module, nnx.Param
  lora.apply(module, rank=lora_options['rank'], alpha=lora_options['alpha'],
             targets=lora_options['targets'], use_rslora=lora_options['use_rslora'],
             use_dora=lora_options['use_dora'], seed=seed)
  return module, nnx.LoRAParam
