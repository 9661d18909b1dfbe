"""A trained model back from its run directory (config.json + checkpoint), or from a Hugging Face
folder plus an optional PEFT adapter: what export and generation read."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
from flax import nnx

from ftjax import build, checkpoint, lora, sharding
from ftjax import config as config_lib
from ftjax.errors import UserError
from ftjax.hf import pretrained


class RunDirError(UserError):
  """A run directory's config.json is missing or damaged."""


def read_run(workdir: str) -> config_lib.Resolved:
  """The resolved config a run wrote into its config.json."""
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
  try:
    return config_lib.from_run_json(run)
  except (KeyError, TypeError, ValueError) as e:
    raise RunDirError(f'{path}: not a readable ftjax config.json ({type(e).__name__}: {e}); '
                      'it is written by `ftjax train` and should not be edited') from None


def from_run(workdir: str, r: config_lib.Resolved, *, step: int | None = None,
             dtype: Any = None, mesh: jax.sharding.Mesh | None = None) -> nnx.Module:
  """A run's model with its latest (or `step`) checkpoint restored, fully sharded.

  LoRA adapters stay unmerged on an unquantized base (export merges them; generation uses
  them as they are). `dtype` sets the compute dtype (default: float32).
  """
  mesh = mesh if mesh is not None else sharding.make_mesh((1, -1, 1))
  rules = sharding.get_rules(r.mesh.rules)
  options = dict(param_dtype=config_lib.DTYPES[r.model.param_dtype])
  if dtype is not None:
    options['dtype'] = dtype
  # The run's adapters on its base as it was before quantization (no training dropout).
  adapters = r.lora and dataclasses.replace(r.lora, dropout=0.0, quantize_base=None)
  module, trainable = build.model(r.model.arch, model_options=options, mesh=mesh, rules=rules,
                                  seed=r.train.seed, pretrained_path=r.model.pretrained,
                                  lora_options=adapters)
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
    r = read_run(workdir)
    return (from_run(workdir, r, dtype=dtype, mesh=mesh), r.data.options.tokenizer, mesh,
            sharding.get_rules(r.mesh.rules))
  rules = sharding.get_rules('fsdp_tp')
  cfg = pretrained.read_config(pretrained_path)
  options = {} if dtype is None else dict(dtype=dtype, param_dtype=dtype)
  module, _ = build.model(cfg, model_options=options, mesh=mesh, rules=rules, seed=0,
                          pretrained_path=pretrained_path,
                          lora_options=lora.Options(rank=0, adapter=adapter) if adapter else None)
  return module, pretrained_path, mesh, rules
