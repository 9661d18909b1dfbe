"""The Python API for Hugging Face folders: load_pretrained, load_tokenizer, save_pretrained."""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ftjax import models, sharding, tokenizer
from ftjax.errors import CheckpointError
from ftjax.hf import weights

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def abstract_model(cfg: Any, **options: Any) -> tuple[Any, Any]:
  """The graph and the abstract (shape-only) state of a model, allocating nothing."""
  return nnx.split(nnx.eval_shape(lambda: models.create(cfg, **options)))


def load_params(path: str, cfg: Any, abstract_state: Any, mesh: jax.sharding.Mesh,
                rules: dict) -> Any:
  """The checkpoint's weights as sharded arrays laid out by `rules` on `mesh`."""
  shardings = sharding.state_shardings(abstract_state, mesh, rules)
  folder = weights.open_checkpoint(path)
  try:
    return weights.load_state(folder, cfg, abstract_state, shardings)
  finally:
    folder.close()


def read_config(path: str) -> Any:
  """The ftjax architecture of the Hugging Face folder (or GGUF file) `path`."""
  return models.config_from_hf(weights.open_checkpoint(path).hf_config)


def max_context(path: str) -> int | None:
  """The longest sequence a Hugging Face folder's (or GGUF file's) model was trained for
  (`max_position_embeddings`, `<arch>.context_length`), or None when it does not say."""
  try:
    value = weights.open_checkpoint(path).hf_config.get('max_position_embeddings')
  except (OSError, ValueError, CheckpointError):
    return None
  return int(value) if isinstance(value, int) and value > 0 else None


def load_pretrained(path: str, dtype: str | Any = 'float32',
                    mesh: jax.sharding.Mesh | None = None, rules: str = 'fsdp_tp') -> nnx.Module:
  """A model with the weights of the Hugging Face folder `path`; `model(input_ids)` -> logits.

  Args:
    path: folder with config.json and *.safetensors (an index for several shards), or a
      llama.cpp `.gguf` file (dequantized to `dtype`).
    dtype: parameter and compute dtype ('float32', 'bfloat16' or a jnp dtype).
    mesh: where to place the weights; default: all devices, fully sharded (FSDP).
    rules: the logical-to-mesh rule set (`ftjax.sharding.RULES`).
  """
  dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
  mesh = mesh if mesh is not None else sharding.make_mesh((1, -1, 1))
  folder = weights.open_checkpoint(path)
  cfg = models.config_from_hf(folder.hf_config)
  graphdef, abstract = abstract_model(cfg, dtype=dtype, param_dtype=dtype)
  shardings = sharding.state_shardings(abstract, mesh, sharding.get_rules(rules))
  try:
    return nnx.merge(graphdef, weights.load_state(folder, cfg, abstract, shardings))
  finally:
    folder.close()


def load_tokenizer(path: str) -> tokenizer.Tokenizer:
  """The tokenizer of a Hugging Face folder (tokenizer.json), or the built-in 'byte' one."""
  return tokenizer.load(path)


def save_pretrained(model: nnx.Module, out_dir: str, *, dtype: str = 'bfloat16',
                    tokenizer_dir: str | None = None) -> None:
  """Writes `model` as a Hugging Face folder that `transformers` and vLLM load."""
  weights.save(nnx.state(model, nnx.Param), model.cfg, out_dir, dtype=dtype,
               tokenizer_dir=tokenizer_dir if tokenizer_dir and os.path.isdir(tokenizer_dir)
               else None)

