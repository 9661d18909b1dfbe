"""Hugging Face checkpoints <-> ftjax: config.json <-> Config, safetensors <-> sharded params.

Loading streams tensor slices straight into sharded `jax.Array`s: every device shard is
read from the memory-mapped safetensors files with `get_slice`, so a host only touches the
bytes its devices hold. Export gathers one tensor (one layer) at a time. Nothing here runs
code from a checkpoint folder (no pickle, no `trust_remote_code`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from ftjax.errors import CheckpointError
from ftjax.models import llama

FAMILIES = ('llama', 'mistral', 'qwen2', 'qwen3', 'gemma', 'gemma2', 'gemma3_text')
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json',
                   'tokenizer.model', 'generation_config.json', 'chat_template.jinja')
INDEX = 'model.safetensors.index.json'


# ---------------------------------------------------------------------------- config.json


def _rope(hf: dict[str, Any], kind: str | None = None) -> dict[str, Any]:
  """Rope settings from either the 5.x `rope_parameters` or the 4.x `rope_theta/rope_scaling`."""
  params = hf.get('rope_parameters')
  if params and kind and kind in params:
    params = params[kind]
  if params is None:
    params = dict(hf.get('rope_scaling') or {}, rope_theta=hf.get('rope_theta', 10_000.0))
  rope_type = params.get('rope_type', params.get('type')) or 'default'
  out: dict[str, Any] = dict(theta=float(params.get('rope_theta', hf.get('rope_theta', 1e4))))
  if rope_type == 'llama3':
    out.update(scaling_factor=float(params['factor']),
               low_freq_factor=float(params['low_freq_factor']),
               high_freq_factor=float(params['high_freq_factor']),
               original_max_len=int(params['original_max_position_embeddings']))
  elif rope_type == 'linear':
    out.update(linear_factor=float(params['factor']))
  elif rope_type != 'default':
    raise CheckpointError(f"config.json: rope_type {rope_type!r} is not supported "
                          "(supported: default, linear, llama3)")
  return out


def _global_every(hf: dict[str, Any], default: int) -> int:
  """The sliding/global pattern as 'every N-th layer is global', checked against layer_types."""
  layer_types = hf.get('layer_types')
  if not layer_types:
    return int(hf.get('sliding_window_pattern') or default)
  is_global = [t == 'full_attention' for t in layer_types]
  unknown = sorted({t for t in layer_types} - {'full_attention', 'sliding_attention'})
  if unknown:
    raise CheckpointError(f'config.json: layer_types {unknown} are not supported')
  for every in [0, *range(1, len(layer_types) + 1)]:
    if is_global == [bool(every) and (i + 1) % every == 0 for i in range(len(layer_types))]:
      return every
  raise CheckpointError('config.json: layer_types is not a repeating sliding/global pattern '
                        f'ftjax supports: {layer_types}')


def config_from_hf(hf: dict[str, Any]) -> llama.Config:
  """The ftjax architecture for a Hugging Face `config.json` dict; refuses what it cannot match."""
  family = hf.get('model_type')
  if family not in FAMILIES:
    hint = ' (use the text-only gemma3_text checkpoint)' if family == 'gemma3' else ''
    raise CheckpointError(f'config.json: model_type {family!r} is not supported{hint}; '
                          f'supported: {list(FAMILIES)}')
  gemma = family.startswith('gemma')
  activation = hf.get('hidden_activation') or hf.get('hidden_act') or 'silu'
  act = {'silu': 'silu', 'gelu_pytorch_tanh': 'gelu_tanh', 'gelu': 'gelu_tanh'}.get(activation)
  if act is None or (activation == 'gelu' and not gemma):
    raise CheckpointError(f'config.json: activation {activation!r} is not supported')
  changes_the_math = {
      'mlp_bias': False, 'use_bidirectional_attention': False, 'use_sliding_window': False,
      'attention_bias': family == 'qwen2', 'pretraining_tp': 1, 'partial_rotary_factor': 1.0,
  }
  if family not in ('gemma2', 'gemma3_text'):
    changes_the_math.update(attn_logit_softcapping=None, final_logit_softcapping=None)
  # Qwen2 always has q/k/v biases (transformers ignores its attention_bias); Llama's
  # attention_bias puts biases on q, k, v and o alike. Mistral has no such option.
  if family in ('qwen2', 'llama'):
    del changes_the_math['attention_bias']
  llama_bias = family == 'llama' and bool(hf.get('attention_bias'))
  for key, expected in changes_the_math.items():
    value = hf.get(key)
    if value not in (None, expected) and not (key == 'use_sliding_window' and not value):
      raise CheckpointError(f'config.json: {key}={value!r} is not supported by ftjax '
                            f'(expected {expected!r}); refusing to compute wrong logits')
  heads = hf['num_attention_heads']
  fields: dict[str, Any] = dict(
      family=family,
      vocab_size=hf['vocab_size'], embed_dim=hf['hidden_size'],
      num_layers=hf['num_hidden_layers'], num_heads=heads,
      num_kv_heads=hf.get('num_key_value_heads') or heads,
      head_dim=hf.get('head_dim') or hf['hidden_size'] // heads,
      mlp_dim=hf['intermediate_size'],
      norm_eps=float(hf.get('rms_norm_eps', 1e-6)),
      tie_embeddings=bool(hf.get('tie_word_embeddings', gemma)),
      init_std=float(hf.get('initializer_range', 0.02)),
      mlp_activation=act,
      qkv_bias=family == 'qwen2' or llama_bias, o_bias=llama_bias,
      qk_norm=family in ('qwen3', 'gemma3_text'),
      norm_plus_one=gemma, embed_scale=gemma,
      post_norms=family in ('gemma2', 'gemma3_text'),
      attn_softcap=float(hf.get('attn_logit_softcapping') or 0.0),
      final_softcap=float(hf.get('final_logit_softcapping') or 0.0),
      query_scale=float(hf.get('query_pre_attn_scalar') or 0.0),
  )
  rope_kind = 'full_attention' if family == 'gemma3_text' else None
  rope = _rope(hf, rope_kind)
  fields.update({f'rope_{k}' if k != 'theta' else 'rope_theta': v for k, v in rope.items()
                 if k not in ('scaling_factor', 'linear_factor', 'original_max_len')})
  fields.update(rope_scaling_factor=rope.get('scaling_factor', 1.0),
                rope_linear_factor=rope.get('linear_factor', 1.0))
  if 'original_max_len' in rope:
    fields['rope_original_max_len'] = rope['original_max_len']
  window = hf.get('sliding_window') or 0
  if family in ('qwen2', 'qwen3', 'llama'):
    window = 0  # only used with use_sliding_window, refused above
  if window:
    fields['sliding_window'] = int(window)
    fields['global_every'] = _global_every(hf, {'gemma2': 2, 'gemma3_text': 6}.get(family, 0))
  if family == 'gemma3_text':
    local = _rope(hf, 'sliding_attention') if 'rope_parameters' in hf else dict(
        theta=float(hf.get('rope_local_base_freq', 10_000.0)))
    fields['rope_local_theta'] = local['theta']
  return llama.Config(**fields)


def config_to_hf(cfg: llama.Config, dtype: str) -> dict[str, Any]:
  """A `config.json` dict that `transformers` reads back into the same architecture."""
  gemma = cfg.family.startswith('gemma')
  # Llama's attention_bias biases q, k, v and o alike; no other family has an o bias.
  if cfg.o_bias != (cfg.family == 'llama' and cfg.qkv_bias):
    raise ValueError(f'family={cfg.family!r} with qkv_bias={cfg.qkv_bias}, o_bias={cfg.o_bias} '
                     'has no Hugging Face form: only llama has an output-projection bias, and '
                     'only together with q/k/v biases (attention_bias)')
  arch = {'llama': 'LlamaForCausalLM', 'mistral': 'MistralForCausalLM',
          'qwen2': 'Qwen2ForCausalLM', 'qwen3': 'Qwen3ForCausalLM', 'gemma': 'GemmaForCausalLM',
          'gemma2': 'Gemma2ForCausalLM', 'gemma3_text': 'Gemma3ForCausalLM'}[cfg.family]
  rope: dict[str, Any] = {'rope_type': 'default', 'rope_theta': cfg.rope_theta}
  if cfg.rope_scaling_factor != 1.0:
    rope = {'rope_type': 'llama3', 'rope_theta': cfg.rope_theta,
            'factor': cfg.rope_scaling_factor, 'low_freq_factor': cfg.rope_low_freq_factor,
            'high_freq_factor': cfg.rope_high_freq_factor,
            'original_max_position_embeddings': cfg.rope_original_max_len}
  elif cfg.rope_linear_factor != 1.0:
    rope = {'rope_type': 'linear', 'rope_theta': cfg.rope_theta, 'factor': cfg.rope_linear_factor}
  hf: dict[str, Any] = {
      'architectures': [arch], 'model_type': cfg.family, 'vocab_size': cfg.vocab_size,
      'hidden_size': cfg.embed_dim, 'num_hidden_layers': cfg.num_layers,
      'num_attention_heads': cfg.num_heads, 'num_key_value_heads': cfg.num_kv_heads,
      'head_dim': cfg.head_dim, 'intermediate_size': cfg.mlp_dim, 'rms_norm_eps': cfg.norm_eps,
      'tie_word_embeddings': cfg.tie_embeddings, 'initializer_range': cfg.init_std,
      'dtype': dtype, 'rope_parameters': rope,
      # The 4.x keys too, for readers (older transformers, vLLM) that predate rope_parameters.
      'rope_theta': cfg.rope_theta, 'torch_dtype': dtype,
      ('hidden_activation' if gemma else 'hidden_act'):
          {'silu': 'silu', 'gelu_tanh': 'gelu_pytorch_tanh'}[cfg.mlp_activation],
  }
  if rope['rope_type'] != 'default' and cfg.family != 'gemma3_text':
    hf['rope_scaling'] = {k: v for k, v in rope.items() if k != 'rope_theta'}
  if cfg.family == 'gemma3_text':
    hf['rope_local_base_freq'] = cfg.rope_local_theta or cfg.rope_theta
    if rope['rope_type'] != 'default':
      hf['rope_scaling'] = {k: v for k, v in rope.items() if k != 'rope_theta'}
  if cfg.family == 'llama':
    hf['attention_bias'] = cfg.o_bias
  if cfg.family == 'qwen2':
    hf['use_sliding_window'] = False
  if cfg.family == 'mistral':
    hf['sliding_window'] = cfg.sliding_window or None
  if cfg.family in ('gemma2', 'gemma3_text'):
    scalar = cfg.query_scale or cfg.head_dim
    hf.update(sliding_window=cfg.sliding_window,
              query_pre_attn_scalar=int(scalar) if float(scalar).is_integer() else scalar,
              attn_logit_softcapping=cfg.attn_softcap or None,
              final_logit_softcapping=cfg.final_softcap or None,
              layer_types=['full_attention' if cfg.is_global(i) else 'sliding_attention'
                           for i in range(cfg.num_layers)])
  if cfg.family == 'gemma3_text':
    hf['rope_parameters'] = {'full_attention': rope, 'sliding_attention': {
        'rope_type': 'default', 'rope_theta': cfg.rope_local_theta or cfg.rope_theta}}
  return hf


# ---------------------------------------------------------------------------- tensor map

Index = tuple[slice, ...]


@dataclasses.dataclass(frozen=True)
class Tensor:
  """How one ftjax array (per layer, for stacked ones) maps to one HF tensor."""

  hf_name: str  # with '{i}' for the layer
  kind: str  # same | transpose | in_heads | out_heads | bias_heads

  def read(self, get_slice: Callable[[tuple[slice, ...]], np.ndarray], index: Index,
           shape: tuple[int, ...]) -> np.ndarray:
    """This ftjax slice (`index` over `shape`), read from the HF tensor with `get_slice`."""
    s = [slice(*i.indices(n)) for i, n in zip(index, shape, strict=True)]
    if self.kind == 'same':
      return get_slice(tuple(s))
    if self.kind == 'transpose':
      return get_slice((s[1], s[0])).T
    h = shape[-1] if self.kind != 'out_heads' else shape[1]
    if self.kind == 'in_heads':  # ftjax (D, N, H) <- HF (N*H, D)
      d, n, hs = s
      assert hs == slice(0, h, 1), 'head_dim is never sharded'
      rows = get_slice((slice(n.start * h, n.stop * h), d))
      return rows.T.reshape(d.stop - d.start, n.stop - n.start, h)
    if self.kind == 'out_heads':  # ftjax (N, H, D) <- HF (D, N*H)
      n, hs, d = s
      assert hs == slice(0, h, 1), 'head_dim is never sharded'
      cols = get_slice((d, slice(n.start * h, n.stop * h)))
      return cols.T.reshape(n.stop - n.start, h, d.stop - d.start)
    if self.kind == 'bias_heads':  # ftjax (N, H) <- HF (N*H,)
      n, hs = s
      return get_slice((slice(n.start * h, n.stop * h),)).reshape(n.stop - n.start, h)
    raise AssertionError(self.kind)

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    """The whole HF tensor from one ftjax array (one layer of a stacked one)."""
    if self.kind == 'same':
      return x
    if self.kind == 'transpose':
      return x.T
    if self.kind == 'in_heads':
      return x.reshape(x.shape[0], -1).T
    if self.kind == 'out_heads':
      return x.reshape(-1, x.shape[-1]).T
    return x.reshape(-1)


def tensor_map(cfg: llama.Config) -> dict[tuple[str, ...], Tensor]:
  """ftjax parameter path -> HF tensor, for the parameters `cfg` creates."""
  layer = 'model.layers.{i}.'
  m = {
      ('embed',): Tensor('model.embed_tokens.weight', 'same'),
      ('final_norm', 'scale'): Tensor('model.norm.weight', 'same'),
      ('blocks', 'attn_norm', 'scale'): Tensor(layer + 'input_layernorm.weight', 'same'),
      ('blocks', 'attn', 'o', 'w'): Tensor(layer + 'self_attn.o_proj.weight', 'out_heads'),
  }
  if cfg.o_bias:
    m[('blocks', 'attn', 'o_bias')] = Tensor(layer + 'self_attn.o_proj.bias', 'same')
  for name in 'qkv':
    m[('blocks', 'attn', name, 'w')] = Tensor(layer + f'self_attn.{name}_proj.weight', 'in_heads')
    if cfg.qkv_bias:
      m[('blocks', 'attn', f'{name}_bias')] = Tensor(layer + f'self_attn.{name}_proj.bias',
                                                     'bias_heads')
  if cfg.qk_norm:
    for name in 'qk':
      m[('blocks', 'attn', f'{name}_norm', 'scale')] = Tensor(
          layer + f'self_attn.{name}_norm.weight', 'same')
  for name in ('gate', 'up', 'down'):
    m[('blocks', 'mlp', name, 'w')] = Tensor(layer + f'mlp.{name}_proj.weight', 'transpose')
  if cfg.post_norms:
    m[('blocks', 'attn_post_norm', 'scale')] = Tensor(layer + 'post_attention_layernorm.weight',
                                                       'same')
    m[('blocks', 'mlp_norm', 'scale')] = Tensor(layer + 'pre_feedforward_layernorm.weight', 'same')
    m[('blocks', 'mlp_post_norm', 'scale')] = Tensor(layer + 'post_feedforward_layernorm.weight',
                                                      'same')
  else:
    m[('blocks', 'mlp_norm', 'scale')] = Tensor(layer + 'post_attention_layernorm.weight', 'same')
  if not cfg.tie_embeddings:
    m[('lm_head', 'w')] = Tensor('lm_head.weight', 'transpose')
  return m


def _hf_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  if kind == 'transpose':
    return shape[::-1]
  if kind == 'in_heads':
    return (shape[1] * shape[2], shape[0])
  if kind == 'out_heads':
    return (shape[2], shape[0] * shape[1])
  if kind == 'bias_heads':
    return (shape[0] * shape[1],)
  return shape


def _names(keypath) -> tuple[str, ...]:
  return tuple(str(k.key) for k in keypath if isinstance(k, jax.tree_util.DictKey))


# ---------------------------------------------------------------------------- reading


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


def check_tensors(folder: Folder, cfg: llama.Config, abstract_state: Any) -> None:
  """Every tensor exists with the shape `cfg` implies, and the checkpoint has no others."""
  tmap = tensor_map(cfg)
  expected: set[str] = set()
  for path, var in jax.tree_util.tree_leaves_with_path(
      abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    key = _names(path)
    tensor, shape = tmap[key], tuple(var.get_value().shape)
    names = ([tensor.hf_name.format(i=i) for i in range(shape[0])] if key[0] == 'blocks'
             else [tensor.hf_name])
    want = _hf_shape(tensor.kind, shape[1:] if key[0] == 'blocks' else shape)
    for name in names:
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


def load_state(folder: Folder, cfg: llama.Config, abstract_state: Any, shardings: Any) -> Any:
  """The model state, built shard by shard from the checkpoint into sharded arrays."""
  check_tensors(folder, cfg, abstract_state)
  tmap = tensor_map(cfg)

  def one(path, var, sharding_var):
    key = _names(path)
    tensor = tmap[key]
    shape, dtype = tuple(var.get_value().shape), var.get_value().dtype
    stacked = key[0] == 'blocks'

    def read_layer(name: str, index, layer_shape):
      return tensor.read(lambda i: folder.read(name, i), index, layer_shape)

    def callback(index):
      if not stacked:
        return read_layer(tensor.hf_name, index, shape).astype(dtype)
      layers = range(*index[0].indices(shape[0]))
      return np.stack([read_layer(tensor.hf_name.format(i=i), index[1:], shape[1:])
                       for i in layers]).astype(dtype)

    return var.replace(jax.make_array_from_callback(shape, sharding_var.get_value(), callback))

  return jax.tree_util.tree_map_with_path(
      one, abstract_state, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))


# ---------------------------------------------------------------------------- writing


def save(params: Any, cfg: llama.Config, out_dir: str, *, dtype: str = 'bfloat16',
         tokenizer_dir: str | None = None, max_shard_bytes: int = 2 << 30) -> None:
  """Writes a Hugging Face folder: config.json, sharded safetensors + index, tokenizer files.

  Every process must call this (gathers are collective); process 0 writes. Tensors are
  gathered one at a time (one layer of a stacked parameter at a time).
  """
  tmap = tensor_map(cfg)
  np_dtype = {'float32': np.float32, 'bfloat16': jnp.bfloat16}[dtype]
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

  for path, var in jax.tree_util.tree_leaves_with_path(
      params, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    key = _names(path)
    tensor, x = tmap[key], var.get_value()
    pieces = ([(tensor.hf_name.format(i=i), x[i]) for i in range(x.shape[0])]
              if key[0] == 'blocks' else [(tensor.hf_name, x)])
    for name, piece in pieces:
      host = np.asarray(multihost_utils.process_allgather(piece, tiled=True))
      host = np.ascontiguousarray(tensor.to_hf(host).astype(np_dtype))
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
    json.dump(config_to_hf(cfg, dtype), f, indent=2)
  if tokenizer_dir:
    for name in TOKENIZER_FILES:
      if os.path.isfile(os.path.join(tokenizer_dir, name)):
        shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(out_dir, name))
