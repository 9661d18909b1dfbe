"""TrainState, the jitted train/eval steps, and `run()`: the whole training loop, top to bottom."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import signal
import threading
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ftjax import (
  build,
  checkpoint,
  data,
  evals,
  losses,
  metrics,
  optim,
  sharding,
  throughput,
)
from ftjax.config import (  # noqa: F401  (re-exported: the config API users reach via train)
  DTYPES,
  ConfigError,
  data_options,
  eval_sources,
  generation_eval,
  lora_options,
  model_config,
  optim_kwargs,
  tokenizer_spec,
  train_sources,
  validate,
)
from ftjax.models import llama
from ftjax.version import __version__


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
               dropout_seed: int | None = None, loss_chunk: int = 0):
  """One optimizer step over the global batch, split into `grad_accum` microbatches.

  Gradients are summed over all masked tokens of all microbatches, then divided by
  their count, so accumulation gives the same update as one big batch.
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
  new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                            opt_state=opt_state)
  out = dict(loss=loss_sum * scale, grad_norm=optax.tree.norm(grads),
             learning_rate=lr_fn(state.step), loss_tokens=tokens)
  return new_state, out


def eval_step(params: nnx.State, frozen: nnx.State, batch: dict[str, jax.Array], *, graphdef,
              loss_chunk: int = 0):
  """Sums for held-out loss and exact match (every masked target is the argmax)."""
  stats = _loss_and_stats(params, frozen, batch, graphdef=graphdef, loss_chunk=loss_chunk)
  has_target = stats['row_tokens'] > 0
  exact = has_target & (stats['row_correct'] == stats['row_tokens'])
  return dict(loss_sum=stats['loss_sum'], tokens=stats['tokens'],
              examples=jnp.sum(has_target), exact=jnp.sum(exact))


@dataclasses.dataclass
class Trainer:
  """What `setup` builds: the sharded state and the compiled steps over it."""

  mesh: jax.sharding.Mesh
  rules: dict
  graphdef: Any
  state: TrainState
  frozen: nnx.State
  train_step: Any
  eval_step: Any
  batch_sharding: NamedSharding


def setup(*, arch: llama.Config, model_options: dict[str, Any], mesh_shape, rules_name: str,
          optim_kwargs: dict[str, Any], grad_accum: int, global_batch: int, seed: int,
          pretrained_path: str = '', lora_options: dict[str, Any] | None = None,
          num_slices: int = 1, devices=None, loss_chunk: int = 0,
          abstract: bool = False) -> Trainer:
  """Mesh -> abstract model -> shardings -> sharded init or load -> compiled steps.

  `abstract=True` allocates nothing: the state and frozen weights are shape/dtype/sharding
  structs, for compiling ahead of time (`ftjax plan`, memory analysis) on any `devices`.
  """
  try:
    mesh = sharding.make_mesh(mesh_shape, devices, num_slices=num_slices)
    rules = sharding.get_rules(rules_name)
  except (sharding.MeshError, KeyError) as e:
    raise ConfigError(e.args[0]) from None
  shards = sharding.batch_shards(mesh, rules)
  if grad_accum < 1 or global_batch % (shards * grad_accum):
    raise ConfigError(
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
    raise ConfigError(str(e)) from None
  graphdef, params, frozen = nnx.split(model, trainable, ...)
  tx, lr_fn = optim.make(**optim_kwargs)

  def init_state(params):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  abstract_state = jax.eval_shape(init_state, params)
  state_sh = sharding.state_shardings(abstract_state, mesh, rules)
  frozen_sh = sharding.state_shardings(frozen, mesh, rules)
  if abstract:
    state, frozen = _with_shardings(abstract_state, state_sh), _with_shardings(frozen, frozen_sh)
  else:
    state = jax.jit(init_state, out_shardings=state_sh, donate_argnums=0)(params)
  batch_sh = sharding.batch_sharding(mesh, rules)
  replicated = NamedSharding(mesh, P())
  step_fn = jax.jit(
      functools.partial(train_step, graphdef=graphdef, tx=tx, lr_fn=lr_fn, grad_accum=grad_accum,
                        dropout_seed=seed if lora_options and lora_options['dropout'] else None,
                        loss_chunk=loss_chunk),
      in_shardings=(state_sh, frozen_sh, batch_sh), out_shardings=(state_sh, replicated),
      donate_argnums=0)
  eval_fn = jax.jit(functools.partial(eval_step, graphdef=graphdef, loss_chunk=loss_chunk),
                    in_shardings=(state_sh.params, frozen_sh, batch_sh), out_shardings=replicated)
  return Trainer(mesh, rules, graphdef, state, frozen, step_fn, eval_fn, batch_sh)


def setup_from_config(config: ml_collections.ConfigDict, arch: llama.Config, *,
                      pretrained_path: str | None = None, lora: dict[str, Any] | None = None,
                      abstract: bool = False, devices=None) -> Trainer:
  """`setup` with the arguments the config's sections give (what `ftjax train` builds).

  `pretrained_path` (default: model.pretrained) and `lora` (default: the lora section) let
  `ftjax bench` and `ftjax plan` build the same step with random weights and fresh adapters.
  """
  c_model = config.model
  return setup(
      arch=arch,
      model_options=dict(dtype=DTYPES[c_model.dtype], param_dtype=DTYPES[c_model.param_dtype],
                         remat=c_model.remat, attention_impl=c_model.attention),
      mesh_shape=tuple(config.mesh.shape), rules_name=config.mesh.rules,
      optim_kwargs=optim_kwargs(config.optim, config.train.steps),
      grad_accum=config.optim.grad_accum, global_batch=config.data.global_batch,
      seed=config.train.seed,
      pretrained_path=c_model.pretrained if pretrained_path is None else pretrained_path,
      lora_options=lora_options(config.lora) if lora is None else lora,
      num_slices=config.mesh.num_slices, devices=devices, loss_chunk=c_model.loss_chunk,
      abstract=abstract)


def trained_adapters(config: ml_collections.ConfigDict, trainer: Trainer) -> int | None:
  """LoRA adapter weights trained (for the MFU's LoRA correction); None for full fine-tuning."""
  if lora_options(config.lora) is None:
    return None
  return throughput.adapter_params(trainer.state.params)


def _with_shardings(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


def evaluate(trainer: Trainer, batches: list[dict[str, np.ndarray]] | None,
             generation: evals.GenerationEval | None = None) -> dict[str, Any]:
  """Held-out loss, perplexity and exact-match accuracy over every eval example; with
  `generation`, also the score of greedy completions and a few samples."""
  generated: dict[str, Any] = {}
  if generation is not None:
    model = nnx.merge(trainer.graphdef, trainer.state.params, trainer.frozen)
    generated = generation.run(model, trainer.mesh, trainer.rules)
  if not batches:
    return generated
  totals = None
  with sharding.use(trainer.mesh, trainer.rules):
    for batch, _ in data.device_batches(iter(batches), trainer.batch_sharding):
      out = trainer.eval_step(trainer.state.params, trainer.frozen, batch)
      totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  totals = jax.device_get(totals)
  loss = float(totals['loss_sum']) / max(float(totals['tokens']), 1.0)
  return dict(eval_loss=loss, eval_perplexity=float(np.exp(min(loss, 80.0))),
              eval_accuracy=float(totals['exact']) / max(float(totals['examples']), 1.0),
              eval_examples=int(totals['examples']), **generated)


EXIT_RESTART = 75  # EX_TEMPFAIL: preempted after a committed save; run the command again


class Preemption:
  """SIGTERM (what TPU VMs and schedulers send) asks the loop to save and stop.

  One process: our handler sets a flag. Several: JAX's preemption sync point (via Orbax)
  makes every host agree on the same step.
  """

  def __init__(self):
    self.requested = False
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def reached(self, step: int, manager: checkpoint.Manager) -> bool:
    if jax.process_count() > 1:
      return manager.reached_preemption(step)
    return self.requested


def restore_or_start(config: ml_collections.ConfigDict, workdir: str, trainer: Trainer,
                     train_iter: data.TrainData) -> tuple[checkpoint.Manager, int]:
  """The run's checkpoint manager, and the step to start from (restoring state and data)."""
  c = config.ckpt
  manager = checkpoint.Manager(checkpoint.directory(workdir), every_steps=c.every_steps,
                               every_minutes=c.every_minutes, max_to_keep=c.max_to_keep or None,
                               keep_period=c.keep_period or None, async_save=c.async_save)
  if c.resume == 'never':
    return manager, 0
  if c.resume == 'auto':
    source, step = manager, manager.latest_step()
    if step is None:
      return manager, 0
  else:
    root, step = checkpoint.find_step_dir(c.resume)
    source = checkpoint.Manager(root, max_to_keep=None)
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), trainer.state)
  try:
    trainer.state = source.restore(step, abstract, train_iter.iterator)
  except Exception:
    manager.close()  # no background threads left behind by a failed start
    raise
  logging.info('restored step %d from %s', step, source.root)
  return manager, step


def _logged_eval_before(workdir: str) -> dict[str, Any] | None:
  """The step-0 evaluation an earlier (interrupted) attempt of this run logged."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    for line in f:
      row = json.loads(line)
      if row.get('step') == 0 and 'eval_loss' in row:
        return row
  return None


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains as `config` says, writing metrics, TensorBoard and config.json into `workdir`."""
  arch = validate(config)
  c_data, c_train, c_model = config.data, config.train, config.model
  tok = data.formats.cached_tokenizer(tokenizer_spec(config))  # the one the pipeline uses
  if tok.vocab_size > arch.vocab_size:
    raise ConfigError(f'the tokenizer has {tok.vocab_size} tokens but model.vocab_size is '
                      f'{arch.vocab_size}; set --config.model.vocab_size>={tok.vocab_size}')
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      json.dump({**config.to_dict(), 'resolved_model': dataclasses.asdict(arch)}, f, indent=2)

  trainer = setup_from_config(config, arch)
  options = data_options(config)
  train_iter = data.train_batches(train_sources(c_data), options,
                                  global_batch=c_data.global_batch, seed=c_train.seed,
                                  pack=c_data.pack, workers=c_data.workers)
  eval_set = (data.eval_batches(eval_sources(c_data), options, global_batch=c_data.global_batch,
                                max_examples=c_data.max_eval_examples)
              if c_data.eval_path else None)
  gen_eval = generation_eval(config)
  n_params = sharding.count_params(trainer.state.params)
  logging.info('model %s: %d trainable parameters; mesh %s', c_model.preset, n_params,
               dict(trainer.mesh.shape))

  manager, start_step = restore_or_start(config, workdir, trainer, train_iter)
  writer = metrics.Writer(workdir, total_steps=c_train.steps, start_step=start_step,
                          progress=c_train.progress, wandb_project=c_train.wandb_project,
                          config=config.to_dict())
  writer.print(f'ftjax: {c_model.preset} ({n_params:,} params) on mesh {dict(trainer.mesh.shape)}, '
               f'steps {start_step + 1}..{c_train.steps}'
               + (f' (resumed from step {start_step})' if start_step else ''))
  if start_step == 0:
    first_eval = evaluate(trainer, eval_set, gen_eval) if eval_set or gen_eval else None
    if first_eval:
      writer.write(0, first_eval)
  else:
    first_eval = _logged_eval_before(workdir)
  last_eval = first_eval
  preemption = Preemption()
  meta = dict(ftjax_version=__version__, mesh=dict(trainer.mesh.shape), preset=c_model.preset,
              config=json.loads(config.to_json_best_effort()))
  stop_at = c_train.stop_at_step
  batches = data.Prefetcher(train_iter, trainer.batch_sharding, depth=c_data.prefetch)
  speed = throughput.Meter(arch, num_devices=trainer.mesh.size,
                           adapter_params=trained_adapters(config, trainer),
                           compute_dtype=DTYPES[c_model.dtype])
  start = time.perf_counter()
  window_start, window_tokens, window_steps, logged = start, 0, 0, {}
  row_tokens = c_data.global_batch * c_data.seq_len
  preempted_at = None
  with sharding.use(trainer.mesh, trainer.rules):
    for step in range(start_step + 1, c_train.steps + 1):
      batch, segment_ids = next(batches)
      trainer.state, step_metrics = trainer.train_step(trainer.state, trainer.frozen, batch)
      real_tokens = speed.add(segment_ids)
      window_tokens += real_tokens * jax.process_count()
      window_steps += 1
      writer.advance()
      is_last = step == c_train.steps
      if step % c_train.log_every == 0 or is_last:
        logged = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        now = time.perf_counter()
        logged.update(speed.report(now - window_start, window_steps))
        logged['packing_efficiency'] = window_tokens / (window_steps * row_tokens)
        logged['skipped_records'] = sum(train_iter.skipped.counts.values())
        window_start, window_tokens, window_steps = now, 0, 0
        every = config.eval.every_steps
        if (eval_set or gen_eval) and ((every > 0 and step % every == 0) or is_last):
          last_eval = evaluate(trainer, eval_set, gen_eval)
          logged.update(last_eval)
        writer.write(step, logged)
      stop = step == stop_at or preemption.reached(step, manager)
      if stop or is_last or manager.due(step):
        manager.save(step, trainer.state, batches, meta)
      if stop:
        preempted_at = step
        break
  manager.wait()  # every save is committed before we report or exit
  manager.close()
  wall = time.perf_counter() - start
  done = preempted_at is None
  summary = dict(steps=c_train.steps, wall_s=wall, final_loss=logged.get('loss'),
                 skipped_records=dict(train_iter.skipped.counts), preempted_at=preempted_at,
                 train_step_compiles=trainer.train_step._cache_size())
  if not done:
    writer.print(f'stopped after step {preempted_at} and saved a checkpoint; exit '
                 f'{EXIT_RESTART} means: run the same command again to resume')
    writer.close()
    return summary
  line = (f'done: {c_train.steps} steps in {wall:.1f}s, final train loss '
          f'{summary["final_loss"]:.4f}' if summary['final_loss'] is not None
          else f'done: nothing to do, the checkpoint is at step {start_step}')
  has_eval_loss = bool(first_eval and last_eval and 'eval_loss' in last_eval)
  if has_eval_loss:
    summary.update(eval_loss_before=first_eval['eval_loss'], eval_loss_after=last_eval['eval_loss'],
                   accuracy_before=first_eval['eval_accuracy'],
                   accuracy_after=last_eval['eval_accuracy'],
                   eval_examples=last_eval['eval_examples'])
    line += f', eval loss {first_eval["eval_loss"]:.4f} -> {last_eval["eval_loss"]:.4f}'
  if train_iter.skipped.counts:
    line += f', skipped records {dict(sorted(train_iter.skipped.counts.items()))}'
  writer.print(line)
  if has_eval_loss:
    writer.print(f'held-out accuracy: before {first_eval["eval_accuracy"]:.2f} -> after '
                 f'{last_eval["eval_accuracy"]:.2f} (n={last_eval["eval_examples"]})')
  writer.close()
  return summary
