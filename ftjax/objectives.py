"""Objectives: how a batch becomes a loss and which metrics it reports (`objective.kind`).

`sft` is next-token cross-entropy over the loss-masked tokens. The preference objectives read
rows that hold one pair each: segment 1 is prompt + chosen, segment 2 is prompt + rejected, and
only completion tokens are loss-masked. From the per-row sums of completion log-probabilities
(`sequence_logps`) they compute, per pair (TRL's definitions, see docs/preference.md):

- `dpo`: -(1-e) log sigmoid(beta d) - e log sigmoid(-beta d), d = (pi_c - ref_c) - (pi_r - ref_r)
- `ipo`: (d_avg - 1/(2 beta))^2, with d over completion-length-averaged log-ratios
- `simpo`: the dpo form over beta * (avg pi_c - avg pi_r) - gamma (no reference)
- `orpo`: the mean cross-entropy over every token of prompt + chosen (as the ORPO authors' code
  and TRL) - lambda_ * log sigmoid(log odds ratio) (averaged log-probabilities, no reference)

Every loss is already divided by the batch's normalizers (`normalizers`, computed on the whole
global batch before gradient accumulation), so summing microbatch losses and gradients gives
exactly the update of one big batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ftjax import losses

KINDS = ('sft', 'dpo', 'ipo', 'simpo', 'orpo')
REFERENCE_FREE = ('sft', 'simpo', 'orpo')
PAIR_METRICS = ('rewards_chosen', 'rewards_rejected', 'reward_margin', 'reward_accuracy',
                'logps_chosen', 'logps_rejected')


@dataclasses.dataclass(frozen=True, kw_only=True)
class Options:
  """The `objective` config section, checked."""

  kind: str = 'sft'
  beta: float = 0.1
  label_smoothing: float = 0.0
  gamma: float = 0.5
  lambda_: float = 0.1
  precompute_ref: bool = False

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f'objective.kind={self.kind!r} is not one of {KINDS}')
    if not self.beta > 0:
      raise ValueError(f'objective.beta={self.beta} must be > 0')
    if not 0.0 <= self.label_smoothing < 0.5:
      raise ValueError(f'objective.label_smoothing={self.label_smoothing} must be in [0, 0.5)')
    if self.precompute_ref and not self.uses_reference:
      raise ValueError(f'objective.precompute_ref=True needs a reference model; '
                       f'objective.kind={self.kind!r} has none')

  @property
  def pairs(self) -> bool:
    """Whether the data are preference pairs (every kind but sft)."""
    return self.kind != 'sft'

  @property
  def uses_reference(self) -> bool:
    return self.kind not in REFERENCE_FREE

  @property
  def live_reference(self) -> bool:
    """Whether each step runs the reference's forward pass (MFU counts it)."""
    return self.uses_reference and not self.precompute_ref


SFT = Options()  # the default objective


def normalizers(options: Options, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Denominators of the loss, from the whole global batch (known before any forward pass)."""
  mask = batch['loss_mask'].astype(jnp.float32)
  if not options.pairs:
    return dict(tokens=jnp.sum(mask))
  counts = segment_sums(mask, batch['segment_ids'])
  valid = (counts[:, 0] > 0) & (counts[:, 1] > 0)
  positions = segment_sums(jnp.ones_like(mask), batch['segment_ids'])[:, 0]
  return dict(tokens=jnp.sum(counts[:, 0]),
              pairs=jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32),
              chosen_positions=jnp.maximum(jnp.sum(positions * valid), 1.0))


def segment_sums(values: jax.Array, segment_ids: jax.Array) -> jax.Array:
  """`[B, T]` values summed per row over segment 1 (chosen) and 2 (rejected): `[B, 2]`."""
  return jnp.stack([jnp.sum(jnp.where(segment_ids == k, values, 0.0), axis=-1) for k in (1, 2)],
                   axis=-1)


def sequence_logps(model, batch: dict[str, jax.Array], *, dropout_key=None,
                   loss_chunk: int = 0) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Per row, the summed completion log-probabilities of chosen and rejected (`[B, 2]`), their
  completion token counts, their argmax hits on those tokens, and the log-probabilities summed
  over every position of each sequence, prompt included (`[B, 2]` each)."""
  hidden = model.hidden(batch['tokens'], batch['positions'], batch['segment_ids'],
                        dropout_key=dropout_key)
  token_logps, hits = losses.chunked_token_logps(hidden, batch['targets'], model.logits,
                                                 loss_chunk)
  mask, segments = batch['loss_mask'].astype(jnp.float32), batch['segment_ids']
  return (segment_sums(token_logps * mask, segments), segment_sums(mask, segments),
          segment_sums(hits * mask, segments), segment_sums(token_logps, segments))


def _smoothed(logits: jax.Array, label_smoothing: float) -> jax.Array:
  return (-jax.nn.log_sigmoid(logits) * (1.0 - label_smoothing)
          - jax.nn.log_sigmoid(-logits) * label_smoothing)


def _log1mexp(x: jax.Array) -> jax.Array:
  """log(1 - exp(x)) for x < 0, stable at both ends."""
  return jnp.where(x > -0.693, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def pair_loss(options: Options, logps: jax.Array, counts: jax.Array, ref_logps: jax.Array | None,
              norm: dict[str, jax.Array], whole: jax.Array | None = None
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The preference loss of these rows divided by `norm`, and its metrics (also divided, so
  that microbatch values add up to the global batch's means). `whole`: the log-probabilities
  over every position of each sequence (ORPO's NLL term)."""
  o = options
  extra = {}
  valid = ((counts[:, 0] > 0) & (counts[:, 1] > 0)).astype(jnp.float32)
  lengths = jnp.maximum(counts, 1.0)
  if o.kind in ('dpo', 'ipo'):
    ratios = logps - ref_logps
    if o.kind == 'dpo':
      per_pair = _smoothed(o.beta * (ratios[:, 0] - ratios[:, 1]), o.label_smoothing)
    else:
      avg = ratios / lengths
      per_pair = (avg[:, 0] - avg[:, 1] - 1.0 / (2.0 * o.beta)) ** 2
    rewards, shown = o.beta * ratios, logps
    loss = jnp.sum(per_pair * valid) / norm['pairs']
  else:
    avg = logps / lengths
    shown = avg
    if o.kind == 'simpo':
      per_pair = _smoothed(o.beta * (avg[:, 0] - avg[:, 1]) - o.gamma, o.label_smoothing)
      rewards = o.beta * avg
      loss = jnp.sum(per_pair * valid) / norm['pairs']
    else:  # orpo
      log_odds = (avg[:, 0] - avg[:, 1]) - (_log1mexp(avg[:, 0]) - _log1mexp(avg[:, 1]))
      ratio = jax.nn.log_sigmoid(log_odds)
      rewards = o.lambda_ * avg
      nll = -jnp.sum(whole[:, 0] * valid) / norm['chosen_positions']
      loss = nll - o.lambda_ * jnp.sum(ratio * valid) / norm['pairs']
      extra = dict(nll_chosen=jax.lax.stop_gradient(nll),
                   log_odds_ratio=jax.lax.stop_gradient(jnp.sum(ratio * valid) / norm['pairs']))
  rewards = jax.lax.stop_gradient(rewards)
  shown = jax.lax.stop_gradient(shown)

  def mean(x):
    return jnp.sum(x * valid) / norm['pairs']

  metrics = dict(rewards_chosen=mean(rewards[:, 0]), rewards_rejected=mean(rewards[:, 1]),
                 reward_margin=mean(rewards[:, 0] - rewards[:, 1]),
                 reward_accuracy=mean((rewards[:, 0] > rewards[:, 1]).astype(jnp.float32)),
                 logps_chosen=mean(shown[:, 0]), logps_rejected=mean(shown[:, 1]), **extra)
  return loss, metrics
