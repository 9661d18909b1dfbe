"""The model a run trains: a sharded base (random init or a Hugging Face folder) plus LoRA.

Used by training and by export, so both rebuild exactly the same module structure.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from ftjax import lora, pretrained, quantize, sharding
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
  if not lora_options:
    return module, nnx.Param
  if lora_options.get('quantize_base'):
    quantize.apply(module, lora_options['quantize_base'])
    frozen = nnx.state(module, quantize.Quantized)
    nnx.update(module, jax.device_put(frozen, sharding.state_shardings(frozen, mesh, rules)))
  if lora_options.get('adapter'):
    # Continue training a PEFT adapter.
    lora.load_peft(module, lora_options['adapter'], dropout=lora_options.get('dropout', 0.0))
  else:
    lora.apply(module, rank=lora_options['rank'], alpha=lora_options['alpha'],
               targets=lora_options['targets'], use_rslora=lora_options['use_rslora'],
               use_dora=lora_options['use_dora'], dropout=lora_options.get('dropout', 0.0),
               seed=seed)
  # Adapters are small and made on one device; lay them out like their base kernels.
  adapters = nnx.state(module, nnx.LoRAParam)
  nnx.update(module, jax.device_put(adapters, sharding.state_shardings(adapters, mesh, rules)))
  return module, nnx.LoRAParam
