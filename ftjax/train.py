"""`run()`: the training loop of `ftjax train`, top to bottom (resolve, set up, restore, loop).

The jitted core is `ftjax.step`, the sharded set-up `ftjax.trainer`; this module owns the order
of things: nothing is written into the workdir until every check has passed, a non-finite state
is never saved, and a preemption saves and exits with `EXIT_RESTART`.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ftjax import config as config_lib
from ftjax import data, metrics, reference, resume, rollout, sharding, throughput
from ftjax import trainer as trainer_lib
from ftjax import workdir as workdir_lib
from ftjax.version import __version__

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


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains as `config` says, writing metrics, TensorBoard and config.json into `workdir`.

  Nothing is written into `workdir` until the config, the mesh, the data and the restore have
  all passed; a second run on a workdir a live run holds is refused.
  """
  r = config_lib.resolve(config)
  arch = r.model.arch
  tok = data.formats.cached_tokenizer(r.data.options.tokenizer)  # the one the pipeline uses
  if tok.vocab_size > arch.vocab_size:
    raise config_lib.ConfigError(
        f'the tokenizer has {tok.vocab_size} tokens but model.vocab_size is '
        f'{arch.vocab_size}; set --config.model.vocab_size>={tok.vocab_size}')
  run_dir = workdir_lib.RunDir(workdir, resume=r.ckpt.resume, overwrite=r.ckpt.overwrite)
  # Signals are handled from here on: one during set-up stops the run before its first step.
  preemption = resume.Preemption()
  try:
    return _start(r, workdir, run_dir, preemption)
  finally:
    preemption.close()
    run_dir.release()


def _start(r: config_lib.Resolved, workdir: str, run_dir: workdir_lib.RunDir,
           preemption: resume.Preemption) -> dict[str, Any]:
  c_data, c_train = r.data, r.train
  trainer = trainer_lib.from_resolved(r)
  if r.objective.rollouts:  # grpo: prompts, completed by the live policy each rollout
    prompts = rollout.Prompts.load(list(c_data.sources), c_data.options,
                                   max_length=c_data.seq_len - r.objective.max_new_tokens + 1)
    report = prompts
    train_iter = rollout.Rollouts(trainer, prompts, r.objective, seq_len=c_data.seq_len,
                                  seed=c_train.seed, num_samples=r.eval.num_samples,
                                  tokenizer=data.formats.cached_tokenizer(c_data.options.tokenizer))
  else:
    report = data.preflight(list(c_data.sources), c_data.options)
    train_iter = data.train_batches(list(c_data.sources), c_data.options,
                                    global_batch=c_data.global_batch, seed=c_train.seed,
                                    pack=c_data.pack, workers=c_data.workers)
  eval_set = (data.eval_batches(list(c_data.eval_sources), c_data.options,
                                global_batch=c_data.global_batch,
                                max_examples=c_data.max_eval_examples)
              if c_data.eval_sources else None)
  gen_eval = config_lib.generation_eval(r)
  n_params = sharding.count_params(trainer.state.params)
  start = resume.restore_or_start(r, workdir, trainer, train_iter)
  manager, start_step = start.manager, start.step
  table = None
  if r.objective.precompute_ref:  # computed from the initial weights, read back on resume
    table = (reference.compute(trainer, r, eval_set) if start_step == 0
             else reference.Table.load(workdir, c_train.steps))
    if table is None:
      raise config_lib.ConfigError(
          f'{os.path.join(workdir, reference.FILE)} is missing: this run (objective.precompute_ref)'
          f' resumes from step {start_step} but its reference log-probabilities are gone; start '
          'a new run')

  # Every check has passed: from here on the run writes into its directory.
  run_dir.commit()
  if run_dir.overwrite:
    manager.reload()  # the earlier run's checkpoints are gone
  for step, _ in start.corrupt:
    manager.move_aside(step)
  if jax.process_index() == 0:
    workdir_lib.write_json(os.path.join(workdir, 'config.json'), config_lib.run_json(r))
  if table is not None and start_step == 0:
    table.save(workdir)
  writer = metrics.Writer(workdir, total_steps=c_train.steps, start_step=start_step,
                          progress=c_train.progress, wandb_project=c_train.wandb_project,
                          config=r.config)
  preemption.say = writer.print
  writer.print(f'ftjax: {r.model.describe()} ({n_params:,} params) on mesh '
               f'{dict(trainer.mesh.shape)}, steps {start_step + 1}..{c_train.steps}'
               + (f' (resumed from step {start_step})' if start_step else ''))
  writer.print(report.summary_line())
  if getattr(train_iter, 'filtered', None):  # data.dedup & co, decided once before shuffling
    writer.print(f'data: filters dropped {dict(sorted(train_iter.filtered.items()))} records')
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
    return _loop(r, workdir, trainer, train_iter, eval_set, gen_eval, manager, start_step,
                 writer, preemption, table)
  except BaseException:
    manager.wait_quietly()  # the save in flight is committed before the error is reported
    manager.close()
    writer.close()
    raise


def _loop(r, workdir, trainer, train_iter, eval_set, gen_eval, manager, start_step, writer,
          preemption, table) -> dict[str, Any]:
  c_data, c_train, c_model = r.data, r.train, r.model
  eval_ref = table.eval if table is not None else None
  filtered = dict(getattr(train_iter, 'filtered', {}))  # records data.dedup & co dropped
  if start_step == 0:
    first_eval = (trainer_lib.evaluate(trainer, eval_set, gen_eval, eval_ref)
                  if eval_set or gen_eval else None)
    if first_eval:
      writer.write(0, first_eval)
  else:
    first_eval = _logged_eval_before(workdir)
  last_eval = first_eval
  meta = dict(ftjax_version=__version__, mesh=dict(trainer.mesh.shape), preset=c_model.preset,
              config=json.loads(json.dumps(r.config, default=str)))
  stop_at = c_train.stop_at_step
  batches = (train_iter if r.objective.rollouts
             else data.Prefetcher(train_iter, trainer.batch_sharding, depth=c_data.prefetch))
  speed = throughput.Meter(c_model.arch, num_devices=trainer.mesh.size,
                           adapter_params=trainer_lib.trained_adapters(trainer),
                           compute_dtype=config_lib.DTYPES[c_model.dtype],
                           reference_forward=r.objective.live_reference)
  start = time.perf_counter()
  window_start, window_tokens, window_steps, logged = start, 0, 0, {}
  row_tokens = c_data.global_batch * c_data.seq_len
  preempted_at = None
  first_bad, nonfinite_steps = jax.device_put((np.int32(-1), np.int32(0)),
                                              NamedSharding(trainer.mesh, P()))
  skip_nonfinite = c_train.skip_nonfinite
  save_wanted = stop_wanted = False  # grpo: saves wait for the end of a rollout's iterations

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
      if table is not None:
        batch = table.put(step, batch, trainer.batch_sharding)
      trainer.state, step_metrics = trainer.train_step(trainer.state, trainer.frozen, batch,
                                                       trainer.ref)
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
        if r.objective.rollouts:  # the window's time split into rollouts and training
          logged.update(batches.report())
          train_s = max(now - window_start - logged['rollout_time_s'], 1e-9)
          logged['train_tokens_per_s'] = logged['tokens_per_s'] * (now - window_start) / train_s
        logged['packing_efficiency'] = window_tokens / (window_steps * row_tokens)
        logged['skipped_records'] = sum(train_iter.skipped.counts.values())
        if filtered:
          logged['filtered_records'] = sum(filtered.values())
        if skip_nonfinite:
          logged['nonfinite_steps'] = int(jax.device_get(nonfinite_steps))
        window_start, window_tokens, window_steps = now, 0, 0
        every = r.eval.every_steps
        if (eval_set or gen_eval) and ((every > 0 and step % every == 0) or is_last):
          last_eval = trainer_lib.evaluate(trainer, eval_set, gen_eval, eval_ref)
          logged.update(last_eval)
        writer.write(step, logged)
      stop_wanted |= step == stop_at or preemption.reached(step, manager)
      save_wanted |= manager.due(step)
      saveable = batches.saveable(step) or is_last
      stop = stop_wanted and saveable
      if saveable and (stop or is_last or save_wanted):
        check_finite(step)  # a non-finite state is never written
        manager.save(step, trainer.state, batches, meta)
        save_wanted = False
      if stop:
        preempted_at = step
        break
  manager.wait()  # every save is committed before we report or exit
  manager.close()
  wall = time.perf_counter() - start
  summary = dict(steps=c_train.steps, wall_s=wall, final_loss=logged.get('loss'),
                 skipped_records=dict(train_iter.skipped.counts), filtered_records=filtered,
                 preempted_at=preempted_at,
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
  if filtered:
    line += f', filtered records {dict(sorted(filtered.items()))}'
  if skip_nonfinite and summary['nonfinite_steps']:
    line += f', {summary["nonfinite_steps"]} non-finite steps skipped'
  writer.print(line)
  if has_eval_loss:
    writer.print(f'held-out accuracy: before {first_eval["eval_accuracy"]:.2f} -> after '
                 f'{last_eval["eval_accuracy"]:.2f} (n={last_eval["eval_examples"]})')
  generated = _generation_scores(first_eval, last_eval)
  if generated:
    summary['generation'] = generated
    writer.print('held-out generation: ' + ', '.join(
        f'{k} {before:.2f} -> {after:.2f}' for k, (before, after) in generated.items()))
  writer.close()
  return summary


def _generation_scores(first: dict | None, last: dict | None) -> dict[str, tuple[float, float]]:
  """{score name: (before, after)} of the generation eval, when it ran before and after."""
  if not first or not last or 'eval_generation_score' not in last:
    return {}
  names = [k for k in last if k.startswith('eval_generation_')]
  if len(names) > 1:
    names.remove('eval_generation_score')  # it repeats the first named score
  return {k.removeprefix('eval_generation_'): (first[k], last[k]) for k in names if k in first}
