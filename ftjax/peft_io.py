"""PEFT adapter folders in and out: `adapter_config.json` + `adapter_model.safetensors` <-> the
LoRA adapters `ftjax.lora` puts on a model (stacked over layers here, one tensor per layer
there)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from ftjax import lora
from ftjax.errors import UserError


class PeftError(UserError):
  """A PEFT adapter folder ftjax cannot use (the message names the folder and what is wrong)."""


def _hf_modules(model: nnx.Module) -> dict[str, str]:
  """Module path -> Hugging Face module name, from the model's family."""
  from ftjax import models

  return models.family_of(model.cfg).PEFT_MODULES


def save(model: nnx.Module, out_dir: str, *, base_model: str = '') -> None:
  """Writes a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors)."""
  import json
  import os

  import numpy as np
  from jax.experimental import multihost_utils
  from safetensors.numpy import save_file

  found, hf_modules = lora.adapters(model), _hf_modules(model)
  experts = sorted(n for n, node in found.items() if isinstance(node, lora.LoRAGrouped))
  if experts:
    raise PeftError(f'adapters on mixture-of-experts projections ({", ".join(experts)}) have no '
                    'PEFT format ftjax writes (transformers stores the experts as one fused '
                    'parameter, not as Linear modules); export the merged model with --format hf, '
                    'or adapt attention only (lora.targets=q,k,v,o)')
  first = next(iter(found.values()))
  rank, use_dora = first.rank, first.use_dora
  tensors = {}

  def host(x):
    return np.asarray(multihost_utils.process_allgather(x, tiled=True), np.float32)

  for name, node in found.items():
    module = hf_modules[name]
    a, b = host(node.a.get_value()), host(node.b.get_value())
    for i in range(a.shape[0]):
      key = f'base_model.model.model.layers.{i}.{module}'
      tensors[f'{key}.lora_A.weight'] = np.ascontiguousarray(a[i].reshape(-1, rank).T)
      tensors[f'{key}.lora_B.weight'] = np.ascontiguousarray(b[i].reshape(rank, -1).T)
      if use_dora:
        tensors[f'{key}.lora_magnitude_vector'] = host(node.magnitude.get_value())[i].reshape(-1)
  config = {
      'peft_type': 'LORA', 'task_type': 'CAUSAL_LM', 'r': rank,
      'lora_alpha': first.alpha, 'use_rslora': first.use_rslora, 'use_dora': use_dora,
      'lora_dropout': 0.0, 'bias': 'none', 'fan_in_fan_out': False,
      'target_modules': sorted({hf_modules[n].split('.')[-1] for n in found}),
      'base_model_name_or_path': base_model or None, 'inference_mode': True,
  }
  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, 'adapter_model.safetensors'),
              metadata={'format': 'pt'})
    with open(os.path.join(out_dir, 'adapter_config.json'), 'w') as f:
      json.dump(config, f, indent=2)


def read_config(adapter_dir: str, hf_modules: dict[str, str]) -> lora.Options:
  """The LoRA settings of a PEFT adapter folder (`hf_modules`: the family's PEFT_MODULES)."""
  import json
  import os

  with open(os.path.join(adapter_dir, 'adapter_config.json')) as f:
    config = json.load(f)
  if config.get('peft_type') != 'LORA':
    raise PeftError(f"{adapter_dir}: peft_type {config.get('peft_type')!r} is not LORA")
  short = {v.split('.')[-1]: k.split('.')[-1] for k, v in hf_modules.items()}
  targets = config['target_modules']
  targets = list(short) if targets == 'all-linear' else targets
  unknown = sorted(set(targets) - set(short))
  if unknown or config.get('rank_pattern') or config.get('alpha_pattern'):
    raise PeftError(f'{adapter_dir}: unsupported adapter (modules {unknown}, or per-module '
                     'rank/alpha patterns)')
  return lora.Options(rank=config['r'], alpha=float(config['lora_alpha']),
                      targets=tuple(short[t] for t in targets),
                      use_rslora=bool(config.get('use_rslora')),
                      use_dora=bool(config.get('use_dora')))


def load(model: nnx.Module, adapter_dir: str, *, dropout: float = 0.0) -> None:
  """Applies the PEFT adapter in `adapter_dir` to `model` (which holds the matching base)."""
  import os

  import numpy as np
  from safetensors.numpy import load_file

  hf_modules = _hf_modules(model)
  settings = dataclasses.replace(read_config(adapter_dir, hf_modules), dropout=dropout)
  lora.apply_options(model, settings)
  tensors = load_file(os.path.join(adapter_dir, 'adapter_model.safetensors'))
  tensors = {k.replace('.default', ''): v for k, v in tensors.items()}
  rank = settings.rank
  for name, node in lora.adapters(model).items():
    layers_n = node.a.shape[0]
    keys = [f'base_model.model.model.layers.{i}.{hf_modules[name]}' for i in range(layers_n)]
    try:
      a = np.stack([tensors[f'{k}.lora_A.weight'].T for k in keys])
      b = np.stack([tensors[f'{k}.lora_B.weight'].T for k in keys])
    except KeyError as e:
      raise PeftError(f'{adapter_dir}: adapter tensor {e.args[0]!r} is missing') from None
    node.a.set_value(jnp.asarray(a.reshape(node.a.shape), node.a.get_value().dtype))
    node.b.set_value(jnp.asarray(b.reshape(layers_n, rank, *node.b.shape[2:]),
                                 node.b.get_value().dtype))
    if settings.use_dora:
      m = np.stack([tensors[f'{k}.lora_magnitude_vector'] for k in keys])
      node.magnitude.set_value(jnp.asarray(m.reshape(node.magnitude.shape),
                                           node.magnitude.get_value().dtype))
