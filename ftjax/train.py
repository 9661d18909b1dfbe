"""TrainState, the jitted train/eval steps, and `run()`: the whole training loop, top to bottom."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
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
  data,
  evals,
  losses,
  metrics,
  optim,
  resume,
  sharding,
  throughput,
)
from ftjax import workdir as workdir_lib
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
  step_traces: list[int] = dataclasses.field(default_factory=list)  # one entry per trace


def _counting(fn: Any, traces: list[int]) -> Any:
  """`fn`, noting each time it is traced (jit traces once per new input signature)."""

  @functools.wraps(fn)
  def traced(*args, **kwargs):
    traces.append(1)  # Python runs here only while jax traces, never per compiled call
    return fn(*args, **kwargs)

  return traced


def setup(*, arch: llama.Config, model_options: dict[str, Any], mesh_shape, rules_name: str,
          optim_kwargs: dict[str, Any], grad_accum: int, global_batch: int, seed: int,
          pretrained_path: str = '', lora_options: dict[str, Any] | None = None,
          num_slices: int = 1, devices=None, loss_chunk: int = 0,
          skip_nonfinite: bool = False, abstract: bool = False) -> Trainer:
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
  traces: list[int] = []
  step = functools.partial(
      train_step, graphdef=graphdef, tx=tx, lr_fn=lr_fn, grad_accum=grad_accum,
      dropout_seed=seed if lora_options and lora_options['dropout'] else None,
      loss_chunk=loss_chunk, skip_nonfinite=skip_nonfinite)
  step_fn = jax.jit(
      _counting(step, traces),
      in_shardings=(state_sh, frozen_sh, batch_sh), out_shardings=(state_sh, replicated),
      donate_argnums=0)
  eval_fn = jax.jit(functools.partial(eval_step, graphdef=graphdef, loss_chunk=loss_chunk),
                    in_shardings=(state_sh.params, frozen_sh, batch_sh), out_shardings=replicated)
  return Trainer(mesh, rules, graphdef, state, frozen, step_fn, eval_fn, batch_sh, traces)


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
      skip_nonfinite=config.train.nan_policy == 'skip_step', abstract=abstract)


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


EXIT_RESTART = resume.EXIT_RESTART


class NonFiniteError(RuntimeError):
  """Training produced a non-finite loss or gradient norm (train.nan_policy=stop)."""


@jax.jit
def _watch(first_bad: jax.Array, skipped: jax.Array, finite: jax.Array, step: jax.Array):
  """Device-side record of non-finite steps, so the loop syncs only on log and save steps."""
  first_bad = jnp.where((first_bad < 0) & ~finite, step, first_bad)
  return first_bad, skipped + (~finite).astype(jnp.int32)


def _logged_eval_before(workdir: str) -> dict[str, Any] | None:
  """The step-0 evaluation an earlier (interrupted) attempt of this run logged."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.isfile(path):
    return None
  return next((r for r in metrics.read_rows(path) if r['step'] == 0 and 'eval_loss' in r), None)


def _model_name(config: ml_collections.ConfigDict, arch: llama.Config) -> str:
  if config.model.pretrained:
    return f'{arch.family} from {config.model.pretrained}'
  return config.model.preset


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains as `config` says, writing metrics, TensorBoard and config.json into `workdir`.

  Nothing is written into `workdir` until the config, the mesh, the data and the restore have
  all passed; a second run on a workdir a live run holds is refused.
  """
  arch = validate(config)
  tok = data.formats.cached_tokenizer(tokenizer_spec(config))  # the one the pipeline uses
  if tok.vocab_size > arch.vocab_size:
    raise ConfigError(f'the tokenizer has {tok.vocab_size} tokens but model.vocab_size is '
                      f'{arch.vocab_size}; set --config.model.vocab_size>={tok.vocab_size}')
  run_dir = workdir_lib.RunDir(workdir, resume=config.ckpt.resume,
                               overwrite=config.ckpt.overwrite)
  # Signals are handled from here on: one during set-up stops the run before its first step.
  preemption = resume.Preemption()
  try:
    return _start(config, workdir, arch, run_dir, preemption)
  finally:
    preemption.close()
    run_dir.release()


def _start(config: ml_collections.ConfigDict, workdir: str, arch: llama.Config,
           run_dir: workdir_lib.RunDir, preemption: resume.Preemption) -> dict[str, Any]:
  c_data, c_train = config.data, config.train
  trainer = setup_from_config(config, arch)
  options = data_options(config)
  report = data.preflight(train_sources(c_data), options)
  train_iter = data.train_batches(train_sources(c_data), options,
                                  global_batch=c_data.global_batch, seed=c_train.seed,
                                  pack=c_data.pack, workers=c_data.workers)
  eval_set = (data.eval_batches(eval_sources(c_data), options, global_batch=c_data.global_batch,
                                max_examples=c_data.max_eval_examples)
              if c_data.eval_path else None)
  gen_eval = generation_eval(config)
  n_params = sharding.count_params(trainer.state.params)
  start = resume.restore_or_start(config, workdir, trainer, train_iter)
  manager, start_step = start.manager, start.step

  # Every check has passed: from here on the run writes into its directory.
  run_dir.commit()
  if run_dir.overwrite:
    manager.reload()  # the earlier run's checkpoints are gone
  for step, _ in start.corrupt:
    manager.move_aside(step)
  if jax.process_index() == 0:
    workdir_lib.write_json(os.path.join(workdir, 'config.json'),
                           {**config.to_dict(), 'resolved_model': dataclasses.asdict(arch)})
  writer = metrics.Writer(workdir, total_steps=c_train.steps, start_step=start_step,
                          progress=c_train.progress, wandb_project=c_train.wandb_project,
                          config=config.to_dict())
  preemption.say = writer.print
  writer.print(f'ftjax: {_model_name(config, arch)} ({n_params:,} params) on mesh '
               f'{dict(trainer.mesh.shape)}, steps {start_step + 1}..{c_train.steps}'
               + (f' (resumed from step {start_step})' if start_step else ''))
  writer.print(report.summary_line())
  for line in start.notes:
    writer.print(line)
  if start_step >= c_train.steps:
    manager.close()
    writer.print(f'done: nothing to train: the checkpoint is at step {start_step} and '
                 f'train.steps={c_train.steps}; raise train.steps to train further')
    writer.close()
    return dict(steps=c_train.steps, wall_s=0.0, final_loss=None, preempted_at=None,
                skipped_records={}, train_step_compiles=0, nothing_to_do=True)
  try:
    return _loop(config, workdir, arch, trainer, train_iter, eval_set, gen_eval, manager,
                 start_step, writer, preemption)
  except BaseException:
    manager.wait_quietly()  # the save in flight is committed before the error is reported
    manager.close()
    writer.close()
    raise


def _loop(config, workdir, arch, trainer, train_iter, eval_set, gen_eval, manager, start_step,
          writer, preemption) -> dict[str, Any]:
  c_data, c_train, c_model = config.data, config.train, config.model
  if start_step == 0:
    first_eval = evaluate(trainer, eval_set, gen_eval) if eval_set or gen_eval else None
    if first_eval:
      writer.write(0, first_eval)
  else:
    first_eval = _logged_eval_before(workdir)
  last_eval = first_eval
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
  first_bad, nonfinite_steps = jax.device_put((np.int32(-1), np.int32(0)),
                                              NamedSharding(trainer.mesh, P()))
  skip_nonfinite = c_train.nan_policy == 'skip_step'

  def check_finite(step: int) -> None:
    bad = int(jax.device_get(first_bad))
    if bad >= 0 and not skip_nonfinite:
      manager.wait()
      last = manager.latest_step()
      where = (f'the last good checkpoint is {os.path.join(manager.root, str(last))} (run the '
               'same command again to resume from it)' if last is not None
               else 'no checkpoint was saved before it')
      raise NonFiniteError(
          f'the loss or gradient norm became non-finite at step {bad}, so training stopped and '
          f'nothing after it was saved; {where}; try a lower optim.lr, optim.clip_norm > 0, or '
          'train.nan_policy=skip_step')

  with sharding.use(trainer.mesh, trainer.rules):
    for step in range(start_step + 1, c_train.steps + 1):
      try:
        with preemption.waiting_for_data():
          batch, segment_ids = next(batches)
      except resume.Preempted:
        preempted_at = step - 1
        if preempted_at > start_step:
          check_finite(preempted_at)
          manager.save(preempted_at, trainer.state, batches, meta)
        break
      trainer.state, step_metrics = trainer.train_step(trainer.state, trainer.frozen, batch)
      first_bad, nonfinite_steps = _watch(first_bad, nonfinite_steps,
                                          step_metrics.pop('finite'), trainer.state.step)
      real_tokens = speed.add(segment_ids)
      window_tokens += real_tokens * jax.process_count()
      window_steps += 1
      writer.advance()
      is_last = step == c_train.steps
      if step % c_train.log_every == 0 or is_last:
        check_finite(step)
        logged = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        now = time.perf_counter()
        logged.update(speed.report(now - window_start, window_steps))
        logged['packing_efficiency'] = window_tokens / (window_steps * row_tokens)
        logged['skipped_records'] = sum(train_iter.skipped.counts.values())
        if skip_nonfinite:
          logged['nonfinite_steps'] = int(jax.device_get(nonfinite_steps))
        window_start, window_tokens, window_steps = now, 0, 0
        every = config.eval.every_steps
        if (eval_set or gen_eval) and ((every > 0 and step % every == 0) or is_last):
          last_eval = evaluate(trainer, eval_set, gen_eval)
          logged.update(last_eval)
        writer.write(step, logged)
      stop = step == stop_at or preemption.reached(step, manager)
      if stop or is_last or manager.due(step):
        check_finite(step)  # a non-finite state is never written
        manager.save(step, trainer.state, batches, meta)
      if stop:
        preempted_at = step
        break
  manager.wait()  # every save is committed before we report or exit
  manager.close()
  wall = time.perf_counter() - start
  summary = dict(steps=c_train.steps, wall_s=wall, final_loss=logged.get('loss'),
                 skipped_records=dict(train_iter.skipped.counts), preempted_at=preempted_at,
                 train_step_compiles=len(trainer.step_traces))
  if skip_nonfinite:
    summary['nonfinite_steps'] = int(jax.device_get(nonfinite_steps))
  if preempted_at is not None:
    saved = manager.latest_step()
    writer.print(f'stopped after step {preempted_at} and saved a checkpoint; exit '
                 f'{EXIT_RESTART} means: run the same command again to resume'
                 if saved == preempted_at else
                 f'stopped before step {preempted_at + 1} ('
                 + (f'the checkpoint at step {saved} is current' if saved is not None
                    else 'no step ran, nothing to save')
                 + f'); exit {EXIT_RESTART} means: run the same command again to resume')
    writer.close()
    return summary
  line = f'done: {c_train.steps} steps in {wall:.1f}s, final train loss {summary["final_loss"]:.4f}'
  has_eval_loss = bool(first_eval and last_eval and 'eval_loss' in last_eval)
  if has_eval_loss:
    summary.update(eval_loss_before=first_eval['eval_loss'], eval_loss_after=last_eval['eval_loss'],
                   accuracy_before=first_eval['eval_accuracy'],
                   accuracy_after=last_eval['eval_accuracy'],
                   eval_examples=last_eval['eval_examples'])
    line += f', eval loss {first_eval["eval_loss"]:.4f} -> {last_eval["eval_loss"]:.4f}'
  if train_iter.skipped.counts:
    line += f', skipped records {dict(sorted(train_iter.skipped.counts.items()))}'
  if skip_nonfinite and summary['nonfinite_steps']:
    line += f', {summary["nonfinite_steps"]} non-finite steps skipped'
  writer.print(line)
  if has_eval_loss:
    writer.print(f'held-out accuracy: before {first_eval["eval_accuracy"]:.2f} -> after '
                 f'{last_eval["eval_accuracy"]:.2f} (n={last_eval["eval_examples"]})')
  writer.close()
  return summary
