"""`ftjax bench`: compile, warm up and time the real train step on synthetic batches.

The batches have the config's shapes (global batch x seq_len, one document per row), so the
figures are the model's and the mesh's, not the input pipeline's (`ftjax data bench` times that).
"""

from __future__ import annotations

import ast
import collections
import copy
import dataclasses
import resource
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ftjax import config as cfg_lib
from ftjax import data, generation, objectives, rollout, sharding, throughput
from ftjax import trainer as trainer_lib


def synthetic_batch(global_batch: int, seq_len: int, vocab: int, batch_sharding,
                    seed: int = 0, pairs: bool = False) -> dict[str, jax.Array]:
  """Random full rows (every position a real token in the loss), laid out like training data;
  with `pairs`, each row a preference pair (two halves, segments 1 and 2)."""
  rows = global_batch // jax.process_count()
  rng = np.random.default_rng(seed + jax.process_index())
  tokens = rng.integers(3, vocab, (rows, seq_len + 1), dtype=np.int32)
  half = seq_len // 2 if pairs else seq_len
  positions = np.concatenate([np.arange(half), np.arange(seq_len - half)]).astype(np.int32)
  segments = np.where(np.arange(seq_len) < half, 1, 2).astype(np.int32)
  local = dict(tokens=tokens[:, :-1], targets=tokens[:, 1:],
               positions=np.broadcast_to(positions, (rows, seq_len)),
               segment_ids=np.broadcast_to(segments, (rows, seq_len)),
               loss_mask=np.ones((rows, seq_len), np.int32))
  return data.to_global(local, batch_sharding)


def memory(compiled: Any) -> dict[str, int]:
  """Per-device bytes of a compiled step, from XLA's memory analysis."""
  m = compiled.memory_analysis()
  out = dict(arguments=int(m.argument_size_in_bytes), outputs=int(m.output_size_in_bytes),
             temporaries=int(m.temp_size_in_bytes), aliased=int(m.alias_size_in_bytes),
             code=int(m.generated_code_size_in_bytes))
  # Donated arguments that are aliased to outputs occupy their buffer once.
  out['total'] = out['arguments'] + out['outputs'] + out['temporaries'] - out['aliased']
  return out


def calibrate(config: ml_collections.ConfigDict | None = None) -> dict[str, Any]:
  """`ftjax bench --calibrate`: the matmul peak of this machine measured again (in the config's
  compute dtype, float32 without one) and cached for every later run; its record."""
  dtype = cfg_lib.DTYPES[config.model.dtype] if config is not None else np.float32
  p = throughput.peak(dtype=dtype, recalibrate=True)
  return dict(peak_tflops_per_device=p.flops_per_s / 1e12, peak_source=p.source,
              **(p.provenance or {}), cache=throughput.cache_path())


def _process_peak_rss() -> int:
  """This process's peak resident memory in bytes (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _device_peak_bytes() -> int | None:
  stats = jax.local_devices()[0].memory_stats()
  return int(stats['peak_bytes_in_use']) if stats and 'peak_bytes_in_use' in stats else None


def trainer_for(config: ml_collections.ConfigDict, *, abstract: bool = False,
                devices=None, objective: objectives.Options | None = None
                ) -> tuple[cfg_lib.Resolved, trainer_lib.Trainer]:
  """The resolved config and the trainer `ftjax train` would build, with random weights.

  A `model.pretrained` folder contributes its architecture, not its weights (the step's cost
  does not depend on them, and reading them would dominate the benchmark). A PEFT adapter is
  replaced by fresh adapters (the same shapes when lora.rank matches the adapter's).
  `objective` replaces the config's (the side-by-side SFT step of a preference benchmark).
  """
  r = cfg_lib.resolve(config, check_files=False)
  if objective is not None:
    r = dataclasses.replace(r, objective=objective)
  trainer = trainer_lib.from_resolved(r, pretrained_path='',
                                      lora_options=r.lora and r.lora.fresh(),
                                      abstract=abstract, devices=devices)
  return r, trainer


class _Timed:
  """One compiled step, stepping its own state: `once()` times one call."""

  def __init__(self, trainer: trainer_lib.Trainer, batch: dict[str, jax.Array]):
    self.trainer, self.batch, self.times = trainer, batch, []
    start = time.perf_counter()
    self.compiled = trainer.train_step.lower(trainer.state, trainer.frozen, batch,
                                             trainer.ref).compile()
    self.compile_s = time.perf_counter() - start
    self.state = trainer.state
    # XLA:CPU compiles int4 arguments for a packed layout that arrays placed by device_put do
    # not have; the jitted step (as training calls it) lays them out itself, at one compile more.
    packed = any(jnp.dtype(x.dtype).itemsize * 8 > jnp.iinfo(x.dtype).bits
                 for x in jax.tree.leaves(trainer.frozen) if jnp.issubdtype(x.dtype, jnp.integer))
    self._call = trainer.train_step if packed else self.compiled

  def once(self, record: bool) -> None:
    t = self.trainer
    start = time.perf_counter()
    self.state, out = self._call(self.state, t.frozen, self.batch, t.ref)
    jax.block_until_ready((self.state, out))
    if record:
      self.times.append(time.perf_counter() - start)


def with_overrides(config: ml_collections.ConfigDict, overrides: list[str]
                   ) -> ml_collections.ConfigDict:
  """A copy of `config` with `section.key=value` items applied (values as Python literals, else
  text), as `--config.section.key=value` would; an unknown key is a `ConfigError`."""
  c = copy.deepcopy(config)
  for item in overrides:
    key, sep, text = item.partition('=')
    *path, name = key.split('.')
    node = c
    for part in path:
      node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
    if not sep or not path or not isinstance(node, ml_collections.ConfigDict) or name not in node:
      raise cfg_lib.ConfigError(f'{item!r}: expected section.key=value with a key of the config '
                                '(e.g. lora.rank=16)')
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    try:
      node[name] = value
    except TypeError as e:  # a ConfigDict keeps each key's type
      raise cfg_lib.ConfigError(f'{item!r}: {e}') from None
  return c


def run(config: ml_collections.ConfigDict, steps: int = 10, warmup: int = 2) -> dict[str, Any]:
  """Times `steps` train steps after `warmup` ones; returns the figures `ftjax bench` prints.

  A preference objective's step is timed side by side (alternating calls) with the SFT step of
  the same model over the same batch: `vs_sft` gives both medians and their ratio.
  """
  return side_by_side({'run': config}, steps=steps, warmup=warmup)['run']


def side_by_side(configs: dict[str, ml_collections.ConfigDict], steps: int = 10,
                 warmup: int = 2, others: dict[str, Any] | None = None
                 ) -> dict[str, dict[str, Any]]:
  """`run` for several configs at once: every step is compiled first, then they are called
  alternately (a, b, a, b, ...), so each sees the same machine; a busy or throttled moment
  slows all of them, not one. `others` are more timed things with `once(record)` and `times`
  (a hand-written reference step), called in the same rotation. Returns `run`'s figures per
  config name."""
  benches = {name: _Bench(config, steps) for name, config in configs.items()}
  for i in range(warmup + steps):
    for b in benches.values():
      for t in b.timed:
        t.once(record=i >= warmup)
    for other in (others or {}).values():
      other.once(record=i >= warmup)
  return {name: b.figures() for name, b in benches.items()}


class _Bench:
  """One config's compiled step(s), batch and side measurements, ready to be called."""

  def __init__(self, config: ml_collections.ConfigDict, steps: int):
    self.r, self.trainer = r, trainer = trainer_for(config)
    arch, c_data = r.model.arch, r.data
    batch = synthetic_batch(c_data.global_batch, c_data.seq_len, arch.vocab_size,
                            trainer.batch_sharding, seed=r.train.seed, pairs=r.objective.pairs)
    if r.objective.precompute_ref:  # the step reads the table's rows instead of a reference
      batch = dict(batch, ref_logps=data.global_rows(
          np.zeros((c_data.global_batch, 2), np.float32), trainer.batch_sharding))
    self.rollouts = None
    with sharding.use(trainer.mesh, trainer.rules):
      if r.objective.rollouts:  # rows as a rollout leaves them: rewards, stored log-probs
        self.rollouts = _rollout_bench(r, trainer, steps=max(steps // 2, 2))
        batch = _rollout_batch(r, trainer, batch)
      self.timed = [_Timed(trainer, batch)]
      if r.objective.pairs:
        self.timed.append(_Timed(trainer_for(config, objective=objectives.SFT)[1], batch))

  def figures(self) -> dict[str, Any]:
    r, trainer, timed = self.r, self.trainer, self.timed
    arch, c_data, c_model = r.model.arch, r.data, r.model
    pairs = r.objective.pairs
    trainer.state, times, compile_s = timed[0].state, timed[0].times, timed[0].compile_s
    compiled = timed[0].compiled
    tokens = c_data.global_batch * c_data.seq_len
    lengths = [c_data.seq_len // 2, c_data.seq_len - c_data.seq_len // 2] * c_data.global_batch \
        if pairs else [c_data.seq_len] * c_data.global_batch
    flops = throughput.train_flops(
        arch, tokens=tokens, lengths=lengths,
        adapter_params=trainer_lib.trained_adapters(trainer),
        reference_forward=r.objective.live_reference)
    peak = throughput.peak(dtype=cfg_lib.DTYPES[c_model.dtype])
    median = statistics.median(times)
    n_devices = trainer.mesh.size
    trainable = sharding.count_params(trainer.state.params)
    buffers = memory(compiled)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return dict(
        tokens_per_s=tokens / median,
        tokens_per_s_per_device=tokens / median / n_devices,
        step_s=dict(median=median, p90=float(np.percentile(times, 90)), steps=len(times)),
        compile_s=compile_s,
        mfu=throughput.mfu(flops.total, median, n_devices, peak.flops_per_s),
        model_tflops_per_step=flops.total / 1e12,
        attention_tflops_per_step=flops.attention / 1e12,
        xla_tflops_per_step=float(cost.get('flops', 0.0)) * n_devices / 1e12,
        peak_tflops_per_device=peak.flops_per_s / 1e12,
        peak_source=peak.source,
        peak=dict(peak.provenance or {}, flops_per_s=peak.flops_per_s),
        params=trainable + sharding.count_params(trainer.frozen),
        trainable_params=trainable,
        # XLA's account of the step's buffers, the device's own peak where it reports one
        # (GPU, TPU), and this process's peak resident memory (on CPU: all of it, weights
        # loaded, compile-time memory and host copies included).
        peak_memory_bytes=dict(compiled=buffers['total'], measured=_device_peak_bytes(),
                               process_rss=_process_peak_rss()),
        memory_analysis=buffers,
        device_kind=jax.devices()[0].device_kind,
        num_devices=n_devices,
        mesh=dict(trainer.mesh.shape),
        shapes=dict(global_batch=c_data.global_batch, seq_len=c_data.seq_len,
                    layers=arch.num_layers, embed_dim=arch.embed_dim,
                    vocab_size=arch.vocab_size, dtype=c_model.dtype,
                    param_dtype=c_model.param_dtype, remat=c_model.remat,
                    attention=c_model.attention, loss_chunk=c_model.loss_chunk,
                    lora_rank=r.lora.rank if r.lora else 0, objective=r.objective.kind),
        **({'vs_sft': dict(sft_step_s=statistics.median(timed[1].times),
                           ratio=median / statistics.median(timed[1].times))} if pairs else {}),
        **({'rollout': self.rollouts} if self.rollouts else {}),
    )


def _rollout_batch(r: cfg_lib.Resolved, trainer: trainer_lib.Trainer,
                   batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  rng = np.random.default_rng(r.train.seed)
  scores = rng.integers(0, 2, (r.data.global_batch, len(r.objective.rewards))).astype(np.float32)
  batch = dict(batch, rewards=data.global_rows(scores, trainer.batch_sharding))
  if trainer.rollout_logps is not None:
    batch.update(trainer.rollout_logps(trainer.state.params, trainer.frozen, batch, trainer.ref))
  return batch


def _rollout_bench(r: cfg_lib.Resolved, trainer: trainer_lib.Trainer, steps: int
                   ) -> dict[str, Any]:
  """grpo: a rollout (`rollout.Rollouts.generate`, as training samples it) timed side by side
  (alternating) with `ftjax.generate` on the same prompts, sampling and lengths."""
  o = r.objective
  length = r.data.seq_len - o.max_new_tokens
  rng = np.random.default_rng(r.train.seed)
  ids = [rng.integers(3, r.model.arch.vocab_size, length).tolist()
         for _ in range(o.prompts_per_step)]
  prompts = rollout.Prompts(ids, [{}] * len(ids), ['synthetic'] * len(ids), collections.Counter())
  tok = data.formats.cached_tokenizer(r.data.options.tokenizer)
  rolls = rollout.Rollouts(trainer, prompts, o, seq_len=r.data.seq_len, seed=r.train.seed,
                           tokenizer=tok)
  rows = np.asarray([ids[i] for i in rolls.prompt_indices(0) for _ in range(o.group_size)],
                    np.int32)
  model = nnx.merge(trainer.graphdef, trainer.state.params, trainer.frozen)

  def direct():
    out = np.asarray(generation.generate(
        model, rows, max_new_tokens=o.max_new_tokens, temperature=o.temperature,
        top_k=o.top_k or None, top_p=o.top_p, seed=(r.train.seed * 1_000_003) % (2**31 - 1),
        eos_id=tok.eos_id, pad_id=-1, mesh=trainer.mesh, rules=trainer.rules))
    return int(np.sum(out >= 0))

  times: dict[str, list[float]] = dict(rollout=[], generate=[])
  tokens = {}
  for i in range(steps + 1):  # the first round compiles
    for name, fn in (('rollout', lambda: sum(len(c) for c in rolls.generate(0))),
                     ('generate', direct)):
      start = time.perf_counter()
      tokens[name] = fn()
      if i:
        times[name].append(time.perf_counter() - start)
  rate = {k: tokens[k] / statistics.median(v) for k, v in times.items()}
  return dict(tokens_per_s=rate['rollout'], s=statistics.median(times['rollout']),
              tokens=tokens['rollout'], generate_tokens_per_s=rate['generate'],
              vs_generate=rate['rollout'] / rate['generate'], rows=len(rows),
              prompt_length=length, max_new_tokens=o.max_new_tokens)
