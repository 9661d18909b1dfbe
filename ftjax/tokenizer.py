"""Tokenizers: the built-in byte-level one, a Hugging Face `tokenizer.json`, or SentencePiece.

Chat templates (Jinja, from `tokenizer_config.json`) are rendered in a sandboxed environment:
templates come from downloaded folders and must not run arbitrary code.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable
from typing import Any

import jinja2
import tokenizers
from jinja2 import sandbox
from tokenizers import decoders, models, pre_tokenizers

from ftjax.errors import UserError


class TokenizerError(UserError):
  """A tokenizer file or folder is unusable (the message names it)."""


BYTE = 'byte'
_BOS_NAMES = ('<|begin_of_text|>', '<s>', '<bos>', '<|im_start|>')
_EOS_NAMES = ('<|end_of_text|>', '<|eot_id|>', '</s>', '<eos>', '<|endoftext|>', '<|im_end|>')
_PAD_NAMES = ('<pad>', '<|finetune_right_pad_id|>', '<|pad|>')


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  """Text <-> token ids, with the special ids and chat template the data pipeline needs."""

  encode_fn: Callable[[str], list[int]]
  offsets_fn: Callable[[str], tuple[list[int], list[tuple[int, int]]]]
  decode_fn: Callable[[list[int]], str]
  vocab_size: int
  bos_id: int | None
  eos_id: int
  pad_id: int
  bos_token: str = ''
  eos_token: str = ''
  chat_template: str | None = None
  source: str = BYTE  # 'byte' or the folder/file it was loaded from
  backend: tokenizers.Tokenizer | None = None

  def encode(self, text: str) -> list[int]:
    return self.encode_fn(text)

  def decode(self, ids: list[int]) -> str:
    return self.decode_fn(list(ids))

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids with the (start, end) character span of each; special tokens in `text` count."""
    return self.offsets_fn(text)

  def apply_chat_template(self, messages: list[dict[str, Any]], *,
                          add_generation_prompt: bool = False) -> str:
    """Renders `messages` ([{'role': ..., 'content': ...}]) with the folder's chat template."""
    if not self.chat_template:
      raise TokenizerError(f'{self.source}: this tokenizer has no chat_template')
    return _compiled(self.chat_template).render(
        messages=messages, add_generation_prompt=add_generation_prompt,
        bos_token=self.bos_token, eos_token=self.eos_token)

  def save(self, out_dir: str) -> None:
    """Writes tokenizer files that `transformers.AutoTokenizer` loads."""
    os.makedirs(out_dir, exist_ok=True)
    if self.backend is None:
      raise TokenizerError(f'{self.source}: only tokenizer.json tokenizers can be saved')
    self.backend.save(os.path.join(out_dir, 'tokenizer.json'))
    config = {'tokenizer_class': 'PreTrainedTokenizerFast', 'eos_token': self.eos_token,
              'bos_token': self.bos_token or None,
              'pad_token': self.backend.id_to_token(self.pad_id)}
    if self.chat_template:
      config['chat_template'] = self.chat_template
    with open(os.path.join(out_dir, 'tokenizer_config.json'), 'w') as f:
      json.dump(config, f, indent=2)


def _raise_exception(message):
  raise jinja2.TemplateError(message)


@functools.lru_cache(maxsize=32)
def _compiled(template: str) -> jinja2.Template:
  """A chat template compiled once (compiling took 80% of encoding a short conversation)."""
  env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
  env.globals['raise_exception'] = _raise_exception
  return env.from_string(template)


def _from_backend(backend: tokenizers.Tokenizer, source: str, bos: str | None, eos: str | None,
                  pad: str | None, chat_template: str | None) -> Tokenizer:
  vocab = backend.get_vocab(with_added_tokens=True)

  def find(explicit, names):
    if explicit is not None:
      if explicit not in vocab:
        raise TokenizerError(f'{source}: special token {explicit!r} is not in the vocabulary')
      return explicit
    return next((n for n in names if n in vocab), None)

  bos, eos, pad = find(bos, _BOS_NAMES), find(eos, _EOS_NAMES), find(pad, _PAD_NAMES)
  if eos is None:
    raise TokenizerError(f'{source}: no end-of-sequence token found (looked for {_EOS_NAMES}); '
                     'set eos_token in tokenizer_config.json')
  def offsets(text):
    enc = backend.encode(text, add_special_tokens=False)
    return enc.ids, enc.offsets

  return Tokenizer(
      encode_fn=lambda text: backend.encode(text, add_special_tokens=False).ids,
      offsets_fn=offsets,
      decode_fn=lambda ids: backend.decode(ids, skip_special_tokens=True),
      vocab_size=backend.get_vocab_size(with_added_tokens=True),
      bos_id=vocab[bos] if bos else None, eos_id=vocab[eos], pad_id=vocab[pad or eos],
      bos_token=bos or '', eos_token=eos, chat_template=chat_template, source=source,
      backend=backend)


def byte_level() -> Tokenizer:
  """256 byte tokens after <pad>=0, <bos>=1, <eos>=2: any UTF-8 text, no training needed."""
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  byte_chars = sorted(alphabet, key=lambda c: _BYTE_OF_CHAR[c])
  vocab = {'<pad>': 0, '<bos>': 1, '<eos>': 2}
  vocab.update({c: i + 3 for i, c in enumerate(byte_chars)})
  backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  backend.decoder = decoders.ByteLevel()
  backend.add_special_tokens(['<pad>', '<bos>', '<eos>'])
  return _from_backend(backend, BYTE, '<bos>', '<eos>', '<pad>', None)


def _gpt2_byte_map() -> dict[str, int]:
  # The printable-character stand-ins ByteLevel uses for raw bytes (GPT-2's table).
  keep = list(range(ord('!'), ord('~') + 1)) + list(range(0xA1, 0xAC + 1)) + list(
      range(0xAE, 0xFF + 1))
  chars = keep[:]
  n = 0
  for b in range(256):
    if b not in keep:
      keep.append(b)
      chars.append(256 + n)
      n += 1
  return {chr(c): b for b, c in zip(keep, chars, strict=True)}


_BYTE_OF_CHAR = _gpt2_byte_map()


def _token_text(value: Any) -> str | None:
  return value.get('content') if isinstance(value, dict) else value


def load(spec: str) -> Tokenizer:
  """'byte', a tokenizer.json file, a folder with tokenizer.json or a SentencePiece model, or a
  llama.cpp .gguf file (its embedded byte-level or SentencePiece BPE vocabulary and chat
  template)."""
  if spec == BYTE:
    return byte_level()
  if spec.endswith('.gguf'):
    return _from_gguf(spec)
  folder = spec if os.path.isdir(spec) else os.path.dirname(spec)
  config: dict[str, Any] = {}
  if os.path.isfile(os.path.join(folder, 'tokenizer_config.json')):
    with open(os.path.join(folder, 'tokenizer_config.json')) as f:
      config = json.load(f)
  template = config.get('chat_template')
  if os.path.isfile(os.path.join(folder, 'chat_template.jinja')):
    with open(os.path.join(folder, 'chat_template.jinja')) as f:
      template = f.read()
  special = {k: _token_text(config.get(k)) for k in ('bos_token', 'eos_token', 'pad_token')}
  path = os.path.join(spec, 'tokenizer.json') if os.path.isdir(spec) else spec
  if os.path.isfile(path) and path.endswith('.json'):
    return _from_backend(tokenizers.Tokenizer.from_file(path), spec, special['bos_token'],
                         special['eos_token'], special['pad_token'], template)
  sp_path = os.path.join(folder, 'tokenizer.model') if os.path.isdir(spec) else spec
  if os.path.isfile(sp_path):
    return _sentencepiece(sp_path, special, template)
  raise FileNotFoundError(
      f'data.tokenizer={spec!r}: no tokenizer.json or tokenizer.model found there; pass '
      f'{BYTE!r} for the built-in byte-level tokenizer, a tokenizer.json file, or a folder.')


def _from_gguf(path: str) -> Tokenizer:
  """The tokenizer a GGUF embeds (`tokenizer.ggml.*`), as transformers builds it: byte-level BPE
  (`gpt2`), or SentencePiece BPE (`llama`: Llama 2, Mistral, Gemma)."""
  from ftjax.hf import gguf_file

  meta = gguf_file.GgufCheckpoint(path).tokenizer_metadata()
  tokens = meta['tokens']
  if meta['model'] == 'llama':
    backend = _sentencepiece_bpe(meta)
  else:
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = [tuple(m.split(' ', 1)) for m in meta['merges']]
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
  kinds = meta['token_type'] or [1] * len(tokens)
  # 3 = CONTROL (special tokens such as <|im_start|>), 4 = USER_DEFINED (matched whole in text).
  backend.add_special_tokens([tokenizers.AddedToken(t, normalized=False, special=True)
                              for t, k in zip(tokens, kinds, strict=True) if k == 3])
  backend.add_tokens([tokenizers.AddedToken(t, normalized=False, special=False)
                      for t, k in zip(tokens, kinds, strict=True) if k == 4])
  name = lambda key: tokens[meta['ids'][key]] if meta['ids'][key] is not None else None  # noqa: E731
  return _from_backend(backend, path, name('bos'), name('eos'), name('padding'),
                       meta['chat_template'])


_SPACE = '\u2581'  # SentencePiece's visible space


def _sentencepiece_bpe(meta: dict[str, Any]) -> tokenizers.Tokenizer:
  """A SentencePiece BPE vocabulary (tokens with scores, byte-fallback `<0xNN>` tokens) as a
  `tokenizers` BPE. The file has no merges: they are the splits of each token into two tokens,
  best first (by score; Gemma's by position in the file, which its scores do not follow).
  Llama-style files prepend a space to the text; Gemma's turn spaces into `\u2581` and do not."""
  gemma = meta['arch'].startswith('gemma')
  tokens = list(meta['tokens'])
  if gemma:  # Gemma stores runs of spaces as spaces; its pieces spell them as \u2581
    tokens = [_SPACE * len(t) if ' ' in t and not t.strip() else t for t in tokens]
  vocab: dict[str, int] = {}
  for i, t in enumerate(tokens):
    vocab.setdefault(t, i)
  scores = meta['scores'] or [0.0] * len(tokens)
  rank = {t: -i if gemma else scores[i] for t, i in vocab.items()}
  merges = []
  for token, score in rank.items():
    pairs = [(token[:k], token[k:]) for k in range(1, len(token))
             if token[:k] in vocab and token[k:] in vocab]
    merges += [(a, b, score) for a, b in sorted(pairs, key=lambda p: (vocab[p[0]], vocab[p[1]]))]
  merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
  unk = meta['ids'].get('unknown')
  backend = tokenizers.Tokenizer(models.BPE(
      vocab=vocab, merges=[(a, b) for a, b, _ in merges], fuse_unk=True, byte_fallback=True,
      unk_token=tokens[unk] if unk is not None else None))
  steps = [decoders.Replace(_SPACE, ' '), decoders.ByteFallback(), decoders.Fuse()]
  if gemma:
    backend.normalizer = tokenizers.normalizers.Replace(' ', _SPACE)
    backend.pre_tokenizer = pre_tokenizers.Split(' ', behavior='merged_with_previous')
  else:
    prefix = meta.get('add_space_prefix')
    prefix = True if prefix is None else bool(prefix)
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=_SPACE, prepend_scheme='first' if prefix else 'never', split=False)
    if prefix:
      steps.append(decoders.Strip(' ', 1, 0))
  backend.decoder = decoders.Sequence(steps)
  return backend


def _sentencepiece(path: str, special: dict[str, str | None], template: str | None) -> Tokenizer:
  import sentencepiece

  sp = sentencepiece.SentencePieceProcessor(model_file=path)
  piece = lambda i: sp.id_to_piece(i) if i >= 0 else None
  bos = special['bos_token'] or piece(sp.bos_id())
  eos = special['eos_token'] or piece(sp.eos_id())
  if eos is None:
    raise TokenizerError(f'{path}: the SentencePiece model defines no end-of-sequence token')
  pad_id = sp.pad_id() if sp.pad_id() >= 0 else sp.piece_to_id(eos)

  def offsets(text):
    proto = sp.encode(text, out_type='immutable_proto')
    return [p.id for p in proto.pieces], [(p.begin, p.end) for p in proto.pieces]

  return Tokenizer(encode_fn=lambda text: sp.encode(text), offsets_fn=offsets,
                   decode_fn=lambda ids: sp.decode(ids),
                   vocab_size=sp.get_piece_size(),
                   bos_id=sp.piece_to_id(bos) if bos else None, eos_id=sp.piece_to_id(eos),
                   pad_id=pad_id, bos_token=bos or '', eos_token=eos, chat_template=template,
                   source=path)
