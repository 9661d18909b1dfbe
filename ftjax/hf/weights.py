"""Hugging Face safetensors folders <-> sharded ftjax parameters, by each family's tensor map.

Loading streams tensor slices straight into sharded `jax.Array`s: every device shard is
read from the memory-mapped safetensors files with `get_slice`, so a host only touches the
bytes its devices hold. Export gathers one tensor (one layer) at a time. Nothing here runs
code from a checkpoint folder (no pickle, no `trust_remote_code`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from ftjax import models
from ftjax.errors import CheckpointError

TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json',
                   'tokenizer.model', 'generation_config.json', 'chat_template.jinja')
INDEX = 'model.safetensors.index.json'
SAVE_DTYPES = {'float32': np.float32, 'bfloat16': jnp.bfloat16, 'float16': np.float16}


def _names(keypath) -> tuple[str, ...]:
  return tuple(str(k.key) for k in keypath if isinstance(k, jax.tree_util.DictKey))


# ---------------------------------------------------------------------------- reading


def open_checkpoint(path: str) -> Any:
  """A Hugging Face folder, or a llama.cpp `.gguf` file read as one (same reading interface)."""
  from ftjax.hf import gguf_file

  if path.endswith(gguf_file.SUFFIX):
    return gguf_file.GgufCheckpoint(path)
  return Folder(path)


class Folder:
  """A Hugging Face model folder, read lazily through memory-mapped safetensors."""

  def __init__(self, path: str):
    self.path = path
    if not os.path.isdir(path):
      raise CheckpointError(f'{path}: not a folder (expected a Hugging Face model folder)')
    config_path = os.path.join(path, 'config.json')
    if not os.path.isfile(config_path):
      raise CheckpointError(f'{path}: no config.json')
    with open(config_path) as f:
      self.hf_config = json.load(f)
    index_path = os.path.join(path, INDEX)
    if os.path.isfile(index_path):
      with open(index_path) as f:
        self.weight_map: dict[str, str] = json.load(f)['weight_map']
    elif os.path.isfile(os.path.join(path, 'model.safetensors')):
      with self._open('model.safetensors') as f:
        self.weight_map = dict.fromkeys(f.keys(), 'model.safetensors')
    else:
      pickled = [n for n in os.listdir(path) if n.endswith(('.bin', '.pt', '.pth'))]
      hint = (f' Found {pickled}: ftjax never unpickles checkpoints; convert them to '
              'safetensors first (e.g. `transformers` save_pretrained(..., safe_serialization='
              'True)).' if pickled else '')
      raise CheckpointError(f'{path}: no model.safetensors or {INDEX}.{hint}')
    self._handles: dict[str, Any] = {}

  def _open(self, filename: str):
    full = os.path.join(self.path, filename)
    if not os.path.isfile(full):
      raise CheckpointError(f'{full}: listed in {INDEX} but missing')
    try:
      return safe_open(full, framework='numpy')
    except (SafetensorError, OSError) as e:
      raise CheckpointError(f'{full}: unreadable safetensors file ({e}); '
                            'is it truncated or still downloading?') from None

  def _handle(self, name: str):
    if name not in self.weight_map:
      raise CheckpointError(f'{self.path}: tensor {name!r} not found in the checkpoint')
    filename = self.weight_map[name]
    if filename not in self._handles:
      self._handles[filename] = self._open(filename).__enter__()
    return self._handles[filename], filename

  def close(self) -> None:
    """Closes the safetensors files read so far (their memory maps with them)."""
    for handle in self._handles.values():
      handle.__exit__(None, None, None)
    self._handles.clear()

  def shape(self, name: str) -> tuple[int, ...]:
    handle, _ = self._handle(name)
    return tuple(handle.get_slice(name).get_shape())

  def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
    handle, filename = self._handle(name)
    try:
      return np.asarray(handle.get_slice(name)[index])
    except (SafetensorError, OSError, ValueError) as e:
      raise CheckpointError(f'{os.path.join(self.path, filename)}: cannot read tensor {name!r} '
                            f'({e}); the file may be truncated') from None


def _stacked(key: tuple[str, ...], tensor: Any) -> int:
  """How many leading axes of the ftjax array index separate HF tensors: the layer ('{i}',
  for parameters under `blocks`) and the expert ('{e}', for a mixture of experts)."""
  return (key[0] == 'blocks') + ('{e}' in tensor.hf_name)


def _pieces(tensor: Any, ranges: Sequence[range]) -> list[tuple[tuple[int, ...], str]]:
  """(position in the block, HF tensor name) of every HF tensor in the block of the leading
  axes (layer, expert) that `ranges` select."""
  return [(at, tensor.hf_name.format(**{c: r[j] for c, r, j in zip('ie', ranges, at,
                                                                    strict=False)}))
          for at in np.ndindex(*(len(r) for r in ranges))]


def _every(shape: Sequence[int]) -> list[range]:
  """Ranges over the whole of each leading axis of `shape`."""
  return [range(n) for n in shape]


def check_tensors(folder: Folder, cfg: Any, abstract_state: Any) -> None:
  """Every tensor exists with the shape `cfg` implies, and the checkpoint has no others."""
  tmap = models.family_of(cfg).hf_tensors(cfg)
  expected: set[str] = set()
  for path, var in jax.tree_util.tree_leaves_with_path(
      abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    key = _names(path)
    tensor, shape = tmap[key], tuple(var.get_value().shape)
    lead = _stacked(key, tensor)
    want = tensor.hf_shape(shape[lead:])
    for _, name in _pieces(tensor, _every(shape[:lead])):
      expected.add(name)
      found = folder.shape(name)
      if found != want:
        raise CheckpointError(
            f'{os.path.join(folder.path, folder.weight_map[name])}: tensor {name!r} has shape '
            f'{found}, but config.json implies {want}')
  ignorable = {'lm_head.weight'} if cfg.tie_embeddings else set()
  extra = sorted(set(folder.weight_map) - expected - ignorable)
  if extra:
    raise CheckpointError(f'{folder.path}: tensors ftjax does not know how to use, so the model '
                          f'would be wrong without them: {extra[:5]}'
                          f'{" ..." if len(extra) > 5 else ""}')


def load_state(folder: Folder, cfg: Any, abstract_state: Any, shardings: Any) -> Any:
  """The model state, built shard by shard from the checkpoint into sharded arrays."""
  check_tensors(folder, cfg, abstract_state)
  tmap = models.family_of(cfg).hf_tensors(cfg)

  def one(path, var, sharding_var):
    key = _names(path)
    tensor = tmap[key]
    shape, dtype = tuple(var.get_value().shape), var.get_value().dtype
    lead = _stacked(key, tensor)

    def callback(index):
      ranges = [range(*i.indices(n)) for i, n in zip(index[:lead], shape[:lead], strict=True)]
      pieces = [tensor.read(lambda i, name=name: folder.read(name, i), index[lead:], shape[lead:])
                for _, name in _pieces(tensor, ranges)]
      if not lead:
        return pieces[0].astype(dtype)
      return np.stack(pieces).reshape(*(len(r) for r in ranges), *pieces[0].shape).astype(dtype)

    return var.replace(jax.make_array_from_callback(shape, sharding_var.get_value(), callback))

  return jax.tree_util.tree_map_with_path(
      one, abstract_state, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))


# ---------------------------------------------------------------------------- writing


def layout(params: Any, cfg: Any) -> list[tuple[str, tuple[int, ...]]]:
  """(Hugging Face name, HF shape) of every tensor `gathered` yields, in the same order, from
  the arrays' shapes alone (nothing is gathered): what a writer that puts an index before the
  data (GGUF) needs up front."""
  tmap = models.family_of(cfg).hf_tensors(cfg)
  out = []
  for path, var in jax.tree_util.tree_leaves_with_path(
      params, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    key = _names(path)
    tensor, shape = tmap[key], tuple(var.get_value().shape)
    lead = _stacked(key, tensor)
    out += [(name, tensor.hf_shape(shape[lead:]))
            for _, name in _pieces(tensor, _every(shape[:lead]))]
  return out


def gathered(params: Any, cfg: Any) -> Iterator[tuple[str, np.ndarray]]:
  """(Hugging Face name, float32 host array in HF layout), one tensor (one layer) at a time.

  Every process must iterate (the gathers are collective).
  """
  tmap = models.family_of(cfg).hf_tensors(cfg)
  for path, var in jax.tree_util.tree_leaves_with_path(
      params, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    key = _names(path)
    tensor, x = tmap[key], var.get_value()
    lead = _stacked(key, tensor)
    for at, name in _pieces(tensor, _every(x.shape[:lead])):
      piece = x[at] if at else x
      host = np.asarray(multihost_utils.process_allgather(piece, tiled=True))
      yield name, tensor.to_hf(host)


def save(params: Any, cfg: Any, out_dir: str, *, dtype: str = 'bfloat16',
         tokenizer_dir: str | None = None, max_shard_bytes: int = 2 << 30) -> None:
  """Writes a Hugging Face folder: config.json, sharded safetensors + index, tokenizer files.

  Every process must call this (gathers are collective); process 0 writes. Tensors are
  gathered one at a time (one layer of a stacked parameter at a time).
  """
  np_dtype = SAVE_DTYPES[dtype]
  writer = jax.process_index() == 0
  if writer:
    os.makedirs(out_dir, exist_ok=True)
  written: list[tuple[str, list[str]]] = []  # (temporary file, tensor names), in order
  shard: dict[str, np.ndarray] = {}
  total = 0

  def flush():
    if writer and shard:
      tmp = os.path.join(out_dir, f'.part-{len(written):05d}.safetensors')
      save_file(shard, tmp, metadata={'format': 'pt'})
      written.append((tmp, list(shard)))
    shard.clear()

  for name, host in gathered(params, cfg):
    host = np.ascontiguousarray(host.astype(np_dtype))
    if shard and sum(a.nbytes for a in shard.values()) + host.nbytes > max_shard_bytes:
      flush()
    shard[name] = host
    total += host.nbytes
  flush()
  if not writer:
    return
  weight_map = {}
  for k, (tmp, names) in enumerate(written, 1):
    filename = (f'model-{k:05d}-of-{len(written):05d}.safetensors' if len(written) > 1
                else 'model.safetensors')
    os.replace(tmp, os.path.join(out_dir, filename))
    weight_map.update(dict.fromkeys(names, filename))
  if len(written) > 1:
    with open(os.path.join(out_dir, INDEX), 'w') as f:
      json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f, indent=2)
  with open(os.path.join(out_dir, 'config.json'), 'w') as f:
    json.dump(models.family_of(cfg).config_to_hf(cfg, dtype), f, indent=2)
  if tokenizer_dir:
    for name in TOKENIZER_FILES:
      if os.path.isfile(os.path.join(tokenizer_dir, name)):
        shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(out_dir, name))
