"""Tokenizers: a built-in byte-level one, or a Hugging Face `tokenizer.json`."""

from __future__ import annotations

import dataclasses
import os

import tokenizers
from tokenizers import decoders, models, pre_tokenizers

BYTE = 'byte'
_BOS_NAMES = ('<|begin_of_text|>', '<s>', '<bos>', '<|im_start|>')
_EOS_NAMES = ('<|end_of_text|>', '<|eot_id|>', '</s>', '<eos>', '<|endoftext|>', '<|im_end|>')
_PAD_NAMES = ('<pad>', '<|finetune_right_pad_id|>', '<|pad|>')


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  """A `tokenizers.Tokenizer` with its special ids."""

  backend: tokenizers.Tokenizer
  bos_id: int | None
  eos_id: int
  pad_id: int

  @property
  def vocab_size(self) -> int:
    return self.backend.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    return self.backend.encode(text, add_special_tokens=False).ids

  def decode(self, ids: list[int]) -> str:
    return self.backend.decode(ids, skip_special_tokens=True)


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
  return Tokenizer(backend, bos_id=1, eos_id=2, pad_id=0)


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


def load(spec: str) -> Tokenizer:
  """'byte' for the built-in tokenizer, or a `tokenizer.json` file or a folder holding one."""
  if spec == BYTE:
    return byte_level()
  path = os.path.join(spec, 'tokenizer.json') if os.path.isdir(spec) else spec
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f'data.tokenizer={spec!r}: no tokenizer.json found there; pass {BYTE!r} for the '
        'built-in byte-level tokenizer, a tokenizer.json file, or a folder holding one.'
    )
  backend = tokenizers.Tokenizer.from_file(path)
  vocab = backend.get_vocab(with_added_tokens=True)

  def find(names):
    return next((vocab[n] for n in names if n in vocab), None)

  eos = find(_EOS_NAMES)
  if eos is None:
    raise ValueError(f'{path}: no end-of-sequence token found (looked for {_EOS_NAMES}).')
  pad = find(_PAD_NAMES)
  return Tokenizer(backend, bos_id=find(_BOS_NAMES), eos_id=eos, pad_id=eos if pad is None else pad)
