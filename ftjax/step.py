"""The jitted core, pure functions of arrays: TrainState, the train step and the eval step.

`train_step` is one optimizer update over a global batch (gradient accumulation inside, with
the same update as one big batch); `eval_step` gives the sums of held-out loss and exact match.
`ftjax.trainer` jits them with the shardings of a mesh.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ftjax import losses


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: nnx.State  # the trainable variables only
  opt_state: optax.OptState


def _loss_and_stats(params, frozen, batch, *, graphdef, dropout_key=None, loss_chunk=0):
  model = nnx.merge(graphdef, params, frozen)
  hidden = model.hidden(batch['tokens'], batch['positions'], batch['segment_ids'],
                        dropout_key=dropout_key)
  return losses.chunked_next_token_xent(hidden, batch['targets'], batch['loss_mask'],
                                        model.logits, loss_chunk)


def loss_grads(params: nnx.State, frozen: nnx.State, batch: dict[str, jax.Array], *, graphdef,
               dropout_key: jax.Array | None = None, loss_chunk: int = 0):
  """Gradients of the summed masked loss, with that sum and the masked-token count."""

  def sum_loss(params):
    # Fresh Variables for the frozen weights at this trace level: NNX transforms inside the
    # model (the layer scan) refuse Variables created outside the gradient trace.
    stats = _loss_and_stats(params, jax.tree.map(lambda x: x, frozen), batch, graphdef=graphdef,
                            dropout_key=dropout_key, loss_chunk=loss_chunk)
    return stats['loss_sum'], stats['tokens']

  (loss_sum, tokens), grads = jax.value_and_grad(sum_loss, has_aux=True)(params)
  return grads, loss_sum, tokens


def train_step(state: TrainState, frozen: nnx.State, batch: dict[str, jax.Array], *, graphdef,
               tx: optax.GradientTransformation, lr_fn: optax.Schedule, grad_accum: int,
               dropout_seed: int | None = None, loss_chunk: int = 0,
               skip_nonfinite: bool = False):
  """One optimizer step over the global batch, split into `grad_accum` microbatches.

  Gradients are summed over all masked tokens of all microbatches, then divided by
  their count, so accumulation gives the same update as one big batch. `finite` in the
  metrics says whether loss and gradient norm were finite; with `skip_nonfinite` a step where
  they were not keeps the old weights and optimizer state (only the step count advances).
  """
  # Dropout masks depend only on (seed, step, microbatch): a resumed run draws the same ones.
  key = (None if dropout_seed is None
         else jax.random.fold_in(jax.random.key(dropout_seed), state.step))
  if grad_accum == 1:
    grads, loss_sum, tokens = loss_grads(state.params, frozen, batch, graphdef=graphdef,
                                         dropout_key=key, loss_chunk=loss_chunk)
  else:
    # Row r goes to microbatch r % grad_accum: each device keeps its own rows.
    micro = jax.tree.map(
        lambda x: x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1),
        batch)

    def accumulate(carry, inputs):
      microbatch, index = inputs
      micro_key = None if key is None else jax.random.fold_in(key, index)
      out = loss_grads(state.params, frozen, microbatch, graphdef=graphdef, dropout_key=micro_key,
                       loss_chunk=loss_chunk)
      return jax.tree.map(jnp.add, carry, out), None

    zeros = (jax.tree.map(jnp.zeros_like, state.params), jnp.zeros(()), jnp.zeros(()))
    (grads, loss_sum, tokens), _ = jax.lax.scan(accumulate, zeros,
                                                (micro, jnp.arange(grad_accum)))
  scale = 1.0 / jnp.maximum(tokens, 1.0)
  grads = jax.tree.map(lambda g: (g * scale).astype(g.dtype), grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  loss, grad_norm = loss_sum * scale, optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  if skip_nonfinite:
    keep = lambda new, old: jnp.where(finite, new, old)
    params, opt_state = (jax.tree.map(keep, params, state.params),
                         jax.tree.map(keep, opt_state, state.opt_state))
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  out = dict(loss=loss, grad_norm=grad_norm, learning_rate=lr_fn(state.step), loss_tokens=tokens,
             finite=finite)
  return new_state, out


def eval_step(params: nnx.State, frozen: nnx.State, batch: dict[str, jax.Array], *, graphdef,
              loss_chunk: int = 0):
  """Sums for held-out loss and exact match (every masked target is the argmax)."""
  stats = _loss_and_stats(params, frozen, batch, graphdef=graphdef, loss_chunk=loss_chunk)
  has_target = stats['row_tokens'] > 0
  exact = has_target & (stats['row_correct'] == stats['row_tokens'])
  return dict(loss_sum=stats['loss_sum'], tokens=stats['tokens'],
              examples=jnp.sum(has_target), exact=jnp.sum(exact))
