"""grpo's batches: each step's prompts, completions sampled in place, and their rewards.

`Prompts` holds every prompt of the training sources, tokenized as `ftjax generate` and the
generation eval tokenize them. `Rollouts` is what the training loop draws batches from when
`objective.kind=grpo` (where it otherwise draws packed rows from `data.Prefetcher`): every
`objective.num_iterations` steps it takes the next `objective.prompts_per_step` prompts of a
seeded, epoch-by-epoch shuffle, samples `objective.group_size` completions of each with
`ftjax.generation.generate` on the live weights and the training mesh (no copy of the weights,
no second engine), scores each completion on the host that holds its row, and lays the rows out
as a training batch. Which prompts and which random key a rollout uses depend only on
(train.seed, step), so a resumed run replays the rollouts an uninterrupted one makes.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import time
from typing import Any

import jax
import numpy as np
from flax import nnx

from ftjax import generation, objectives, rewards
from ftjax.data import formats, sources
from ftjax.data.pipeline import FIELDS, Options, Source, global_rows


@dataclasses.dataclass
class Prompts:
  """Every usable prompt of the sources: ids, the record (rewards read it) and where it is."""

  ids: list[list[int]]
  records: list[dict[str, Any]]
  where: list[str]
  skipped: collections.Counter

  @classmethod
  def load(cls, srcs: list[Source], options: Options, *, max_length: int) -> Prompts:
    """Reads and tokenizes every record; prompts over `max_length` tokens are never cut.

    Raises:
      DataError: a bad record (on_bad_record=error) or a prompt too long (on_too_long=error),
        naming its file and line; or no usable prompt at all.
    """
    out = cls([], [], [], collections.Counter())
    for source in srcs:
      records = sources.open_records(source.path, split=source.split,
                                     tfds_data_dir=options.tfds_data_dir)
      encoder = formats.Encoder(options.tokenizer, fmt=source.format,
                                chat_template=options.chat_template)
      for i in range(len(records)):
        item = records[i]
        try:
          record = sources.parse(item['raw'])
          ids, _ = encoder.prompt(record)
        except sources.BadRecord as e:
          if options.on_bad_record != 'skip':
            raise sources.DataError(f"{item['where']}: {e} (set data.on_bad_record=skip to skip "
                                    'such records)') from None
          out.skipped[e.reason] += 1
          continue
        if len(ids) > max_length:
          if options.on_too_long == 'error':
            raise sources.DataError(
                f"{item['where']}: the prompt has {len(ids)} tokens, more than the {max_length} "
                'that data.seq_len leaves after objective.max_new_tokens (prompts are never '
                'truncated: raise data.seq_len or shorten the prompt)')
          out.skipped['prompt_too_long'] += 1
          continue
        out.ids.append(ids)
        out.records.append(record)
        out.where.append(item['where'])
    if not out.ids:
      raise sources.DataError(f'no usable prompt in {[s.path for s in srcs]} (skipped: '
                              f'{dict(out.skipped)})')
    return out

  def summary_line(self) -> str:
    skipped = f', skipped {dict(sorted(self.skipped.items()))}' if self.skipped else ''
    longest = max(len(p) for p in self.ids)
    return f'grpo prompts: {len(self.ids)} (longest {longest} tokens){skipped}'


@dataclasses.dataclass
class Rollout:
  """One rollout batch as built on the host (every host builds the same global arrays)."""

  rows: dict[str, np.ndarray]  # FIELDS, `[B, T]` each
  rewards: np.ndarray  # `[B, F]`; only this host's rows are filled
  completions: list[list[int]]  # per row, the sampled ids (through the stop token)
  prompt_rows: np.ndarray  # per row, the index of its prompt in `Prompts`


def layout(prompt_ids: list[list[int]], completions: list[list[int]], seq_len: int
           ) -> dict[str, np.ndarray]:
  """Training rows of prompt + completion: the loss falls on the completion's tokens only."""
  rows = {k: np.zeros((len(prompt_ids), seq_len), np.int32) for k in FIELDS}
  for r, (prompt, completion) in enumerate(zip(prompt_ids, completions, strict=True)):
    seq = list(prompt) + list(completion)
    n = len(seq) - 1  # inputs: all but the last token; targets: all but the first
    if n > seq_len:
      raise ValueError(f'row {r}: {len(prompt)} prompt + {len(completion)} completion tokens do '
                       f'not fit data.seq_len={seq_len}')
    rows['tokens'][r, :n], rows['targets'][r, :n] = seq[:-1], seq[1:]
    rows['positions'][r, :n] = np.arange(n)
    rows['segment_ids'][r, :n] = 1
    rows['loss_mask'][r, len(prompt) - 1:n] = 1
  return rows


def local_rows(sharding: jax.sharding.Sharding, rows: int) -> list[int]:
  """The rows of a `[rows, ...]` batch that this host's devices hold."""
  indices = sharding.addressable_devices_indices_map((rows, 1))
  return sorted({i for index in indices.values() for i in range(*index[0].indices(rows))})


class Cursor:
  """The rollout position that checkpoints save (grain's handler calls these)."""

  def __init__(self):
    self.next_step = 0  # steps (optimizer updates) already drawn

  def get_state(self) -> bytes:
    return json.dumps({'next_step': self.next_step}).encode()

  def set_state(self, state: bytes | dict[str, Any]) -> None:
    self.next_step = int((json.loads(state) if isinstance(state, bytes) else state)['next_step'])

  def start_prefetch(self) -> None:
    pass


class Rollouts:
  """The grpo loop's batches (see the module docstring): `next()` gives the global batch and
  this host's share of its segment ids, as `data.Prefetcher` does."""

  def __init__(self, trainer: Any, prompts: Prompts, objective: objectives.Options, *,
               seq_len: int, seed: int, tokenizer: Any, num_samples: int = 3):
    self.trainer, self.prompts, self.objective = trainer, prompts, objective
    self.seq_len, self.seed, self.tokenizer = seq_len, seed, tokenizer
    self.num_samples = num_samples
    self.scorer = rewards.Scorer.load(objective.reward_specs, objectives.reward_names(objective))
    self._epochs: dict[int, np.ndarray] = {}
    self.iterator = Cursor()
    self.skipped = _Counts(prompts.skipped)
    self._batch: dict[str, jax.Array] | None = None
    self._segment_ids: np.ndarray | None = None
    self._window = dict(seconds=0.0, tokens=0, rollouts=0)
    self._samples: list[dict[str, Any]] = []

  def get_state(self) -> bytes:
    return self.iterator.get_state()

  def set_state(self, state: bytes | dict[str, Any]) -> None:
    self.iterator.set_state(state)

  def saveable(self, step: int) -> bool:
    """Whether a checkpoint after `step` can be resumed exactly: only at the end of a rollout's
    `num_iterations` updates (a resumed run could not regenerate a rollout mid-way)."""
    return step % self.objective.num_iterations == 0

  def __iter__(self) -> Rollouts:
    return self

  def __next__(self) -> tuple[dict[str, jax.Array], np.ndarray]:
    n = self.iterator.next_step
    if n % self.objective.num_iterations == 0 or self._batch is None:
      self._batch, self._segment_ids = self._make(n // self.objective.num_iterations)
    self.iterator.next_step = n + 1
    return self._batch, self._segment_ids

  def prompt_indices(self, rollout: int) -> list[int]:
    """The prompts of rollout number `rollout` (0, 1, ...): a pure function of (seed, rollout)."""
    p, n = self.objective.prompts_per_step, len(self.prompts.ids)
    return [int(self._order(k // n)[k % n]) for k in range(rollout * p, (rollout + 1) * p)]

  def _order(self, epoch: int) -> np.ndarray:
    """Epoch `epoch`'s permutation of the prompts (a new order every epoch)."""
    if epoch not in self._epochs:
      self._epochs = {epoch: np.random.default_rng([self.seed, epoch]).permutation(
          len(self.prompts.ids)), **{e: v for e, v in self._epochs.items() if e == epoch - 1}}
    return self._epochs[epoch]

  def generate(self, rollout: int) -> list[list[int]]:
    """The sampled completions of rollout `rollout` under the live weights, one list of ids
    per row (through the stop token when one was sampled)."""
    o, trainer = self.objective, self.trainer
    ids = [self.prompts.ids[i] for i in self.prompt_indices(rollout) for _ in range(o.group_size)]
    length = max(len(p) for p in ids)
    padded = np.zeros((len(ids), length), np.int32)
    mask = np.zeros_like(padded)
    for r, p in enumerate(ids):  # left-padded: the prompts end together
      padded[r, length - len(p):], mask[r, length - len(p):] = p, 1
    model = nnx.merge(trainer.graphdef, trainer.state.params, trainer.frozen)
    out = np.asarray(generation.generate(
        model, padded, prompt_mask=mask, max_new_tokens=o.max_new_tokens,
        temperature=o.temperature, top_k=o.top_k or None, top_p=o.top_p,
        seed=(self.seed * 1_000_003 + rollout) % (2**31 - 1), eos_id=self.tokenizer.eos_id,
        pad_id=-1, mesh=trainer.mesh, rules=trainer.rules))
    completions = []
    for row in out.tolist():
      end = row.index(-1) if -1 in row else len(row)
      completions.append(row[:end])
    return completions

  def build(self, rollout: int, completions: list[list[int]]) -> Rollout:
    """The training rows of these completions, and this host's rows' rewards."""
    o = self.objective
    prompt_rows = np.repeat(np.asarray(self.prompt_indices(rollout)), o.group_size)
    rows = layout([self.prompts.ids[i] for i in prompt_rows], completions, self.seq_len)
    scores = np.zeros((len(completions), len(self.scorer.names)), np.float32)
    mine = local_rows(self.trainer.batch_sharding, len(completions))
    stops = {self.tokenizer.eos_id}
    for r in mine:
      text = self.tokenizer.decode([t for t in completions[r] if t not in stops])
      i = int(prompt_rows[r])
      scores[r] = self.scorer.score(text, self.prompts.records[i], self.prompts.where[i])
    return Rollout(rows, scores, completions, prompt_rows)

  def _make(self, rollout: int) -> tuple[dict[str, jax.Array], np.ndarray]:
    # Sampling needs the last update's weights anyway; waiting here first keeps the training
    # step's time out of the rollout's.
    jax.block_until_ready(self.trainer.state.params)
    start = time.perf_counter()
    completions = self.generate(rollout)
    self._window['seconds'] += time.perf_counter() - start
    self._window['tokens'] += sum(len(c) for c in completions)
    self._window['rollouts'] += 1
    built = self.build(rollout, completions)
    sh = self.trainer.batch_sharding
    batch = {k: global_rows(v, sh) for k, v in built.rows.items()}
    batch['rewards'] = global_rows(built.rewards, sh)
    if self.trainer.rollout_logps is not None:
      batch.update(self.trainer.rollout_logps(self.trainer.state.params, self.trainer.frozen,
                                              batch, self.trainer.ref))
    self._keep_samples(built)
    hosts, index = jax.process_count(), jax.process_index()
    return batch, np.array_split(built.rows['segment_ids'], hosts)[index]

  def _keep_samples(self, built: Rollout) -> None:
    stops = {self.tokenizer.eos_id}
    self._samples = []
    for r in local_rows(self.trainer.batch_sharding, len(built.completions))[:self.num_samples]:
      i = int(built.prompt_rows[r])
      self._samples.append(dict(
          prompt=self.tokenizer.decode(self.prompts.ids[i]),
          completion=self.tokenizer.decode([t for t in built.completions[r] if t not in stops]),
          reference=rewards.reference_of(self.prompts.records[i]),
          **{f'reward_{n}': float(v) for n, v in zip(self.scorer.names, built.rewards[r],
                                                      strict=True)}))

  def report(self) -> dict[str, Any]:
    """The log window's rollout throughput and the latest rollout's first completions."""
    w = self._window
    out = dict(rollout_tokens_per_s=w['tokens'] / max(w['seconds'], 1e-9),
               rollout_s=w['seconds'] / max(w['rollouts'], 1), rollout_time_s=w['seconds'],
               rollout_samples=self._samples)
    self._window = dict(seconds=0.0, tokens=0, rollouts=0)
    return out


@dataclasses.dataclass
class _Counts:
  counts: collections.Counter
