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

`grpo` (online RL, docs/grpo.md) reads rollout rows instead: prompt + one sampled completion
per row, `objective.group_size` rows per prompt, each with the rewards of its completion. Its
loss (`grpo_loss`) is TRL's: group-normalised advantages, the token-level clipped ratio to the
rollout-time policy (DAPO's asymmetric `epsilon_high`), the k3 KL to the reference, averaged per
sequence, per token or over a fixed length (`loss_norm`).

Every loss is already divided by the batch's normalizers (`normalizers`, computed on the whole
global batch before gradient accumulation), so summing microbatch losses and gradients gives
exactly the update of one big batch.

A mixture of experts adds its router's auxiliary losses to every kind (`aux_penalty`, weighted
by `router_aux_loss_coef` and `router_z_loss_coef`); they are computed per microbatch, so with
accumulation the step's figure is the mean over microbatches, not over one big batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from ftjax import losses

KINDS = ('sft', 'dpo', 'ipo', 'simpo', 'orpo', 'grpo')
REFERENCE_FREE = ('sft', 'simpo', 'orpo')
LOSS_NORMS = ('sequence', 'token', 'fixed')  # TRL loss_type grpo | bnpo and dapo | dr_grpo
SCALE_REWARDS = ('group', 'batch', 'none')  # 'none' is Dr. GRPO's (no std division)
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
  # grpo (ignored by the other kinds)
  group_size: int = 4
  prompts_per_step: int = 8
  rewards: tuple[dict[str, Any], ...] = ({'fn': 'exact_match', 'weight': 1.0},)
  epsilon: float = 0.2
  epsilon_high: float = 0.0  # 0 = epsilon (symmetric clip)
  kl_beta: float = 0.0
  num_iterations: int = 1
  loss_norm: str = 'token'
  scale_rewards: str = 'group'
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  max_new_tokens: int = 32
  # mixtures of experts (every kind): weights of the router's auxiliary losses in the loss
  router_aux_loss_coef: float = 0.0
  router_z_loss_coef: float = 0.0

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f'objective.kind={self.kind!r} is not one of {KINDS}')
    # Lists from a config or JSON become hashable tuples (the options are a static argument).
    object.__setattr__(self, 'rewards', tuple(
        tuple(sorted(dict(r).items())) if hasattr(r, 'items') else tuple(tuple(kv) for kv in r)
        for r in self.rewards))
    if self.kind == 'grpo':
      self._check_grpo()
    if not self.beta > 0:
      raise ValueError(f'objective.beta={self.beta} must be > 0')
    if not 0.0 <= self.label_smoothing < 0.5:
      raise ValueError(f'objective.label_smoothing={self.label_smoothing} must be in [0, 0.5)')
    for name in ('router_aux_loss_coef', 'router_z_loss_coef'):
      if not getattr(self, name) >= 0:
        raise ValueError(f'objective.{name}={getattr(self, name)} must be >= 0')
    if self.precompute_ref and not self.uses_reference:
      raise ValueError(f'objective.precompute_ref=True needs a reference model; '
                       f'objective.kind={self.kind!r} has none')

  def _check_grpo(self):
    checks = [('group_size', self.group_size >= 2, '>= 2 (advantages compare a group)'),
              ('prompts_per_step', self.prompts_per_step >= 1, '>= 1'),
              ('epsilon', 0 < self.epsilon < 1, 'in (0, 1)'),
              ('epsilon_high', self.epsilon_high >= 0, '>= 0 (0 = epsilon)'),
              ('kl_beta', self.kl_beta >= 0, '>= 0 (0 = no KL term, no reference)'),
              ('num_iterations', self.num_iterations >= 1, '>= 1'),
              ('temperature', 0 < self.temperature < float('inf'), '> 0 (rollouts sample)'),
              ('top_p', 0 < self.top_p <= 1, 'in (0, 1]'), ('top_k', self.top_k >= 0, '>= 0'),
              ('max_new_tokens', self.max_new_tokens >= 1, '>= 1')]
    for name, ok, rule in checks:
      if not ok:
        raise ValueError(f'objective.{name}={getattr(self, name)} must be {rule}')
    for name, value, allowed in (('loss_norm', self.loss_norm, LOSS_NORMS),
                                 ('scale_rewards', self.scale_rewards, SCALE_REWARDS)):
      if value not in allowed:
        raise ValueError(f'objective.{name}={value!r} is not one of {allowed}')
    if not self.rewards:
      raise ValueError("objective.rewards is empty: give at least one {'fn': ..., 'weight': w}")
    for i, spec in enumerate(self.reward_specs):
      if not isinstance(spec.get('fn'), str):
        raise ValueError(f"objective.rewards[{i}]={spec} needs 'fn': a built-in name "
                         "(exact_match, regex, number) or 'module:function'")
    if self.precompute_ref:
      raise ValueError('objective.precompute_ref=True does not apply to grpo: its completions '
                       'are sampled during training (the reference runs at each rollout)')

  @property
  def reward_specs(self) -> list[dict[str, Any]]:
    """`objective.rewards` as dicts (`{'fn': ..., 'weight': ..., options}`)."""
    return [dict(r) for r in self.rewards]

  @property
  def pairs(self) -> bool:
    """Whether the data are preference pairs (dpo, ipo, simpo, orpo)."""
    return self.kind not in ('sft', 'grpo')

  @property
  def rollouts(self) -> bool:
    """Whether each step samples its own completions (grpo)."""
    return self.kind == 'grpo'

  @property
  def rows_per_step(self) -> int:
    """grpo: the rows of one rollout batch (prompts x completions per prompt)."""
    return self.prompts_per_step * self.group_size

  @property
  def clip_high(self) -> float:
    return self.epsilon_high or self.epsilon

  @property
  def uses_reference(self) -> bool:
    if self.kind == 'grpo':
      return self.kl_beta > 0
    return self.kind not in REFERENCE_FREE

  @property
  def live_reference(self) -> bool:
    """Whether each step runs the reference's forward pass (MFU counts it)."""
    return self.uses_reference and not self.precompute_ref


SFT = Options()  # the default objective


def normalizers(options: Options, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Denominators of the loss, from the whole global batch (known before any forward pass)."""
  mask = batch['loss_mask'].astype(jnp.float32)
  rows = jnp.float32(mask.shape[0])  # a microbatch's share of the auxiliary losses
  if options.rollouts:
    return dict(tokens=jnp.sum(mask), sequences=rows, rows=rows,
                fixed=rows * options.max_new_tokens)
  if not options.pairs:
    return dict(tokens=jnp.sum(mask), rows=rows)
  counts = segment_sums(mask, batch['segment_ids'])
  valid = (counts[:, 0] > 0) & (counts[:, 1] > 0)
  positions = segment_sums(jnp.ones_like(mask), batch['segment_ids'])[:, 0]
  return dict(tokens=jnp.sum(counts[:, 0]), rows=rows,
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
  return sequence_logps_and_aux(model, batch, dropout_key=dropout_key, loss_chunk=loss_chunk)[0]


def sequence_logps_and_aux(model, batch: dict[str, jax.Array], *, dropout_key=None,
                           loss_chunk: int = 0) -> tuple[tuple[jax.Array, ...], dict]:
  """`sequence_logps` and the model's auxiliary losses (`forward`)."""
  hidden, aux = forward(model, batch, dropout_key)
  token_logps, hits = losses.chunked_token_logps(hidden, batch['targets'], model.logits,
                                                 loss_chunk)
  mask, segments = batch['loss_mask'].astype(jnp.float32), batch['segment_ids']
  return (segment_sums(token_logps * mask, segments), segment_sums(mask, segments),
          segment_sums(hits * mask, segments), segment_sums(token_logps, segments)), aux


def token_logps(model, batch: dict[str, jax.Array], *, temperature: float = 1.0,
                dropout_key=None, loss_chunk: int = 0, entropy: bool = False) -> tuple:
  """`[B, T]` log-probabilities of every target token (and with `entropy` the distribution's
  entropy) under the model's logits divided by `temperature` (the distribution rollouts sample
  from, as TRL scores them), and the model's auxiliary losses (`forward`) last."""
  hidden, aux = forward(model, batch, dropout_key)
  logits_fn = model.logits if temperature == 1.0 else (lambda h: model.logits(h) / temperature)
  out = losses.chunked_token_logps(hidden, batch['targets'], logits_fn, loss_chunk, entropy)
  return (out[0], out[2], aux) if entropy else (out[0], aux)


def forward(model, batch: dict[str, jax.Array], dropout_key=None
            ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The batch's final hidden states and the model's auxiliary losses by name (a mixture of
  experts' `router_aux_loss` and `router_z_loss`; `{}` for a dense model)."""
  return model.hidden_and_aux(batch['tokens'], batch['positions'], batch['segment_ids'],
                              dropout_key=dropout_key)


def aux_penalty(options: Options, aux: dict[str, jax.Array]) -> jax.Array:
  """What the auxiliary losses add to the objective: each times its coefficient."""
  coefs = dict(router_aux_loss=options.router_aux_loss_coef,
               router_z_loss=options.router_z_loss_coef)
  return sum((coefs[k] * v for k, v in aux.items() if coefs[k]), jnp.zeros(()))


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


def advantages(options: Options, rewards: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Per row, the weighted reward's advantage over its group (TRL's `sum_then_normalize`): minus
  the group mean, divided by the group's (or with `scale_rewards='batch'` the batch's) unbiased
  std + 1e-4, or not divided (`'none'`, Dr. GRPO); and the reward metrics.

  `rewards`: `[B, F]`, one column per reward function, rows grouped by prompt (row r completes
  prompt r // group_size).
  """
  weights = jnp.asarray([float(s.get('weight', 1.0)) for s in options.reward_specs], jnp.float32)
  total = jnp.sum(rewards * weights[None, :], axis=-1)
  grouped = total.reshape(-1, options.group_size)
  baseline = jnp.repeat(jnp.mean(grouped, axis=1), options.group_size)
  group_std = jnp.repeat(jnp.std(grouped, axis=1, ddof=1), options.group_size)
  std = (jnp.broadcast_to(jnp.std(total, ddof=1), total.shape)
         if options.scale_rewards == 'batch' else group_std)
  adv = total - baseline
  if options.scale_rewards != 'none':
    adv = adv / (std + 1e-4)
  metrics = dict(reward=jnp.mean(total), reward_std=jnp.std(total, ddof=1),
                 reward_group_std=jnp.mean(group_std),
                 frac_groups_zero_std=jnp.mean((jnp.std(grouped, axis=1) == 0)
                                               .astype(jnp.float32)))
  for i, name in enumerate(reward_names(options)):
    metrics[f'reward_{name}'] = jnp.mean(rewards[:, i])
    metrics[f'reward_{name}_std'] = jnp.std(rewards[:, i], ddof=1)
  return adv, metrics


def reward_names(options: Options) -> list[str]:
  """One metric name per reward function: its `name`, else the function's name."""
  names = []
  for spec in options.reward_specs:
    name = spec.get('name') or spec['fn'].rpartition(':')[2]
    names.append(name if name not in names else f'{name}_{len(names)}')
  return names


def grpo_loss(options: Options, logps: jax.Array, entropy: jax.Array, batch: dict[str, jax.Array],
              norm: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
  """TRL's GRPO loss of these rows, divided by the global batch's `norm`, and its metrics.

  `logps`, `entropy`: `[B, T]` per target token under the policy (at the sampling temperature).
  The batch holds `loss_mask` (the completion's tokens), `advantages` `[B]`, and where they
  apply `old_logps` (the rollout-time policy; absent with one iteration: then the ratio is 1
  and only its gradient counts) and `ref_logps` (`[B, T]` each).
  """
  o = options
  mask = batch['loss_mask'].astype(jnp.float32)
  old = batch['old_logps'] if 'old_logps' in batch else jax.lax.stop_gradient(logps)
  ratio = jnp.exp(logps - old)
  adv = batch['advantages'][:, None]
  clipped = jnp.clip(ratio, 1.0 - o.epsilon, 1.0 + o.clip_high)
  per_token = -jnp.minimum(ratio * adv, clipped * adv)
  extra = {}
  if o.kl_beta > 0:
    delta = batch['ref_logps'] - logps
    # k3 (>= 0), weighted by the ratio to the policy that sampled the token: unbiased for the
    # current policy (TRL's use_bias_correction_kl, after DeepSeek-V3.2).
    kl = (jnp.exp(delta) - delta - 1.0) * ratio
    per_token = per_token + o.kl_beta * kl
    extra['kl'] = jnp.sum(jax.lax.stop_gradient(kl) * mask) / norm['tokens']
  if o.loss_norm == 'sequence':
    lengths = jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
    loss = jnp.sum(jnp.sum(per_token * mask, axis=-1) / lengths) / norm['sequences']
  else:
    loss = jnp.sum(per_token * mask) / norm['tokens' if o.loss_norm == 'token' else 'fixed']
  ratio = jax.lax.stop_gradient(ratio)
  low = (ratio < 1.0 - o.epsilon) & (adv < 0)
  high = (ratio > 1.0 + o.clip_high) & (adv > 0)

  def token_mean(x):
    return jnp.sum(x.astype(jnp.float32) * mask) / norm['tokens']

  metrics = dict(entropy=token_mean(jax.lax.stop_gradient(entropy)), clip_low=token_mean(low),
                 clip_high=token_mean(high), clip_fraction=token_mean(low | high),
                 completion_length=jnp.sum(mask) / norm['sequences'], **extra)
  return loss, metrics
