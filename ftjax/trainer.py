"""`setup`: mesh -> abstract model -> shardings -> sharded weights -> compiled steps (`Trainer`).

Also `evaluate`, the held-out pass over a `Trainer`. The steps themselves are `ftjax.step`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ftjax import build, config, data, evals, lora, objectives, optim, sharding, throughput
from ftjax import step as step_lib


@dataclasses.dataclass
class Trainer:
  """What `setup` builds: the sharded state and the compiled steps over it."""

  mesh: jax.sharding.Mesh
  rules: dict
  graphdef: Any
  state: step_lib.TrainState
  frozen: nnx.State
  train_step: Any
  eval_step: Any
  batch_sharding: NamedSharding
  step_traces: list[int] = dataclasses.field(default_factory=list)  # one entry per trace
  trainable: type = nnx.Param  # what the step updates: Param (full) or LoRAParam (adapters)
  objective: objectives.Options = objectives.SFT
  # The preference reference's weights: a frozen copy of the initial trainable weights (full
  # fine-tuning with a live reference), else None (LoRA: the adapters are switched off).
  ref: nnx.State | None = None
  # grpo: the rollout-time log-probabilities (old policy, reference), compiled; None when the
  # loss needs neither (one iteration per rollout, no KL term) or for other objectives.
  rollout_logps: Any = None


def _counting(fn: Any, traces: list[int]) -> Any:
  """`fn`, noting each time it is traced (jit traces once per new input signature)."""

  @functools.wraps(fn)
  def traced(*args, **kwargs):
    traces.append(1)  # Python runs here only while jax traces, never per compiled call
    return fn(*args, **kwargs)

  return traced


def setup(*, arch: Any, model_options: dict[str, Any], mesh_shape, rules_name: str,
          optim_kwargs: dict[str, Any], grad_accum: int, global_batch: int, seed: int,
          pretrained_path: str = '', lora_options: lora.Options | None = None,
          num_slices: int = 1, devices=None, loss_chunk: int = 0,
          skip_nonfinite: bool = False, abstract: bool = False,
          objective: objectives.Options = objectives.SFT) -> Trainer:
  """Mesh -> abstract model -> shardings -> sharded init or load -> compiled steps.

  `abstract=True` allocates nothing: the state and frozen weights are shape/dtype/sharding
  structs, for compiling ahead of time (`ftjax plan`, memory analysis) on any `devices`.
  """
  try:
    mesh = sharding.make_mesh(mesh_shape, devices, num_slices=num_slices)
    rules = sharding.get_rules(rules_name)
  except (sharding.MeshError, KeyError) as e:
    raise config.ConfigError(e.args[0]) from None
  shards = sharding.batch_shards(mesh, rules)
  if grad_accum < 1 or global_batch % (shards * grad_accum):
    raise config.ConfigError(
        f'data.global_batch={global_batch} must be divisible by the {shards} batch shards of '
        f'mesh {dict(mesh.shape)} times optim.grad_accum={grad_accum} '
        f'(= {shards * grad_accum}).')
  try:
    if abstract:
      model, trainable = build.abstract_model(arch, model_options=model_options, seed=seed,
                                              lora_options=lora_options)
    else:
      model, trainable = build.model(arch, model_options=model_options, mesh=mesh, rules=rules,
                                     seed=seed, pretrained_path=pretrained_path,
                                     lora_options=lora_options)
  except ValueError as e:
    if 'lora.targets' not in str(e):
      raise
    raise config.ConfigError(str(e)) from None
  graphdef, params, frozen = nnx.split(model, trainable, ...)
  tx, lr_fn = optim.make(**optim_kwargs)

  def init_state(params):
    return step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               opt_state=tx.init(params))

  abstract_state = jax.eval_shape(init_state, params)
  state_sh = sharding.state_shardings(abstract_state, mesh, rules)
  frozen_sh = sharding.state_shardings(frozen, mesh, rules)
  # Full fine-tuning against a live reference keeps the initial weights, sharded as the
  # trainable ones; LoRA's reference is the frozen base itself.
  keep_ref = objective.live_reference and trainable is not nnx.LoRAParam
  ref_sh = state_sh.params if keep_ref else None
  ref = None
  if abstract:
    state, frozen = _with_shardings(abstract_state, state_sh), _with_shardings(frozen, frozen_sh)
    ref = _with_shardings(params, ref_sh) if keep_ref else None
  else:
    if keep_ref:
      ref = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=ref_sh)(params)
    state = jax.jit(init_state, out_shardings=state_sh, donate_argnums=0)(params)
  batch_sh = sharding.batch_sharding(mesh, rules)
  replicated = NamedSharding(mesh, P())
  traces: list[int] = []
  step = functools.partial(
      step_lib.train_step, graphdef=graphdef, tx=tx, lr_fn=lr_fn, grad_accum=grad_accum,
      dropout_seed=seed if lora_options and lora_options.dropout else None,
      loss_chunk=loss_chunk, skip_nonfinite=skip_nonfinite, objective=objective)
  step_fn = jax.jit(
      _counting(step, traces),
      in_shardings=(state_sh, frozen_sh, batch_sh, ref_sh), out_shardings=(state_sh, replicated),
      donate_argnums=0)
  eval_fn = jax.jit(functools.partial(step_lib.eval_step, graphdef=graphdef, loss_chunk=loss_chunk,
                                      objective=objective),
                    in_shardings=(state_sh.params, frozen_sh, batch_sh, ref_sh),
                    out_shardings=replicated)
  rollout_fn = None
  if objective.rollouts and (objective.num_iterations > 1 or objective.uses_reference):
    rollout_fn = jax.jit(functools.partial(step_lib.rollout_logps, graphdef=graphdef,
                                           objective=objective, loss_chunk=loss_chunk),
                         in_shardings=(state_sh.params, frozen_sh, batch_sh, ref_sh),
                         out_shardings=batch_sh)
  return Trainer(mesh, rules, graphdef, state, frozen, step_fn, eval_fn, batch_sh, traces,
                 trainable, objective, ref, rollout_fn)


def from_resolved(r: config.Resolved, *, pretrained_path: str | None = None,
                  lora_options: lora.Options | None | str = 'config', abstract: bool = False,
                  devices=None) -> Trainer:
  """`setup` with the arguments a resolved config gives (what `ftjax train` builds).

  `pretrained_path` (default: model.pretrained) and `lora_options` (default: the lora section) let
  `ftjax bench` and `ftjax plan` build the same step with random weights and fresh adapters.
  """
  return setup(
      arch=r.model.arch, model_options=r.model.options(), mesh_shape=r.mesh.shape,
      rules_name=r.mesh.rules, optim_kwargs=r.optim.make_kwargs(),
      grad_accum=r.optim.grad_accum, global_batch=r.data.global_batch, seed=r.train.seed,
      pretrained_path=r.model.pretrained if pretrained_path is None else pretrained_path,
      lora_options=r.lora if lora_options == 'config' else lora_options,
      num_slices=r.mesh.num_slices, devices=devices, loss_chunk=r.model.loss_chunk,
      skip_nonfinite=r.train.skip_nonfinite, abstract=abstract, objective=r.objective)


def trained_adapters(trainer: Trainer) -> int | None:
  """LoRA adapter weights trained (for the MFU's LoRA correction); None for full fine-tuning."""
  if trainer.trainable is not nnx.LoRAParam:
    return None
  return throughput.adapter_params(trainer.state.params)


def _with_shardings(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


def evaluate(trainer: Trainer, batches: list[dict[str, np.ndarray]] | None,
             generation: evals.GenerationEval | None = None,
             ref_logps: np.ndarray | None = None) -> dict[str, Any]:
  """Held-out loss, perplexity and exact-match accuracy over every eval example; with
  `generation`, also the score of greedy completions and a few samples. For preference pairs
  also the pair metrics; `ref_logps` (`[batches, B, 2]`, objective.precompute_ref) are then the
  reference log-probabilities of each batch's rows."""
  generated: dict[str, Any] = {}
  if generation is not None:
    model = nnx.merge(trainer.graphdef, trainer.state.params, trainer.frozen)
    generated = generation.run(model, trainer.mesh, trainer.rules)
  if not batches:
    return generated
  totals = None
  with sharding.use(trainer.mesh, trainer.rules):
    for i, (batch, _) in enumerate(data.device_batches(iter(batches), trainer.batch_sharding)):
      if ref_logps is not None:
        batch = dict(batch, ref_logps=data.global_rows(ref_logps[i], trainer.batch_sharding))
      out = trainer.eval_step(trainer.state.params, trainer.frozen, batch, trainer.ref)
      totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  totals = jax.device_get(totals)
  loss = float(totals['loss_sum']) / max(float(totals['tokens']), 1.0)
  examples = max(float(totals['examples']), 1.0)
  pairs = {f'eval_{k}': float(totals[k]) / examples for k in objectives.PAIR_METRICS
           if k in totals}
  return dict(eval_loss=loss, eval_perplexity=float(np.exp(min(loss, 80.0))),
              eval_accuracy=float(totals['exact']) / examples,
              eval_examples=int(totals['examples']), **pairs, **generated)
