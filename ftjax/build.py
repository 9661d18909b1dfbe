"""The model a run trains: a sharded base (random init or a Hugging Face folder) plus LoRA.

Used by training and by export, so both rebuild exactly the same module structure.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from ftjax import lora, models, peft_io, quantize, sharding
from ftjax.hf import pretrained


def model(arch: Any, *, model_options: dict[str, Any], mesh: jax.sharding.Mesh, rules: dict,
          seed: int, pretrained_path: str = '',
          lora_options: lora.Options | None = None) -> tuple[nnx.Module, type]:
  """The sharded model and the variable type that is trained (Param, or LoRAParam)."""
  with sharding.use(mesh, rules):
    if pretrained_path:
      graphdef, abstract = pretrained.abstract_model(arch, **model_options)
      module = nnx.merge(graphdef, pretrained.load_params(pretrained_path, arch, abstract, mesh,
                                                          rules))
    else:
      module = sharding.create_sharded(
          lambda: models.create(arch, seed=seed, **model_options), mesh, rules)
  if not lora_options:
    return module, nnx.Param
  if lora_options.quantize_base:
    quantize.apply(module, lora_options.quantize_base)
    frozen = nnx.state(module, quantize.Quantized)
    nnx.update(module, jax.device_put(frozen, sharding.state_shardings(frozen, mesh, rules)))
  if lora_options.adapter:
    # Continue training a PEFT adapter.
    peft_io.load(module, lora_options.adapter, dropout=lora_options.dropout)
  else:
    lora.apply_options(module, lora_options, seed=seed)
  # Adapters are small and made on one device; lay them out like their base kernels.
  adapters = nnx.state(module, nnx.LoRAParam)
  nnx.update(module, jax.device_put(adapters, sharding.state_shardings(adapters, mesh, rules)))
  return module, nnx.LoRAParam


def abstract_model(arch: Any, *, model_options: dict[str, Any], seed: int = 0,
                   lora_options: lora.Options | None = None) -> tuple[nnx.Module, type]:
  """The same module as `model` (random base, LoRA applied) as shapes only: nothing allocated.

  For ahead-of-time compilation; a PEFT `adapter` is replaced by fresh adapters of
  `lora_options.rank`, which have the same shapes when the ranks agree.
  """

  def make():
    module = models.create(arch, seed=seed, **model_options)
    if lora_options:
      if lora_options.quantize_base:
        quantize.apply(module, lora_options.quantize_base)
      lora.apply_options(module, lora_options, seed=seed)
    return module

  return nnx.eval_shape(make), (nnx.LoRAParam if lora_options else nnx.Param)
