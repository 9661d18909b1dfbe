"""When two records are the same: normalised text, exact and near duplicates, contradictions and
n-gram overlap with held-out data. Pure functions over numpy; the audit and the filters share them.

Near duplicates are MinHash signatures (one-permutation hashing) of character 5-gram shingles,
bucketed by LSH bands (`BANDS` x `ROWS` = `NUM_PERM`), then confirmed by the estimated Jaccard
similarity. The few
lines are written over numpy rather than taken from `datasketch`: it hashes every shingle with
SHA-1 in a Python loop (about 20 million calls for 100k chat records), where a polynomial hash
over the whole text is one vectorised expression; and the hashes here depend on nothing but
the text, so every host computes the same ones.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Any

import numpy as np

from ftjax.data import formats

SHINGLE = 5  # characters per shingle
NUM_PERM = 64  # MinHash signature length
BANDS, ROWS = 16, 4  # LSH: a pair shares a bucket with probability 1 - (1 - J^4)^16
THRESHOLD = 0.8  # estimated Jaccard similarity at or above which two texts are near duplicates
# A row is compared with at most this many earlier rows of its bucket, so templated data (one
# bucket of 10^5 rows) stays linear; a match further back in a bucket that big is missed.
BUCKET_WINDOW = 1000
NGRAM = 13  # words per n-gram for contamination (the common decontamination practice)
_PRIME = np.uint64((1 << 61) - 1)
_perm = np.random.default_rng(20240601)
_A = _perm.integers(1, 1 << 31, NUM_PERM, dtype=np.uint64)
_B = _perm.integers(0, 1 << 31, NUM_PERM, dtype=np.uint64)
_WORD = re.compile(r'\w+')


def normalize(text: str) -> str:
  """NFKC, case-folded, whitespace collapsed: what 'the same text' means here."""
  return ' '.join(unicodedata.normalize('NFKC', text).casefold().split())


def parts(record: dict[str, Any], fmt: str) -> tuple[str, str]:
  """(prompt, answer) of a record: what is asked and what the model learns to say. A plain
  `text` record has no prompt; a conversation's answer is its last assistant turn and its prompt
  every turn before that; a preference pair's answer is chosen and rejected together."""
  if fmt == 'text':
    return '', str(record.get('text', ''))
  if fmt == 'prompt_completion':
    return str(record.get('prompt', '')), str(record.get('completion', ''))
  if fmt == 'alpaca':
    return (f"{record.get('instruction', '')}\n{record.get('input', '') or ''}",
            str(record.get('output', '')))
  if fmt == 'preference':
    prompt = record.get('prompt', '')
    prompt = prompt if isinstance(prompt, str) else _render(prompt)
    return prompt, f"{_render(record['chosen'])}\n\x00\n{_render(record['rejected'])}"
  messages = formats.messages_of(record, fmt)
  last = max((i for i, m in enumerate(messages) if m['role'] == 'assistant'), default=None)
  if last is None:
    return _render(messages), ''
  return _render(messages[:last]), messages[last]['content']


def _render(value: Any) -> str:
  if isinstance(value, str):
    return value
  return '\n'.join(f"{m.get('role', '')}: {m.get('content', '')}" for m in value
                   if isinstance(m, dict))


def _codes(text: str) -> np.ndarray:
  return np.frombuffer(text.encode('utf-32-le'), np.uint32).astype(np.uint64)


def _rolling(values: np.ndarray, n: int) -> np.ndarray:
  """A hash of every window of `n` consecutive values (mod 2^61 - 1, a fixed polynomial)."""
  if len(values) < n:
    n = max(len(values), 1)
    values = values if len(values) else np.zeros(1, np.uint64)
  out = np.zeros(len(values) - n + 1, np.uint64)
  for k in range(n):  # n is small: 5 or 13 vectorised passes
    out = (out * np.uint64(1_000_003) + values[k:len(values) - n + 1 + k]) % _PRIME
  return out


def signature(text: str) -> np.ndarray:
  """The MinHash signature (NUM_PERM uint32) of `text`'s character shingles (normalised), by
  one-permutation hashing: each shingle is hashed once and falls in one of NUM_PERM bins, whose
  minimum is the bin's value; an empty bin borrows the next non-empty one's (rotation
  densification). O(shingles), where NUM_PERM permutations cost O(shingles x NUM_PERM)."""
  shingles = _rolling(_codes(normalize(text)), SHINGLE)
  h = (shingles * _A[0] + _B[0]) % _PRIME
  bins, values = (h % np.uint64(NUM_PERM)).astype(np.int64), h // np.uint64(NUM_PERM)
  sig = np.full(NUM_PERM, np.iinfo(np.uint64).max, np.uint64)
  np.minimum.at(sig, bins, values)
  empty = sig == np.iinfo(np.uint64).max
  if empty.all():
    return np.zeros(NUM_PERM, np.uint32)
  if empty.any():
    full = np.flatnonzero(~empty)
    # the next non-empty bin to the right (circularly), and how far it is
    nxt = full[np.searchsorted(full, np.arange(NUM_PERM)) % len(full)]
    distance = (nxt - np.arange(NUM_PERM)) % NUM_PERM
    sig = sig[nxt] + distance.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
  return (sig & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def similarity(a: np.ndarray, b: np.ndarray) -> float:
  """The estimated Jaccard similarity of two signatures."""
  return float(np.mean(a == b))


_BAND_MIX = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9,
                      0x27D4EB2F165667C5], np.uint64)


class _Rows:
  """A growing 2-D array (one signature per row), without a Python object per row."""

  def __init__(self, width: int):
    self._data, self.count = np.zeros((1024, width), np.uint32), 0

  def append(self, row: np.ndarray) -> int:
    if self.count == len(self._data):
      self._data = np.concatenate([self._data, np.zeros_like(self._data)])
    self._data[self.count] = row
    self.count += 1
    return self.count - 1

  def __getitem__(self, index: int) -> np.ndarray:
    return self._data[index]

  def all(self) -> np.ndarray:
    return self._data[:self.count]


def near_duplicates(signatures: np.ndarray) -> dict[int, int]:
  """{row: the first earlier row it is a near duplicate of} over a 2-D array of signatures.

  LSH in batch: per band, rows are sorted by the band's 64-bit key; a row is compared only with
  the earlier rows of its bucket, and a match is kept at or above THRESHOLD. Memory is the
  signatures plus one key per row and band being sorted (no per-row Python objects)."""
  n = len(signatures)
  best = np.full(n, n, np.int64)
  for b in range(BANDS):
    keys = (signatures[:, b * ROWS:(b + 1) * ROWS].astype(np.uint64) * _BAND_MIX).sum(axis=1)
    order = np.argsort(keys, kind='stable')  # rows of one bucket, ascending
    ranked = keys[order]
    starts = np.flatnonzero(np.concatenate([[True], ranked[1:] != ranked[:-1]]))
    ends = np.append(starts[1:], n)
    for lo, hi in zip(starts[ends - starts > 1], ends[ends - starts > 1], strict=True):
      group = order[lo:hi]
      for k in range(1, len(group)):
        earlier = group[max(0, k - BUCKET_WINDOW):k]
        same = (signatures[earlier] == signatures[group[k]]).mean(axis=1) >= THRESHOLD
        if same.any():
          best[group[k]] = min(best[group[k]], earlier[np.argmax(same)])
  return {int(row): int(of) for row, of in enumerate(best) if of < n}


def ngrams(text: str, n: int = NGRAM) -> np.ndarray:
  """Hashes of the word n-grams of the normalised text (one hash of all words if fewer)."""
  words = _WORD.findall(normalize(text))
  if not words:
    return np.zeros(0, np.uint64)
  ids = np.array([_word_hash(w) for w in words], np.uint64)
  return _rolling(ids, n)


def _word_hash(word: str) -> int:
  return int(_rolling(_codes(word), len(word))[0])


class HeldOut:
  """The n-grams of held-out examples; `mark` records which examples a training text shares one
  with. Memory is the held-out set's, whatever the size of the training data."""

  def __init__(self, texts: list[str]):
    grams = [ngrams(t) for t in texts]
    owners = np.concatenate([np.full(len(g), i, np.int64) for i, g in enumerate(grams)] or
                            [np.zeros(0, np.int64)])
    flat = np.concatenate(grams or [np.zeros(0, np.uint64)])
    order = np.argsort(flat, kind='stable')
    self._grams, self._owners = flat[order], owners[order]
    self.hit = np.zeros(len(texts), bool)

  def mark(self, text: str) -> bool:
    """Marks the examples sharing an n-gram with `text`; whether there was any."""
    if not len(self._grams):
      return False
    g = ngrams(text)
    lo = np.searchsorted(self._grams, g, 'left')
    hi = np.searchsorted(self._grams, g, 'right')
    found = hi > lo
    for a, b in zip(lo[found], hi[found], strict=True):
      self.hit[self._owners[a:b]] = True
    return bool(found.any())


def _key(text: str) -> int:
  return int.from_bytes(hashlib.blake2b(text.encode('utf-8'), digest_size=8).digest(), 'little')


class Deduper:
  """Records added in order (0, 1, ...): `add` says whether one repeats an earlier record
  exactly (normalised text); `near`, once all are added, which nearly repeat one;
  `contradictions` groups the records whose prompt has answers that are not near duplicates of
  each other. Exact duplicates join no group."""

  def __init__(self):
    self._exact: dict[int, int] = {}
    self._signatures = _Rows(NUM_PERM)  # of every record that is not an exact duplicate
    self._ids: list[int] = []  # the record number of each signature row
    # normalised prompt -> (answer key, row of its signature in _answers, record), or a list
    self._prompts: dict[int, Any] = {}
    self._answers = _Rows(NUM_PERM)
    self.count = 0

  def add(self, prompt: str, answer: str) -> int | None:
    """The record number of the earlier record this one repeats exactly, or None."""
    index = self.count
    self.count += 1
    full = normalize(f'{prompt}\n{answer}')
    key = _key(full)
    if key in self._exact:
      return self._exact[key]
    self._exact[key] = index
    self._signatures.append(signature(full))
    self._ids.append(index)
    p = normalize(prompt)
    if p:
      a = normalize(answer)
      entry = (_key(a), self._answers.append(signature(a)), index)
      held = self._prompts.get(_key(p))
      if held is None:
        self._prompts[_key(p)] = entry
      elif isinstance(held, list):
        held.append(entry)
      else:
        self._prompts[_key(p)] = [held, entry]
    return None

  def near(self) -> dict[int, int]:
    """{record: the first earlier record it nearly repeats} (exact duplicates excluded)."""
    rows = near_duplicates(self._signatures.all())
    return {self._ids[row]: self._ids[of] for row, of in rows.items()}

  def contradictions(self) -> list[tuple[int, list[int]]]:
    """(first record of a prompt, the later ones whose answers differ from its answer)."""
    out = []
    for entries in self._prompts.values():
      if not isinstance(entries, list):
        continue
      first = entries[0]
      differing = [e[2] for e in entries[1:] if e[0] != first[0] and similarity(
          self._answers[e[1]], self._answers[first[1]]) < THRESHOLD]
      if differing:
        out.append((first[2], differing))
    return out
