"""The model a run trains: a sharded base (random init or a Hugging Face folder) plus LoRA.

Used by training and by export, so both rebuild exactly the same module structure.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
from flax import nnx

from ftjax import checkpoint, lora, peft_io, pretrained, quantize, sharding, tokenizer
from ftjax.errors import UserError
from ftjax.models import llama


class RunDirError(UserError):
  """A run directory's config.json is missing or damaged."""


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
    peft_io.load(module, lora_options['adapter'], dropout=lora_options.get('dropout', 0.0))
  else:
    lora.apply(module, rank=lora_options['rank'], alpha=lora_options['alpha'],
               targets=lora_options['targets'], use_rslora=lora_options['use_rslora'],
               use_dora=lora_options['use_dora'], dropout=lora_options.get('dropout', 0.0),
               seed=seed)
  # Adapters are small and made on one device; lay them out like their base kernels.
  adapters = nnx.state(module, nnx.LoRAParam)
  nnx.update(module, jax.device_put(adapters, sharding.state_shardings(adapters, mesh, rules)))
  return module, nnx.LoRAParam


def abstract_model(arch: llama.Config, *, model_options: dict[str, Any], seed: int = 0,
                   lora_options: dict[str, Any] | None = None) -> tuple[nnx.Module, type]:
  """The same module as `model` (random base, LoRA applied) as shapes only: nothing allocated.

  For ahead-of-time compilation; a PEFT `adapter` is replaced by fresh adapters of
  `lora_options['rank']`, which have the same shapes when the ranks agree.
  """

  def make():
    module = llama.Llama(arch, rngs=nnx.Rngs(seed), **model_options)
    if lora_options:
      if lora_options.get('quantize_base'):
        quantize.apply(module, lora_options['quantize_base'])
      lora.apply(module, rank=lora_options['rank'], alpha=lora_options['alpha'],
                 targets=lora_options['targets'], use_rslora=lora_options['use_rslora'],
                 use_dora=lora_options['use_dora'], dropout=lora_options.get('dropout', 0.0),
                 seed=seed)
    return module

  return nnx.eval_shape(make), (nnx.LoRAParam if lora_options else nnx.Param)


def read_run(workdir: str) -> dict[str, Any]:
  """The config.json a run wrote (its config plus the resolved architecture)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{workdir!r} holds no config.json: not an ftjax run directory')
  try:
    with open(path, encoding='utf-8') as f:
      run = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise RunDirError(f'{path}: not a readable ftjax config.json ({e}); it is written by '
                      '`ftjax train` and should not be edited') from None
  if not isinstance(run, dict) or 'resolved_model' not in run:
    raise RunDirError(f'{path}: not an ftjax config.json (no "resolved_model" key)')
  return run


def run_lora_options(run: dict[str, Any]) -> dict[str, Any] | None:
  """A run's adapters, for rebuilding it; None for full fine-tuning."""
  c_lora = run['lora']
  if not (c_lora['rank'] or c_lora.get('adapter')):
    return None
  return dict(rank=c_lora['rank'], alpha=c_lora['alpha'], targets=c_lora['targets'],
              use_rslora=c_lora['use_rslora'], use_dora=c_lora['use_dora'],
              adapter=c_lora.get('adapter', ''))


def run_tokenizer(run: dict[str, Any]) -> str:
  """The tokenizer spec a run trained with."""
  return run['data']['tokenizer'] or run['model']['pretrained'] or tokenizer.BYTE


def from_run(workdir: str, run: dict[str, Any], *, step: int | None = None,
             dtype: Any = None, mesh: jax.sharding.Mesh | None = None) -> nnx.Module:
  """A run's model with its latest (or `step`) checkpoint restored, fully sharded.

  LoRA adapters stay unmerged on an unquantized base (export merges them; generation uses
  them as they are). `dtype` sets the compute dtype (default: float32).
  """
  cfg = llama.Config(**run['resolved_model'])
  mesh = mesh if mesh is not None else sharding.make_mesh((1, -1, 1))
  rules = sharding.get_rules(run['mesh']['rules'])
  options = dict(param_dtype=pretrained.DTYPES[run['model']['param_dtype']])
  if dtype is not None:
    options['dtype'] = dtype
  module, trainable = model(cfg, model_options=options, mesh=mesh, rules=rules,
                            seed=run['train']['seed'], pretrained_path=run['model']['pretrained'],
                            lora_options=run_lora_options(run))
  current = nnx.state(module, trainable)
  shardings = jax.tree.map(lambda x: x.sharding, current)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), current)
  nnx.update(module, checkpoint.restore_params(workdir, abstract, shardings, step))
  return module


def for_generation(*, pretrained_path: str = '', adapter: str = '', workdir: str = '',
                   dtype: Any = None, mesh: jax.sharding.Mesh | None = None
                   ) -> tuple[nnx.Module, str, jax.sharding.Mesh, dict]:
  """The model to sample from (a run's checkpoint, or a Hugging Face folder plus an optional
  PEFT adapter), its tokenizer spec, and the mesh and rules it is laid out by."""
  mesh = mesh if mesh is not None else sharding.make_mesh((1, -1, 1))
  if workdir:
    run = read_run(workdir)
    return (from_run(workdir, run, dtype=dtype, mesh=mesh), run_tokenizer(run), mesh,
            sharding.get_rules(run['mesh']['rules']))
  rules = sharding.get_rules('fsdp_tp')
  cfg = pretrained.read_config(pretrained_path)
  options = {} if dtype is None else dict(dtype=dtype, param_dtype=dtype)
  module, _ = model(cfg, model_options=options, mesh=mesh, rules=rules, seed=0,
                    pretrained_path=pretrained_path,
                    lora_options=dict(adapter=adapter) if adapter else None)
  return module, pretrained_path, mesh, rules
