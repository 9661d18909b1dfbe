"""The jitted core, pure functions of arrays: TrainState, the train step and the eval step.

`train_step` is one optimizer update over a global batch (gradient accumulation inside, with
the same update as one big batch) for any objective (`ftjax.objectives`); `eval_step` gives the
held-out sums. `ftjax.trainer` jits them with the shardings of a mesh.

The preference objectives' reference model is, by what `ref` holds: `None` with LoRA, the same
weights with the adapters switched off (`lora.adapters_off`); a frozen copy of the initial
trainable weights with full fine-tuning; or, with `objective.precompute_ref`, nothing at all:
the batch then carries `ref_logps`, computed before training.
"""

from __future__ import annotations

import contextlib

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ftjax import lora, losses, objectives


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: nnx.State  # the trainable variables only
  opt_state: optax.OptState


def _loss_and_stats(params, frozen, batch, *, graphdef, dropout_key=None, loss_chunk=0):
  """The summed next-token loss statistics (`losses.chunked_next_token_xent`) and the model's
  auxiliary losses (`objectives.forward`)."""
  model = nnx.merge(graphdef, params, frozen)
  hidden, aux = objectives.forward(model, batch, dropout_key)
  return losses.chunked_next_token_xent(hidden, batch['targets'], batch['loss_mask'],
                                        model.logits, loss_chunk), aux


def reference_logps(params, frozen, batch, ref=None, *, graphdef, loss_chunk=0):
  """The reference model's `[B, 2]` completion log-probabilities of each row's pair."""
  if 'ref_logps' in batch:
    return batch['ref_logps']
  # Fresh Variables at this trace level (inside the accumulation scan), as in `loss_grads`.
  params, frozen, ref = jax.tree.map(lambda x: x, (params, frozen, ref))
  # LoRA (no `ref`): the base is the model with its adapters off.
  with lora.adapters_off() if ref is None else contextlib.nullcontext():
    model = nnx.merge(graphdef, params if ref is None else ref, frozen)
    logps = objectives.sequence_logps(model, batch, loss_chunk=loss_chunk)[0]
  return jax.lax.stop_gradient(logps)


def loss_grads(params: nnx.State, frozen: nnx.State, batch: dict[str, jax.Array],
               norm: dict[str, jax.Array] | None = None, ref: nnx.State | None = None, *,
               graphdef, objective: objectives.Options = objectives.SFT,
               dropout_key: jax.Array | None = None, loss_chunk: int = 0):
  """Gradients of this (micro)batch's share of the loss, that share, and its metrics.

  SFT: the summed masked loss (the caller divides by the token count). Preference objectives:
  the loss already divided by `norm` (`objectives.normalizers` of the whole global batch;
  None = of this batch).
  """
  norm = objectives.normalizers(objective, batch) if norm is None else norm
  ref_logps = (reference_logps(params, frozen, batch, ref, graphdef=graphdef,
                               loss_chunk=loss_chunk)
               if objective.pairs and objective.uses_reference else None)

  def loss_fn(params):
    # Fresh Variables for the frozen weights at this trace level: NNX transforms inside the
    # model (the layer scan) refuse Variables created outside the gradient trace.
    frozen_now = jax.tree.map(lambda x: x, frozen)
    if objective.kind == 'sft':
      stats, aux = _loss_and_stats(params, frozen_now, batch, graphdef=graphdef,
                                   dropout_key=dropout_key, loss_chunk=loss_chunk)
      # The summed loss is divided by the batch's tokens after accumulation: scaled up to match.
      return with_aux(stats['loss_sum'], {}, aux, norm['tokens'])
    model = nnx.merge(graphdef, params, frozen_now)
    if objective.rollouts:
      logps, entropy, aux = objectives.token_logps(
          model, batch, temperature=objective.temperature, dropout_key=dropout_key,
          loss_chunk=loss_chunk, entropy=True)
      return with_aux(*objectives.grpo_loss(objective, logps, entropy, batch, norm), aux)
    (logps, counts, _, whole), aux = objectives.sequence_logps_and_aux(
        model, batch, dropout_key=dropout_key, loss_chunk=loss_chunk)
    return with_aux(*objectives.pair_loss(objective, logps, counts, ref_logps, norm, whole), aux)

  def with_aux(loss, metrics, aux, scale=1.0):
    """The loss plus this microbatch's share (its rows of the global batch) of the weighted
    auxiliary losses, which are logged by name with the same share (they sum to the mean)."""
    if not aux:
      return loss, metrics
    share = batch['loss_mask'].shape[0] / norm['rows']
    return (loss + objectives.aux_penalty(objective, aux) * share * scale,
            dict(metrics, **{k: v * share for k, v in aux.items()}))

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return grads, loss, metrics


def train_step(state: TrainState, frozen: nnx.State, batch: dict[str, jax.Array],
               ref: nnx.State | None = None, *, graphdef, tx: optax.GradientTransformation,
               lr_fn: optax.Schedule, grad_accum: int,
               objective: objectives.Options = objectives.SFT,
               dropout_seed: int | None = None, loss_chunk: int = 0,
               skip_nonfinite: bool = False):
  """One optimizer step over the global batch, split into `grad_accum` microbatches.

  The loss is normalised over the whole global batch (SFT: all its masked tokens; preference:
  all its pairs), so accumulation gives the same update as one big batch. `finite` in the
  metrics says whether loss and gradient norm were finite; with `skip_nonfinite` a step where
  they were not keeps the old weights and optimizer state (only the step count advances).
  """
  # Dropout masks depend only on (seed, step, microbatch): a resumed run draws the same ones.
  key = (None if dropout_seed is None
         else jax.random.fold_in(jax.random.key(dropout_seed), state.step))
  norm = objectives.normalizers(objective, batch)
  reward_metrics = {}
  if objective.rollouts:  # advantages need whole groups: computed before any split
    advantages, reward_metrics = objectives.advantages(objective, batch['rewards'])
    batch = dict(batch, advantages=advantages)
  grads_of = lambda mb, k: loss_grads(state.params, frozen, mb, norm, ref, graphdef=graphdef,
                                      objective=objective, dropout_key=k, loss_chunk=loss_chunk)
  if grad_accum == 1:
    grads, loss, extra = grads_of(batch, key)
  else:
    # Row r goes to microbatch r % grad_accum: each device keeps its own rows (and a
    # preference row holds its whole pair).
    micro = jax.tree.map(
        lambda x: x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1),
        batch)

    def accumulate(carry, inputs):
      microbatch, index = inputs
      out = grads_of(microbatch, None if key is None else jax.random.fold_in(key, index))
      return jax.tree.map(jnp.add, carry, out), None

    zeros = jax.tree.map(jnp.zeros_like,
                         jax.eval_shape(grads_of, jax.tree.map(lambda x: x[0], micro), key))
    (grads, loss, extra), _ = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(grad_accum)))
  if objective.kind == 'sft':  # the summed token loss, divided once over the whole batch
    scale = 1.0 / jnp.maximum(norm['tokens'], 1.0)
    grads = jax.tree.map(lambda g: (g * scale).astype(g.dtype), grads)
    loss = loss * scale
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  if skip_nonfinite:
    keep = lambda new, old: jnp.where(finite, new, old)
    params, opt_state = (jax.tree.map(keep, params, state.params),
                         jax.tree.map(keep, opt_state, state.opt_state))
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  out = dict(loss=loss, grad_norm=grad_norm, learning_rate=lr_fn(state.step),
             loss_tokens=norm['tokens'], finite=finite, **extra, **reward_metrics)
  return new_state, out


def rollout_logps(params: nnx.State, frozen: nnx.State, batch: dict[str, jax.Array],
                  ref: nnx.State | None = None, *, graphdef,
                  objective: objectives.Options, loss_chunk: int = 0) -> dict[str, jax.Array]:
  """grpo, at rollout time: the `[B, T]` token log-probabilities the loss compares against,
  `old_logps` (these weights, when `num_iterations` > 1 reuses the rollout) and `ref_logps` (the
  reference: adapters off with LoRA, else `ref`, the initial weights; when `kl_beta` > 0)."""
  out = {}
  if objective.num_iterations > 1:
    model = nnx.merge(graphdef, params, frozen)
    out['old_logps'] = objectives.token_logps(model, batch, temperature=objective.temperature,
                                              loss_chunk=loss_chunk)[0]
  if objective.uses_reference:
    with lora.adapters_off() if ref is None else contextlib.nullcontext():
      model = nnx.merge(graphdef, params if ref is None else ref, frozen)
      out['ref_logps'] = objectives.token_logps(model, batch, temperature=objective.temperature,
                                                loss_chunk=loss_chunk)[0]
  return out


def eval_step(params: nnx.State, frozen: nnx.State, batch: dict[str, jax.Array],
              ref: nnx.State | None = None, *, graphdef,
              objective: objectives.Options = objectives.SFT, loss_chunk: int = 0):
  """Sums for held-out loss and exact match (every masked target is the argmax); for
  preference pairs also the sums of the pair metrics, and exact match on the chosen answers."""
  if not objective.pairs:
    stats = _loss_and_stats(params, frozen, batch, graphdef=graphdef, loss_chunk=loss_chunk)[0]
    has_target = stats['row_tokens'] > 0
    exact = has_target & (stats['row_correct'] == stats['row_tokens'])
    return dict(loss_sum=stats['loss_sum'], tokens=stats['tokens'],
                examples=jnp.sum(has_target), exact=jnp.sum(exact))
  ref_logps = (reference_logps(params, frozen, batch, ref, graphdef=graphdef,
                               loss_chunk=loss_chunk) if objective.uses_reference else None)
  logps, counts, hits, whole = objectives.sequence_logps(nnx.merge(graphdef, params, frozen),
                                                         batch, loss_chunk=loss_chunk)
  pairs = (counts[:, 0] > 0) & (counts[:, 1] > 0)
  # Sums over pairs (ORPO's token-mean term: per pair, over this batch's mean chosen length).
  norm = objectives.normalizers(objective, batch)
  ones = dict(pairs=jnp.ones(()), tokens=norm['tokens'] / norm['pairs'],
              chosen_positions=norm['chosen_positions'] / norm['pairs'])
  loss, sums = objectives.pair_loss(objective, logps, counts, ref_logps, ones, whole)
  exact = pairs & (hits[:, 0] == counts[:, 0])
  return dict(loss_sum=loss, tokens=jnp.sum(pairs).astype(jnp.float32),
              examples=jnp.sum(pairs), exact=jnp.sum(exact), **sums)
