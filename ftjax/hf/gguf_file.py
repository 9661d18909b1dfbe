"""llama.cpp GGUF files as a checkpoint: metadata -> a Hugging Face config dict, tensors
dequantized (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K, ...) and read by
Hugging Face name, so `ftjax.hf.weights` streams them into sharded arrays like safetensors.

llama.cpp's converter permutes the rows of q and k (rotary halves interleaved); reading undoes
it, so the tensors are exactly the Hugging Face ones. Read with the `gguf` package (the reader
llama.cpp publishes); nothing in the file is executed.
"""

from __future__ import annotations

import collections
import functools
import os
from typing import Any

import numpy as np

from ftjax.errors import CheckpointError

SUFFIX = '.gguf'
# GGUF architecture -> the Hugging Face model_type whose config.json it stands for.
ARCHITECTURES = {'llama': 'llama', 'qwen2': 'qwen2', 'qwen3': 'qwen3', 'mistral': 'mistral'}
_DEQUANTIZED = ('F32', 'F16', 'BF16', 'Q8_0', 'Q4_0', 'Q4_1', 'Q5_0', 'Q5_1', 'Q2_K', 'Q3_K',
                'Q4_K', 'Q5_K', 'Q6_K')


def is_gguf(path: str) -> bool:
  return path.endswith(SUFFIX) and os.path.isfile(path)


@functools.lru_cache(maxsize=2)
def _reader(path: str, mtime_ns: int) -> Any:
  """One memory-mapped reader per file version (config, tokenizer and weights share it)."""
  import gguf

  del mtime_ns  # part of the cache key only
  return gguf.GGUFReader(path)


class GgufCheckpoint:
  """A GGUF file with the reading interface of `ftjax.hf.weights.Folder` (Hugging Face names)."""

  def __init__(self, path: str):
    import gguf

    self.path = path
    if not os.path.isfile(path):
      raise CheckpointError(f'{path}: no such GGUF file')
    try:
      self._reader = _reader(path, os.stat(path).st_mtime_ns)
    except (ValueError, OSError, IndexError, KeyError) as e:
      raise CheckpointError(f'{path}: not a readable GGUF file ({e}); is it truncated or not '
                            'a GGUF file?') from None
    self.arch = self._value('general.architecture')
    if self.arch not in ARCHITECTURES:
      raise CheckpointError(f'{path}: GGUF architecture {self.arch!r} is not supported; '
                            f'supported: {sorted(ARCHITECTURES)}')
    self._tensors = {t.name: t for t in self._reader.tensors}
    unsupported = sorted({t.tensor_type.name for t in self._reader.tensors} - set(_DEQUANTIZED))
    if unsupported:
      raise CheckpointError(f'{path}: GGUF tensor types {unsupported} are not supported; '
                            f'supported: {list(_DEQUANTIZED)}')
    self.hf_config = self._hf_config()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[self.arch.upper()],
                                     self.hf_config['num_hidden_layers'])
    self._gguf_name: dict[str, str] = {}
    for hf_name in _hf_names(self.hf_config):
      name = names.get_name(hf_name, try_suffixes=('.weight', '.bias'))
      if name in self._tensors:
        self._gguf_name[hf_name] = name
    known = set(self._gguf_name.values())
    extra = sorted(set(self._tensors) - known)  # e.g. rope_freqs (Llama 3.1 rope scaling)
    if extra:
      raise CheckpointError(f'{path}: GGUF tensors ftjax does not know how to use, so the '
                            f'model would be wrong without them: {extra[:5]}')
    self.weight_map = dict.fromkeys(self._gguf_name, os.path.basename(path))
    # Dequantized tensors, newest last: room for every layer of one stacked parameter, which
    # the loader reads shard by shard before it moves to the next parameter.
    self._cache: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
    self._cache_size = self.hf_config['num_hidden_layers']

  def _value(self, key: str, default: Any = None) -> Any:
    field = self._reader.fields.get(key)
    return default if field is None else field.contents()

  def _hf_config(self) -> dict[str, Any]:
    """The config.json a Hugging Face checkpoint of this model would have."""
    a = self.arch
    get = lambda key, default=None: self._value(f'{a}.{key}', default)  # noqa: E731
    heads = get('attention.head_count')
    embed = get('embedding_length')
    if heads is None or embed is None:
      raise CheckpointError(f'{self.path}: GGUF metadata lacks {a}.attention.head_count or '
                            f'{a}.embedding_length')
    vocab = get('vocab_size') or len(self._value('tokenizer.ggml.tokens', []))
    if get('rope.scaling.type') not in (None, 'none'):
      raise CheckpointError(f"{self.path}: GGUF rope scaling {get('rope.scaling.type')!r} is "
                            'not supported')
    return dict(
        model_type=ARCHITECTURES[a], vocab_size=int(vocab), hidden_size=int(embed),
        num_hidden_layers=int(get('block_count')), num_attention_heads=int(heads),
        num_key_value_heads=int(get('attention.head_count_kv', heads)),
        head_dim=int(get('attention.key_length', embed // heads)),
        intermediate_size=int(get('feed_forward_length')),
        rms_norm_eps=float(get('attention.layer_norm_rms_epsilon', 1e-6)),
        rope_theta=float(get('rope.freq_base', 10_000.0)),
        max_position_embeddings=int(get('context_length', 0)) or None,
        tie_word_embeddings='output.weight' not in self._tensors,
        attention_bias=a == 'llama' and 'blk.0.attn_q.bias' in self._tensors,
        torch_dtype='float32')

  def tokenizer_metadata(self) -> dict[str, Any]:
    """`tokenizer.ggml.*` and the chat template, as plain Python values."""
    model = self._value('tokenizer.ggml.model')
    if model != 'gpt2':
      raise CheckpointError(f'{self.path}: GGUF tokenizer model {model!r} is not supported '
                            "(supported: 'gpt2', byte-level BPE); pass data.tokenizer")
    ids = {k: self._value(f'tokenizer.ggml.{k}_token_id') for k in ('bos', 'eos', 'padding')}
    return dict(tokens=list(self._value('tokenizer.ggml.tokens')),
                merges=list(self._value('tokenizer.ggml.merges', [])),
                token_type=list(self._value('tokenizer.ggml.token_type', [])),
                pre=self._value('tokenizer.ggml.pre'), ids=ids,
                chat_template=self._value('tokenizer.chat_template'))

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(int(n) for n in reversed(self._tensor(name).shape))

  def _tensor(self, name: str):
    if name not in self._gguf_name:
      raise CheckpointError(f'{self.path}: tensor {name!r} not found in the GGUF file')
    return self._tensors[self._gguf_name[name]]

  def tensor(self, name: str) -> np.ndarray:
    """The whole Hugging Face tensor `name`, dequantized to float32, q/k rows unpermuted."""
    if name in self._cache:
      self._cache.move_to_end(name)
      return self._cache[name]
    t = self._tensor(name)
    x = self._dequantized(t, np.asarray(t.data)).reshape(self.shape(name))
    heads = _permuted_heads(name, self.hf_config['num_attention_heads'],
                            self.hf_config['num_key_value_heads'])
    if heads:
      x = _unpermute(x, heads)
    self._cache[name] = x
    while len(self._cache) > self._cache_size:
      self._cache.popitem(last=False)
    return x

  def _dequantized(self, t: Any, data: np.ndarray) -> np.ndarray:
    import gguf

    try:
      return gguf.quants.dequantize(data, t.tensor_type).astype(np.float32, copy=False)
    except (ValueError, NotImplementedError) as e:
      raise CheckpointError(f'{self.path}: cannot dequantize {t.name} '
                            f'({t.tensor_type.name}): {e}') from None

  def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
    """`tensor(name)[index]`; a matrix whose rows are not permuted dequantizes only the rows
    asked for (so a sharded embedding never exists whole in float32)."""
    shape = self.shape(name)
    if len(shape) != 2 or _permuted_heads(name, 1, 1):  # permuted rows: read it whole
      return self.tensor(name)[index]
    rows = range(*index[0].indices(shape[0]))
    t = self._tensor(name)
    block = np.asarray(t.data)[rows.start:rows.stop]
    return self._dequantized(t, block).reshape(len(rows), shape[1])[:, index[1]]


def _permuted_heads(name: str, heads: int, kv_heads: int) -> int | None:
  """The head count llama.cpp permuted the rows of tensor `name` by (q and k), else None."""
  if '.q_proj.' in name:
    return heads
  if '.k_proj.' in name:
    return kv_heads
  return None


def _unpermute(x: np.ndarray, heads: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row permutation: `hf = gguf.reshape(N, H/2, 2, ...).swap(1, 2)`."""
  return x.reshape(heads, x.shape[0] // heads // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(
      x.shape)


def _hf_names(hf: dict[str, Any]) -> list[str]:
  """Every tensor name a Hugging Face checkpoint of this architecture may hold."""
  names = ['model.embed_tokens.weight', 'model.norm.weight', 'lm_head.weight']
  per_layer = ['input_layernorm.weight', 'post_attention_layernorm.weight',
               'self_attn.q_norm.weight', 'self_attn.k_norm.weight',
               'mlp.gate_proj.weight', 'mlp.up_proj.weight', 'mlp.down_proj.weight']
  for proj in ('q', 'k', 'v', 'o'):
    per_layer += [f'self_attn.{proj}_proj.weight', f'self_attn.{proj}_proj.bias']
  return names + [f'model.layers.{i}.{n}' for i in range(hf['num_hidden_layers'])
                  for n in per_layer]


# ---------------------------------------------------------------------------- writing

# `ftjax export --format gguf --dtype`: how 2-D matrices are stored (vectors stay F32, as
# llama.cpp's converter keeps them).
WRITE_TYPES = ('f32', 'f16', 'bf16', 'q8_0')


def write(layout: list[tuple[str, tuple[int, ...]]], tensors: Any, cfg: Any, hf: dict[str, Any],
          path: str, *, dtype: str, tok: Any, name: str = '',
          context_length: int | None = None) -> None:
  """Writes a GGUF file llama.cpp loads: metadata from `hf` (the config.json dict of `cfg`),
  the tokenizer `tok` (byte-level BPE) with its chat template, and `tensors` ((HF name, float32
  array) pairs, as `ftjax.hf.weights.gathered` yields them), q/k rows permuted back.

  Streamed: the tensor index is written first from `layout` ((HF name, shape) in the order
  `tensors` yields them, `ftjax.hf.weights.layout`), then each tensor's data as it arrives, so
  only one tensor is in host memory at a time.
  """
  import gguf

  if dtype not in WRITE_TYPES:
    raise ValueError(f'--dtype={dtype!r} for --format gguf; expected one of {WRITE_TYPES}')
  arch = {v: k for k, v in ARCHITECTURES.items()}.get(hf['model_type'])
  if arch is None or cfg.qk_norm and arch != 'qwen3':
    raise CheckpointError(f"model_type {hf['model_type']!r} has no GGUF export in ftjax; "
                          f'supported: {sorted(ARCHITECTURES.values())}')
  w = gguf.GGUFWriter(path, arch)
  w.add_name(name or f'ftjax {hf["model_type"]}')
  w.add_block_count(cfg.num_layers)
  w.add_context_length(int(context_length or 4096))
  w.add_embedding_length(cfg.embed_dim)
  w.add_feed_forward_length(cfg.mlp_dim)
  w.add_head_count(cfg.num_heads)
  w.add_head_count_kv(cfg.num_kv_heads)
  w.add_key_length(cfg.head_dim)
  w.add_value_length(cfg.head_dim)
  w.add_rope_dimension_count(cfg.head_dim)
  w.add_rope_freq_base(float(cfg.rope_theta))
  w.add_layer_norm_rms_eps(float(cfg.norm_eps))
  w.add_vocab_size(cfg.vocab_size)
  file_type = {'f32': gguf.LlamaFileType.ALL_F32, 'f16': gguf.LlamaFileType.MOSTLY_F16,
               'bf16': gguf.LlamaFileType.MOSTLY_BF16, 'q8_0': gguf.LlamaFileType.MOSTLY_Q8_0}
  w.add_file_type(file_type[dtype])
  _add_tokenizer(w, tok, cfg.vocab_size)
  names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_layers)
  stored = {'f32': gguf.GGMLQuantizationType.F32, 'f16': gguf.GGMLQuantizationType.F16,
            'bf16': gguf.GGMLQuantizationType.BF16, 'q8_0': gguf.GGMLQuantizationType.Q8_0}

  def qtype(shape: tuple[int, ...]) -> Any:  # vectors stay F32, as llama.cpp keeps them
    return stored['f32' if len(shape) == 1 else dtype]

  for hf_name, shape in layout:
    q = qtype(shape)
    nbytes = int(np.prod(gguf.quants.quant_shape_to_byte_shape(shape, q)))
    w.add_tensor_info(names.get_name(hf_name, try_suffixes=('.weight', '.bias')), shape,
                      np.dtype(np.float32), nbytes, raw_dtype=q)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_ti_data_to_file()
  for (want, shape), (hf_name, x) in zip(layout, tensors, strict=True):
    assert hf_name == want and x.shape == shape, (hf_name, want, x.shape, shape)
    x = np.asarray(x, np.float32)
    heads = _permuted_heads(hf_name, cfg.num_heads, cfg.num_kv_heads)
    if heads:
      x = _permute(x, heads)
    q = qtype(shape)
    if q == stored['f32']:
      data = np.ascontiguousarray(x)
    elif q == stored['f16']:
      data = np.ascontiguousarray(x.astype(np.float16))
    else:
      data = gguf.quants.quantize(x, q)
    w.write_tensor_data(data)
  w.close()


def _permute(x: np.ndarray, heads: int) -> np.ndarray:
  """llama.cpp's q/k row permutation (the inverse of `_unpermute`)."""
  return x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(
      x.shape)


def _add_tokenizer(w: Any, tok: Any, vocab_size: int) -> None:
  """`tokenizer.ggml.*` of a byte-level BPE `ftjax.tokenizer.Tokenizer` (its `backend`)."""
  import json

  if tok.backend is None:
    raise CheckpointError(f'{tok.source}: only byte-level BPE tokenizers (tokenizer.json or a '
                          'GGUF) can be written into a GGUF file')
  spec = json.loads(tok.backend.to_str())
  if spec['model']['type'] != 'BPE':
    raise CheckpointError(f"{tok.source}: a {spec['model']['type']} tokenizer cannot be written "
                          'into a GGUF file (byte-level BPE only)')
  vocab = tok.backend.get_vocab(with_added_tokens=True)
  tokens = [f'[PAD{i}]' for i in range(vocab_size)]
  for token, i in vocab.items():
    if i < vocab_size:
      tokens[i] = token
  added = {a['id']: a for a in spec.get('added_tokens', [])}
  kinds = [(3 if added[i]['special'] else 4) if i in added else 1 for i in range(vocab_size)]
  kinds = [5 if t.startswith('[PAD') and t not in vocab else k  # 5 = UNUSED
           for t, k in zip(tokens, kinds, strict=True)]
  merges = [m if isinstance(m, str) else ' '.join(m) for m in spec['model'].get('merges', [])]
  w.add_tokenizer_model('gpt2')
  w.add_tokenizer_pre('default')
  w.add_token_list(tokens)
  w.add_token_types(kinds)
  w.add_token_merges(merges)
  if tok.bos_id is not None:
    w.add_bos_token_id(tok.bos_id)
  w.add_eos_token_id(tok.eos_id)
  w.add_pad_token_id(tok.pad_id)
  w.add_add_bos_token(False)
  if tok.chat_template:
    w.add_chat_template(tok.chat_template)
