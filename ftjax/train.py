"""TrainState, the jitted train/eval steps, and `run()`: the whole training loop, top to bottom."""

from __future__ import annotations

import dataclasses
import functools
import glob
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
  losses,
  metrics,
  models,
  optim,
  pretrained,
  quantize,
  sharding,
  tokenizer,
  weights,
)
from ftjax.models import llama
from ftjax.version import __version__

DTYPES = pretrained.DTYPES


class ConfigError(ValueError):
  """A config value is invalid; the message names the key."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: nnx.State  # the trainable variables only
  opt_state: optax.OptState


def _loss_and_stats(params, frozen, batch, *, graphdef, dropout_key=None):
  model = nnx.merge(graphdef, params, frozen)
  logits = model(batch['tokens'], batch['positions'], batch['segment_ids'],
                 dropout_key=dropout_key)
  return losses.next_token_xent(logits, batch['targets'], batch['loss_mask'])


def loss_grads(params: nnx.State, frozen: nnx.State, batch: dict[str, jax.Array], *, graphdef,
               dropout_key: jax.Array | None = None):
  """Gradients of the summed masked loss, with that sum and the masked-token count."""

  def sum_loss(params):
    # Fresh Variables for the frozen weights at this trace level: NNX transforms inside the
    # model (the layer scan) refuse Variables created outside the gradient trace.
    stats = _loss_and_stats(params, jax.tree.map(lambda x: x, frozen), batch, graphdef=graphdef,
                            dropout_key=dropout_key)
    return stats['loss_sum'], stats['tokens']

  (loss_sum, tokens), grads = jax.value_and_grad(sum_loss, has_aux=True)(params)
  return grads, loss_sum, tokens


def train_step(state: TrainState, frozen: nnx.State, batch: dict[str, jax.Array], *, graphdef,
               tx: optax.GradientTransformation, lr_fn: optax.Schedule, grad_accum: int,
               dropout_seed: int | None = None):
  """One optimizer step over the global batch, split into `grad_accum` microbatches.

  Gradients are summed over all masked tokens of all microbatches, then divided by
  their count, so accumulation gives the same update as one big batch.
  """
  # Dropout masks depend only on (seed, step, microbatch): a resumed run draws the same ones.
  key = (None if dropout_seed is None
         else jax.random.fold_in(jax.random.key(dropout_seed), state.step))
  if grad_accum == 1:
    grads, loss_sum, tokens = loss_grads(state.params, frozen, batch, graphdef=graphdef,
                                         dropout_key=key)
  else:
    # Row r goes to microbatch r % grad_accum: each device keeps its own rows.
    micro = jax.tree.map(
        lambda x: x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1),
        batch)

    def accumulate(carry, inputs):
      microbatch, index = inputs
      micro_key = None if key is None else jax.random.fold_in(key, index)
      out = loss_grads(state.params, frozen, microbatch, graphdef=graphdef, dropout_key=micro_key)
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


def eval_step(params: nnx.State, frozen: nnx.State, batch: dict[str, jax.Array], *, graphdef):
  """Sums for held-out loss and exact match (every masked target is the argmax)."""
  stats = _loss_and_stats(params, frozen, batch, graphdef=graphdef)
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


def model_config(model: ml_collections.ConfigDict) -> llama.Config:
  """The architecture: the pretrained folder's, or `model.preset` plus any field set."""
  fields = {f.name for f in dataclasses.fields(llama.Config)}
  overrides = {k: v for k, v in model.items() if k in fields}
  if model.pretrained:
    changed = sorted(k for k, v in overrides.items() if v is not None)
    if changed:
      raise ConfigError(f'model.{changed[0]} cannot be overridden when model.pretrained is set: '
                        'the architecture comes from its config.json')
    try:
      return pretrained.read_config(model.pretrained)
    except weights.CheckpointError as e:
      raise ConfigError(f'model.pretrained: {e}') from None
  try:
    return models.config_from_preset(model.preset, overrides)
  except (KeyError, ValueError) as e:
    raise ConfigError(e.args[0]) from None


def setup(*, arch: llama.Config, model_options: dict[str, Any], mesh_shape, rules_name: str,
          optim_kwargs: dict[str, Any], grad_accum: int, global_batch: int, seed: int,
          pretrained_path: str = '', lora_options: dict[str, Any] | None = None,
          num_slices: int = 1, devices=None) -> Trainer:
  """Mesh -> abstract model -> shardings -> sharded init or load -> compiled steps."""
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

  state_sh = sharding.state_shardings(jax.eval_shape(init_state, params), mesh, rules)
  state = jax.jit(init_state, out_shardings=state_sh, donate_argnums=0)(params)
  frozen_sh = sharding.state_shardings(frozen, mesh, rules)
  batch_sh = sharding.batch_sharding(mesh, rules)
  replicated = NamedSharding(mesh, P())
  step_fn = jax.jit(
      functools.partial(train_step, graphdef=graphdef, tx=tx, lr_fn=lr_fn, grad_accum=grad_accum,
                        dropout_seed=seed if lora_options and lora_options['dropout'] else None),
      in_shardings=(state_sh, frozen_sh, batch_sh), out_shardings=(state_sh, replicated),
      donate_argnums=0)
  eval_fn = jax.jit(functools.partial(eval_step, graphdef=graphdef),
                    in_shardings=(state_sh.params, frozen_sh, batch_sh), out_shardings=replicated)
  return Trainer(mesh, rules, graphdef, state, frozen, step_fn, eval_fn, batch_sh)


def evaluate(trainer: Trainer, batches: list[dict[str, np.ndarray]]) -> dict[str, float]:
  """Held-out loss, perplexity and exact-match accuracy over every eval example."""
  totals = None
  with sharding.use(trainer.mesh, trainer.rules):
    for batch, _ in data.device_batches(iter(batches), trainer.batch_sharding):
      out = trainer.eval_step(trainer.state.params, trainer.frozen, batch)
      totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  totals = jax.device_get(totals)
  loss = float(totals['loss_sum']) / max(float(totals['tokens']), 1.0)
  return dict(eval_loss=loss, eval_perplexity=float(np.exp(min(loss, 80.0))),
              eval_accuracy=float(totals['exact']) / max(float(totals['examples']), 1.0),
              eval_examples=int(totals['examples']))


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


def lora_options(c_lora: ml_collections.ConfigDict) -> dict[str, Any] | None:
  """The `lora` section as keyword arguments; None for full fine-tuning (rank 0)."""
  if not c_lora.rank and not c_lora.adapter:
    return None
  return dict(rank=c_lora.rank, alpha=c_lora.alpha, targets=c_lora.targets,
              use_rslora=c_lora.use_rslora, use_dora=c_lora.use_dora, adapter=c_lora.adapter,
              dropout=c_lora.dropout,
              quantize_base=c_lora.quantize_base)


def tokenizer_spec(config: ml_collections.ConfigDict) -> str:
  """data.tokenizer, else the pretrained folder's tokenizer, else the built-in byte one."""
  return config.data.tokenizer or config.model.pretrained or tokenizer.BYTE


def _optim_kwargs(o: ml_collections.ConfigDict, steps: int) -> dict[str, Any]:
  return dict(lr=o.lr, steps=steps, warmup_steps=o.warmup_steps, schedule_kind=o.schedule,
              end_lr_ratio=o.end_lr_ratio, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2,
              eps=o.eps, clip_norm=o.clip_norm, decay_embeddings=o.decay_embeddings)


def _check_keys(config: ml_collections.ConfigDict, schema: ml_collections.ConfigDict,
                prefix: str = '') -> None:
  for key in config:
    if key not in schema:
      raise ConfigError(f'config key {prefix + key!r} is not defined in configs/base.py; '
                        f'known keys here: {sorted(schema.keys())}')
    if isinstance(schema[key], ml_collections.ConfigDict):
      _check_keys(config[key], schema[key], f'{prefix}{key}.')


def validate(config: ml_collections.ConfigDict) -> llama.Config:
  """Checks values the type-locked config cannot; returns the resolved architecture."""
  from configs import base  # the schema: every key ftjax knows

  _check_keys(config, base.get_config())
  choices = {
      'model.dtype': (config.model.dtype, tuple(DTYPES)),
      'model.param_dtype': (config.model.param_dtype, tuple(DTYPES)),
      'model.remat': (config.model.remat, ('none', *llama.REMAT_POLICIES)),
      'model.attention': (config.model.attention, ('xla', 'cudnn')),
      'optim.schedule': (config.optim.schedule, ('cosine', 'linear', 'constant')),
      'data.train_on': (config.data.train_on, ('assistant', 'completion', 'all')),
      'data.on_bad_record': (config.data.on_bad_record, ('error', 'skip')),
      'data.on_too_long': (config.data.on_too_long, ('truncate', 'skip', 'error')),
  }
  for key, (value, allowed) in choices.items():
    if value not in allowed:
      raise ConfigError(f'{key}={value!r} is not one of {allowed}')
  if config.lora.rank < 0:
    raise ConfigError(f'lora.rank={config.lora.rank} must be >= 0 (0 = full fine-tuning)')
  if not 0.0 <= config.lora.dropout < 1.0:
    raise ConfigError(f'lora.dropout={config.lora.dropout} must be in [0, 1)')
  if config.lora.quantize_base:
    if config.lora.quantize_base not in quantize.BITS:
      raise ConfigError(f'lora.quantize_base={config.lora.quantize_base!r}; expected one of '
                        f'{list(quantize.BITS)} or None (nf4 is not implemented: use int4)')
    if not (config.lora.rank or config.lora.adapter):
      raise ConfigError('lora.quantize_base needs adapters (lora.rank > 0): a quantized base '
                        'is frozen')
  positive = {'train.steps': config.train.steps, 'data.seq_len': config.data.seq_len,
              'data.global_batch': config.data.global_batch,
              'optim.grad_accum': config.optim.grad_accum,
              'train.log_every': config.train.log_every}
  for key, value in positive.items():
    if value < 1:
      raise ConfigError(f'{key}={value} must be >= 1')
  if config.model.pretrained and not os.path.isdir(config.model.pretrained):
    raise ConfigError(f'model.pretrained={config.model.pretrained!r}: folder not found')
  for source in train_sources(config.data) + eval_sources(config.data):
    if not source.path.startswith(('tfds://', 'gs://')) and not glob.glob(source.path + '*'):
      raise ConfigError(f'data source {source.path!r}: file not found')
  return model_config(config.model)


def train_sources(c_data: ml_collections.ConfigDict) -> list[data.Source]:
  """`data.sources`, or the one-source shorthand `data.path`."""
  if c_data.path and c_data.sources:
    raise ConfigError('set data.path (one source) or data.sources (a mixture), not both')
  if not c_data.path and not c_data.sources:
    raise ConfigError('no training data: set data.path=FILE or data.sources=[{"path": ...}]')
  entries = [c_data.path] if c_data.path else list(c_data.sources)
  try:
    return [data.Source.parse(e, f'data.sources[{i}]') for i, e in enumerate(entries)]
  except data.DataError as e:
    raise ConfigError(str(e)) from None


def eval_sources(c_data: ml_collections.ConfigDict) -> list[data.Source]:
  return [data.Source(c_data.eval_path)] if c_data.eval_path else []


def data_options(config: ml_collections.ConfigDict) -> data.Options:
  c = config.data
  return data.Options(tokenizer=tokenizer_spec(config), seq_len=c.seq_len, train_on=c.train_on,
                      chat_template=c.chat_template, on_bad_record=c.on_bad_record,
                      on_too_long=c.on_too_long, tfds_data_dir=c.tfds_data_dir)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains as `config` says, writing metrics, TensorBoard and config.json into `workdir`."""
  arch = validate(config)
  c_data, c_train, c_model = config.data, config.train, config.model
  tok = tokenizer.load(tokenizer_spec(config))
  if tok.vocab_size > arch.vocab_size:
    raise ConfigError(f'the tokenizer has {tok.vocab_size} tokens but model.vocab_size is '
                      f'{arch.vocab_size}; set --config.model.vocab_size>={tok.vocab_size}')
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      json.dump({**config.to_dict(), 'resolved_model': dataclasses.asdict(arch)}, f, indent=2)

  trainer = setup(
      arch=arch,
      model_options=dict(dtype=DTYPES[c_model.dtype], param_dtype=DTYPES[c_model.param_dtype],
                         remat=c_model.remat, attention_impl=c_model.attention),
      mesh_shape=tuple(config.mesh.shape), rules_name=config.mesh.rules,
      optim_kwargs=_optim_kwargs(config.optim, c_train.steps), grad_accum=config.optim.grad_accum,
      global_batch=c_data.global_batch, seed=c_train.seed, pretrained_path=c_model.pretrained,
      lora_options=lora_options(config.lora), num_slices=config.mesh.num_slices)
  options = data_options(config)
  train_iter = data.train_batches(train_sources(c_data), options,
                                  global_batch=c_data.global_batch, seed=c_train.seed,
                                  pack=c_data.pack, workers=c_data.workers)
  eval_set = (data.eval_batches(eval_sources(c_data), options, global_batch=c_data.global_batch,
                                max_examples=c_data.max_eval_examples)
              if c_data.eval_path else None)
  n_params = sharding.count_params(trainer.state.params)
  logging.info('model %s: %d trainable parameters; mesh %s', c_model.preset, n_params,
               dict(trainer.mesh.shape))

  manager, start_step = restore_or_start(config, workdir, trainer, train_iter)
  writer = metrics.Writer(workdir, total_steps=c_train.steps, start_step=start_step,
                          progress=c_train.progress)
  writer.print(f'ftjax: {c_model.preset} ({n_params:,} params) on mesh {dict(trainer.mesh.shape)}, '
               f'steps {start_step + 1}..{c_train.steps}'
               + (f' (resumed from step {start_step})' if start_step else ''))
  if start_step == 0:
    first_eval = evaluate(trainer, eval_set) if eval_set else None
    if first_eval:
      writer.write(0, first_eval)
  else:
    first_eval = _logged_eval_before(workdir)
  last_eval = first_eval
  preemption = Preemption()
  meta = dict(ftjax_version=__version__, mesh=dict(trainer.mesh.shape), preset=c_model.preset,
              config=json.loads(config.to_json_best_effort()))
  stop_at = c_train.stop_at_step
  batches = data.device_batches(train_iter, trainer.batch_sharding)
  start = time.perf_counter()
  window_start, window_tokens, window_steps, logged = start, 0, 0, {}
  row_tokens = c_data.global_batch * c_data.seq_len
  preempted_at = None
  with sharding.use(trainer.mesh, trainer.rules):
    for step in range(start_step + 1, c_train.steps + 1):
      batch, real_tokens = next(batches)
      trainer.state, step_metrics = trainer.train_step(trainer.state, trainer.frozen, batch)
      window_tokens += real_tokens * jax.process_count()
      window_steps += 1
      writer.advance()
      is_last = step == c_train.steps
      if step % c_train.log_every == 0 or is_last:
        logged = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        now = time.perf_counter()
        logged['tokens_per_s'] = window_tokens / max(now - window_start, 1e-9)
        logged['packing_efficiency'] = window_tokens / (window_steps * row_tokens)
        logged['skipped_records'] = sum(train_iter.skipped.counts.values())
        window_start, window_tokens, window_steps = now, 0, 0
        if eval_set and ((c_train.eval_every > 0 and step % c_train.eval_every == 0) or is_last):
          last_eval = evaluate(trainer, eval_set)
          logged.update(last_eval)
        writer.write(step, logged)
      stop = step == stop_at or preemption.reached(step, manager)
      if stop or is_last or manager.due(step):
        manager.save(step, trainer.state, train_iter.iterator, meta)
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
  if first_eval and last_eval:
    summary.update(eval_loss_before=first_eval['eval_loss'], eval_loss_after=last_eval['eval_loss'],
                   accuracy_before=first_eval['eval_accuracy'],
                   accuracy_after=last_eval['eval_accuracy'],
                   eval_examples=last_eval['eval_examples'])
    line += f', eval loss {first_eval["eval_loss"]:.4f} -> {last_eval["eval_loss"]:.4f}'
  if train_iter.skipped.counts:
    line += f', skipped records {dict(sorted(train_iter.skipped.counts.items()))}'
  writer.print(line)
  if first_eval and last_eval:
    writer.print(f'held-out accuracy: before {first_eval["eval_accuracy"]:.2f} -> after '
                 f'{last_eval["eval_accuracy"]:.2f} (n={last_eval["eval_examples"]})')
  writer.close()
  return summary
