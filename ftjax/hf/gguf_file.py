"""llama.cpp GGUF files as a checkpoint: metadata -> a Hugging Face config dict, tensors
dequantized (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K, ...) and read by
Hugging Face name, so `ftjax.hf.weights` streams them into sharded arrays like safetensors.

llama.cpp's converter changes two things, and reading undoes both, so the tensors are exactly the
Hugging Face ones: for the `llama` architecture (Llama, Mistral, SmolLM) it permutes the rows of q
and k (rotary halves interleaved; qwen2/qwen3/gemma run NeoX rope and are not permuted), and for
Gemma it stores every norm weight w as 1 + w. Read with the `gguf` package (the reader llama.cpp
publishes); nothing in the file is executed.
"""

from __future__ import annotations

import collections
import functools
import os
from typing import Any

import numpy as np

from ftjax.errors import CheckpointError

SUFFIX = '.gguf'
# GGUF architecture -> the Hugging Face model_type whose config.json it stands for (Mistral's
# files are `llama`: llama.cpp has no separate architecture for it).
ARCHITECTURES = {'llama': 'llama', 'qwen2': 'qwen2', 'qwen3': 'qwen3', 'gemma': 'gemma',
                 'gemma2': 'gemma2', 'gemma3': 'gemma3_text'}
# llama.cpp interleaves the rotary halves of q/k rows for these architectures only.
_PERMUTED = ('llama',)
# Gemma's norms compute x * (1 + w); llama.cpp stores 1 + w.
_NORM_SHIFTED = ('gemma', 'gemma2', 'gemma3')
# Gemma's sliding/global layer pattern (every N-th layer global), fixed in llama.cpp's code.
_GEMMA_GLOBAL_EVERY = {'gemma2': 2, 'gemma3': 6}
# The Gemma 27B models scale queries by hidden/heads, the others by head_dim; llama.cpp tells
# them apart by layer count (46: Gemma 2 27B, 62: Gemma 3 27B).
_GEMMA_27B_LAYERS = {'gemma2': 46, 'gemma3': 62}
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

  def close(self) -> None:
    """Drops the dequantized tensors and the shared memory map (the file's pages would stay
    resident for the rest of the run: 217 MB for SmolLM2-135M's 98 MB Q4_1 file, the reader's
    parsed fields included); a later open reads the file again."""
    self._cache.clear()
    _reader.cache_clear()

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
    rope = {'rope_type': 'default', 'rope_theta': float(get('rope.freq_base', 10_000.0))}
    scaling = get('rope.scaling.type')
    if scaling == 'linear':
      rope.update(rope_type='linear', factor=float(get('rope.scaling.factor')))
    elif scaling not in (None, 'none'):
      raise CheckpointError(f'{self.path}: GGUF rope scaling {scaling!r} is not supported '
                            '(supported: none, linear)')
    layers, head_dim = int(get('block_count')), int(get('attention.key_length', embed // heads))
    hf = dict(
        model_type=ARCHITECTURES[a], vocab_size=int(vocab), hidden_size=int(embed),
        num_hidden_layers=layers, num_attention_heads=int(heads),
        num_key_value_heads=int(get('attention.head_count_kv', heads)), head_dim=head_dim,
        intermediate_size=int(get('feed_forward_length')),
        rms_norm_eps=float(get('attention.layer_norm_rms_epsilon', 1e-6)),
        rope_parameters=rope, max_position_embeddings=int(get('context_length', 0)) or None,
        tie_word_embeddings='output.weight' not in self._tensors,
        attention_bias=a == 'llama' and 'blk.0.attn_q.bias' in self._tensors,
        torch_dtype='float32')
    if a.startswith('gemma'):
      hf['hidden_activation'] = 'gelu_pytorch_tanh'
    if a in _GEMMA_GLOBAL_EVERY:
      pattern = get('attention.sliding_window_pattern')
      every = _GEMMA_GLOBAL_EVERY[a] if pattern is None else _global_every(pattern, layers)
      hf.update(sliding_window=int(get('attention.sliding_window')),
                layer_types=['full_attention' if every and (i + 1) % every == 0 else
                             'sliding_attention' for i in range(layers)],
                query_pre_attn_scalar=(embed // heads if layers == _GEMMA_27B_LAYERS[a]
                                       else head_dim),
                attn_logit_softcapping=get('attn_logit_softcapping'),
                final_logit_softcapping=get('final_logit_softcapping'))
    if a == 'gemma3':  # sliding layers use rope base 10000 in llama.cpp, unscaled
      hf['rope_parameters'] = {'full_attention': rope, 'sliding_attention': {
          'rope_type': 'default', 'rope_theta': 10_000.0}}
    return hf

  def tokenizer_metadata(self) -> dict[str, Any]:
    """`tokenizer.ggml.*` and the chat template, as plain Python values."""
    model = self._value('tokenizer.ggml.model')
    if model not in ('gpt2', 'llama'):
      raise CheckpointError(f'{self.path}: GGUF tokenizer model {model!r} is not supported '
                            "(supported: 'gpt2', byte-level BPE, and 'llama', SentencePiece "
                            'BPE); pass data.tokenizer')
    ids = {k: self._value(f'tokenizer.ggml.{k}_token_id')
           for k in ('bos', 'eos', 'padding', 'unknown')}
    return dict(model=model, arch=self.arch, tokens=list(self._value('tokenizer.ggml.tokens')),
                merges=list(self._value('tokenizer.ggml.merges', [])),
                scores=list(self._value('tokenizer.ggml.scores', [])),
                token_type=list(self._value('tokenizer.ggml.token_type', [])),
                add_space_prefix=self._value('tokenizer.ggml.add_space_prefix'),
                add_bos=self._value('tokenizer.ggml.add_bos_token'),
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
    heads = _permuted_heads(self.arch, name, self.hf_config['num_attention_heads'],
                            self.hf_config['num_key_value_heads'])
    if heads:
      x = _unpermute(x, heads)
    if _norm_shifted(self.arch, name):
      x = x - 1.0
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
    if len(shape) != 2 or _permuted_heads(self.arch, name, 1, 1):  # permuted: read it whole
      return self.tensor(name)[index]
    rows = range(*index[0].indices(shape[0]))
    t = self._tensor(name)
    block = np.asarray(t.data)[rows.start:rows.stop]
    return self._dequantized(t, block).reshape(len(rows), shape[1])[:, index[1]]


def _permuted_heads(arch: str, name: str, heads: int, kv_heads: int) -> int | None:
  """The head count llama.cpp permuted the rows of tensor `name` by (q and k of the `llama`
  architecture), else None."""
  if arch not in _PERMUTED:
    return None
  if '.q_proj.' in name:
    return heads
  if '.k_proj.' in name:
    return kv_heads
  return None


def _norm_shifted(arch: str, name: str) -> bool:
  return arch in _NORM_SHIFTED and name.endswith('norm.weight')


def _global_every(pattern: Any, layers: int) -> int:
  """`attention.sliding_window_pattern` (an int, or one bool per layer: True = sliding) as
  'every N-th layer is global'."""
  if isinstance(pattern, int):
    return pattern
  sliding = [bool(p) for p in pattern]
  for every in range(1, layers + 1):
    if sliding == [(i + 1) % every != 0 for i in range(layers)]:
      return every
  raise CheckpointError(f'GGUF sliding_window_pattern {sliding} is not "every N-th layer '
                        'global"; ftjax does not support it')


def _unpermute(x: np.ndarray, heads: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row permutation: `hf = gguf.reshape(N, H/2, 2, ...).swap(1, 2)`."""
  return x.reshape(heads, x.shape[0] // heads // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(
      x.shape)


def _hf_names(hf: dict[str, Any]) -> list[str]:
  """Every tensor name a Hugging Face checkpoint of this architecture may hold."""
  names = ['model.embed_tokens.weight', 'model.norm.weight', 'lm_head.weight']
  per_layer = ['input_layernorm.weight', 'post_attention_layernorm.weight',
               'pre_feedforward_layernorm.weight', 'post_feedforward_layernorm.weight',
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
  arch = _export_arch(cfg, hf['model_type'])
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
  if cfg.rope_linear_factor != 1.0:
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(float(cfg.rope_linear_factor))
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
    heads = _permuted_heads(arch, hf_name, cfg.num_heads, cfg.num_kv_heads)
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


# model_type -> the GGUF architecture llama.cpp converts it to (Mistral is `llama` there).
_EXPORT_ARCH = {'llama': 'llama', 'mistral': 'llama', 'qwen2': 'qwen2', 'qwen3': 'qwen3'}


def _export_arch(cfg: Any, model_type: str) -> str:
  """The GGUF architecture of `cfg`, or a CheckpointError naming what llama.cpp would compute
  differently (a file that loads but gives other logits is worse than none)."""
  arch = _EXPORT_ARCH.get(model_type)
  if arch is None:
    raise CheckpointError(f'model_type {model_type!r} has no GGUF export in ftjax (supported: '
                          f'{sorted(_EXPORT_ARCH)}); export it with --format hf')
  unsupported = [what for what, present in (
      ('llama3 rope scaling (llama.cpp needs a rope_freqs tensor)', cfg.rope_scaling_factor != 1.0),
      (f'sliding-window attention ({cfg.sliding_window})', bool(cfg.sliding_window)),
      ('q/k norms', cfg.qk_norm != (arch == 'qwen3')),
      ('q/k/v biases' if cfg.qkv_bias else 'no q/k/v biases',
       cfg.qkv_bias != (arch == 'qwen2' or cfg.o_bias)),
  ) if present]
  if unsupported:
    raise CheckpointError(f'model_type {model_type!r} with {", ".join(unsupported)} has no GGUF '
                          'export in ftjax; export it with --format hf')
  return arch


def _permute(x: np.ndarray, heads: int) -> np.ndarray:
  """llama.cpp's q/k row permutation (the inverse of `_unpermute`)."""
  return x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(
      x.shape)


def _add_tokenizer(w: Any, tok: Any, vocab_size: int) -> None:
  """`tokenizer.ggml.*` of `tok` (an `ftjax.tokenizer.Tokenizer`): copied as they are from the
  GGUF it came from, or built from a byte-level BPE `backend`."""
  import json

  if tok.source.endswith(SUFFIX):
    _copy_tokenizer(w, tok, vocab_size)
    return
  if tok.backend is None:
    raise CheckpointError(f'{tok.source}: only byte-level BPE tokenizers (tokenizer.json or a '
                          'GGUF) can be written into a GGUF file')
  spec = json.loads(tok.backend.to_str())
  if spec['model']['type'] != 'BPE' or spec['model'].get('byte_fallback'):
    kind = 'SentencePiece-style BPE' if spec['model']['type'] == 'BPE' else spec['model']['type']
    raise CheckpointError(f'{tok.source}: a {kind} tokenizer.json cannot be written into a GGUF '
                          'file (byte-level BPE, or a tokenizer read from a GGUF, only)')
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


def _copy_tokenizer(w: Any, tok: Any, vocab_size: int) -> None:
  """The source GGUF's `tokenizer.ggml.*` (vocabulary, scores or merges, token types, the
  pre-tokenizer name llama.cpp picks its split rule by, special ids) and `tok`'s chat template."""
  meta = GgufCheckpoint(tok.source).tokenizer_metadata()
  if len(meta['tokens']) != vocab_size:
    raise CheckpointError(f'{tok.source}: its tokenizer has {len(meta["tokens"])} tokens, the '
                          f'model {vocab_size}; pass a matching data.tokenizer')
  w.add_tokenizer_model(meta['model'])
  if meta['pre'] is not None:
    w.add_tokenizer_pre(meta['pre'])
  w.add_token_list(meta['tokens'])
  if meta['scores']:
    w.add_token_scores(meta['scores'])
  if meta['token_type']:
    w.add_token_types(meta['token_type'])
  if meta['merges']:
    w.add_token_merges(meta['merges'])
  add = {'bos': w.add_bos_token_id, 'eos': w.add_eos_token_id, 'padding': w.add_pad_token_id,
         'unknown': w.add_unk_token_id}
  for key, value in meta['ids'].items():
    if value is not None:
      add[key](int(value))
  if meta['add_space_prefix'] is not None:
    w.add_add_space_prefix(bool(meta['add_space_prefix']))
  if meta['add_bos'] is not None:
    w.add_add_bos_token(bool(meta['add_bos']))
  if tok.chat_template:
    w.add_chat_template(tok.chat_template)
