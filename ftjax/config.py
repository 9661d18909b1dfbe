"""`resolve(config) -> Resolved`: the one place a config is checked and turned into frozen, typed
sections that library code takes, and the `resolved` block of a run's config.json read back.

The schema (every key and its default) is `ftjax.schema`; `resolve` checks what its type lock
cannot and fills in what a key implies (the architecture of a pretrained folder, the tokenizer).
"""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Any

import ml_collections

from ftjax import (
    data,
    evals,
    lora,
    models,
    objectives,
    quantize,
    rewards,
    schema,
    tokenizer,
    workdir,
)
from ftjax.errors import CheckpointError, UserError
from ftjax.hf import gguf_file, pretrained
from ftjax.models import layers

DTYPES = pretrained.DTYPES
# model.attention: XLA everywhere; cuDNN flash (GPU) and Pallas splash (TPU) fall back to XLA,
# with a logged message, on other platforms.
ATTENTION = ('xla', 'cudnn', 'splash')


class ConfigError(UserError):
  """A config value is invalid; the message names the key."""


def _frozen(cls):
  return dataclasses.dataclass(frozen=True, kw_only=True)(cls)


@_frozen
class Model:
  arch: Any  # the family's Config
  arch_name: str  # its name in ftjax.models.FAMILIES
  preset: str
  pretrained: str
  dtype: str
  param_dtype: str
  remat: str
  attention: str
  loss_chunk: int
  scan_unroll: int

  def options(self) -> dict[str, Any]:
    """Keyword arguments of the family's `Model` besides the architecture."""
    return dict(dtype=DTYPES[self.dtype], param_dtype=DTYPES[self.param_dtype], remat=self.remat,
                attention_impl=self.attention, scan_unroll=self.scan_unroll)

  def describe(self) -> str:
    return f'{self.arch.family} from {self.pretrained}' if self.pretrained else self.preset


@_frozen
class Mesh:
  shape: tuple[int, ...]
  rules: str
  num_slices: int


@_frozen
class Optim:
  lr: float
  schedule: str
  warmup_steps: int
  end_lr_ratio: float
  weight_decay: float
  decay_embeddings: bool
  b1: float
  b2: float
  eps: float
  clip_norm: float
  grad_accum: int
  steps: int  # train.steps: also the length of the schedule

  def make_kwargs(self) -> dict[str, Any]:
    """Keyword arguments of `ftjax.optim.make`."""
    kw = dataclasses.asdict(self)
    del kw['grad_accum']
    kw['schedule_kind'] = kw.pop('schedule')
    return kw


@_frozen
class Data:
  sources: tuple[data.Source, ...]
  eval_sources: tuple[data.Source, ...]
  options: data.Options
  global_batch: int
  pack: bool
  workers: int
  prefetch: int
  max_eval_examples: int

  @property
  def seq_len(self) -> int:
    return self.options.seq_len


@_frozen
class Audit:
  """`ftjax data audit --strict` thresholds (shares, 0..1)."""

  max_bad_record_share: float = 0.01
  max_duplicate_share: float = 0.05
  max_near_duplicate_share: float = 0.10
  max_contradiction_share: float = 0.01
  max_contamination: float = 0.0
  max_truncated_share: float = 0.05


@_frozen
class Eval:
  every_steps: int
  generate_path: str
  max_new_tokens: int
  score_fn: str
  num_samples: int
  batch_size: int


@_frozen
class Ckpt:
  every_steps: int
  every_minutes: float
  max_to_keep: int
  keep_period: int
  resume: str
  async_save: bool
  overwrite: bool


@_frozen
class Train:
  steps: int
  log_every: int
  seed: int
  progress: bool
  stop_at_step: int
  nan_policy: str
  wandb_project: str

  @property
  def skip_nonfinite(self) -> bool:
    return self.nan_policy == 'skip_step'


@_frozen
class Resolved:
  """A checked config as the library takes it. `config` is the user's config as plain JSON."""

  model: Model
  mesh: Mesh
  optim: Optim
  lora: lora.Options | None  # None = full fine-tuning
  data: Data
  eval: Eval
  ckpt: Ckpt
  train: Train
  objective: objectives.Options = objectives.Options()
  audit: Audit = Audit()
  config: dict[str, Any] = dataclasses.field(compare=False, default_factory=dict)

  def to_json(self) -> dict[str, Any]:
    """The `resolved` block of config.json (`from_json` reads it back)."""
    return {f.name: dataclasses.asdict(getattr(self, f.name)) if getattr(self, f.name) else None
            for f in dataclasses.fields(self) if f.name != 'config'}

  @classmethod
  def from_json(cls, block: dict[str, Any], config: dict[str, Any]) -> Resolved:
    m = dict(block['model'])
    m['arch'] = models.config_from_dict(m['arch_name'], m['arch'])
    d = dict(block['data'])
    d['sources'] = tuple(data.Source(**s) for s in d['sources'])
    d['eval_sources'] = tuple(data.Source(**s) for s in d['eval_sources'])
    d['options'] = data.Options(**{**d['options'], 'decontaminate': tuple(
        d['options'].get('decontaminate', ()))})
    c_lora = block['lora'] and {**block['lora'], 'targets': _targets(block['lora']['targets'])}
    mesh = Mesh(**{**block['mesh'], 'shape': tuple(block['mesh']['shape'])})
    return cls(model=Model(**m), mesh=mesh,
               optim=Optim(**block['optim']), lora=lora.Options(**c_lora) if c_lora else None,
               data=Data(**d), eval=Eval(**block['eval']), ckpt=Ckpt(**block['ckpt']),
               train=Train(**block['train']),
               objective=objectives.Options(**block.get('objective', {})),
               audit=Audit(**block.get('audit', {})), config=config)


def _targets(targets: Any) -> str | tuple[str, ...]:
  return targets if isinstance(targets, str) else tuple(targets)


def _section(cls, c: ml_collections.ConfigDict, **extra: Any):
  names = {f.name for f in dataclasses.fields(cls)} - set(extra)
  return cls(**{n: c[n] for n in names}, **extra)


def resolve(config: ml_collections.ConfigDict, *, check_files: bool = True,
            arch: Any = None) -> Resolved:
  """Checks `config` and unpacks it; raises ConfigError naming the first bad key.

  `check_files=False` skips the data files (bench, plan and a finished run's config do not
  read them); `arch` (a family Config) replaces the architecture a run already resolved.
  """
  _check_keys(config, schema.defaults())
  _check_values(config)
  try:
    objective = objectives.Options(**config.objective)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if objective.rollouts:
    _check_grpo(config, objective)
  c_data = config.data
  sources = (tuple(train_sources(c_data)) if check_files or c_data.path or c_data.sources
             else ())
  held_out = tuple(eval_sources(c_data))
  if check_files:
    _check_files(sources + held_out)
  if arch is None:
    arch = model_config(config.model)
  c = config.model
  model = Model(arch=arch, arch_name=models.arch_of(arch), preset=c.preset,
                pretrained=c.pretrained, dtype=c.dtype, param_dtype=c.param_dtype, remat=c.remat,
                attention=c.attention, loss_chunk=c.loss_chunk, scan_unroll=c.scan_unroll)
  options = data.Options(
      tokenizer=c_data.tokenizer or c.pretrained or tokenizer.BYTE, seq_len=c_data.seq_len,
      train_on=c_data.train_on, chat_template=c_data.chat_template,
      on_bad_record=c_data.on_bad_record, on_too_long=c_data.on_too_long,
      tfds_data_dir=c_data.tfds_data_dir, pairs=objective.pairs, dedup=c_data.dedup,
      drop_contradictions=c_data.drop_contradictions,
      decontaminate=_decontaminate_against(config, held_out))
  return Resolved(
      model=model, mesh=Mesh(shape=tuple(config.mesh.shape), rules=config.mesh.rules,
                             num_slices=config.mesh.num_slices),
      optim=_section(Optim, config.optim, steps=config.train.steps),
      lora=lora_options(config.lora),
      data=Data(sources=sources, eval_sources=held_out, options=options,
                # grpo: a step's rows are its rollouts (prompts x completions per prompt).
                global_batch=(objective.rows_per_step if objective.rollouts
                              else c_data.global_batch),
                # A preference row holds one pair (two segments): pairs are never packed.
                pack=c_data.pack and objective.kind == 'sft', workers=c_data.workers,
                prefetch=c_data.prefetch, max_eval_examples=c_data.max_eval_examples),
      eval=_section(Eval, config.eval), ckpt=_section(Ckpt, config.ckpt),
      train=_section(Train, config.train), objective=objective,
      audit=_section(Audit, config.audit), config=config.to_dict())


def _decontaminate_against(config: ml_collections.ConfigDict,
                           held_out: tuple[data.Source, ...]) -> tuple[str, ...]:
  """The held-out files `data.decontaminate` checks the training records against."""
  if not config.data.decontaminate:
    return ()
  paths = [s.path for s in held_out]
  if config.eval.generate_path and config.eval.generate_path not in paths:
    paths.append(config.eval.generate_path)
  if not paths:
    raise ConfigError('data.decontaminate=True needs held-out data to check against: set '
                      'data.eval_path or eval.generate_path')
  return tuple(paths)


def model_config(model: ml_collections.ConfigDict) -> Any:
  """The architecture: the pretrained folder's, or `model.preset` plus any field set."""
  overrides = {k: v for k, v in model.items() if k in schema.arch_fields()}
  if model.pretrained:
    changed = sorted(k for k, v in overrides.items() if v is not None)
    if changed:
      raise ConfigError(f'model.{changed[0]} cannot be overridden when model.pretrained is set: '
                        'the architecture comes from its config.json')
    try:
      return pretrained.read_config(model.pretrained)
    except CheckpointError as e:
      raise ConfigError(f'model.pretrained: {e}') from None
  try:
    return models.config_from_preset(model.preset, overrides)
  except (KeyError, ValueError) as e:
    raise ConfigError(e.args[0]) from None


def lora_options(c_lora: ml_collections.ConfigDict) -> lora.Options | None:
  """The `lora` section; None for full fine-tuning (rank 0, no adapter)."""
  if not c_lora.rank and not c_lora.adapter:
    return None
  return lora.Options(rank=c_lora.rank, alpha=c_lora.alpha, targets=_targets(c_lora.targets),
                      use_rslora=c_lora.use_rslora, use_dora=c_lora.use_dora,
                      dropout=c_lora.dropout, quantize_base=c_lora.quantize_base,
                      adapter=c_lora.adapter)


def _check_keys(config: ml_collections.ConfigDict, known: ml_collections.ConfigDict,
                prefix: str = '') -> None:
  for key in config:
    if key not in known:
      raise ConfigError(f'config key {prefix + key!r} is not defined in configs/base.py; '
                        f'known keys here: {sorted(known.keys())}')
    if isinstance(known[key], ml_collections.ConfigDict):
      _check_keys(config[key], known[key], f'{prefix}{key}.')


def _check_values(config: ml_collections.ConfigDict) -> None:
  choices = {
      'model.dtype': (config.model.dtype, tuple(DTYPES)),
      'model.param_dtype': (config.model.param_dtype, tuple(DTYPES)),
      'model.remat': (config.model.remat, ('auto', 'none', *layers.REMAT_POLICIES)),
      'model.attention': (config.model.attention, ATTENTION),
      'optim.schedule': (config.optim.schedule, ('cosine', 'linear', 'constant')),
      'data.train_on': (config.data.train_on, ('assistant', 'completion', 'all')),
      'data.on_bad_record': (config.data.on_bad_record, ('error', 'skip')),
      'data.on_too_long': (config.data.on_too_long, ('truncate', 'skip', 'error')),
      'data.dedup': (config.data.dedup, ('none', 'exact', 'near')),
      'train.nan_policy': (config.train.nan_policy, ('stop', 'skip_step')),
  }
  for key, (value, allowed) in choices.items():
    if value not in allowed:
      raise ConfigError(f'{key}={value!r} is not one of {allowed}')
  if not config.optim.lr >= 0:  # also refuses NaN; 0 is how pipelines are checked end to end
    raise ConfigError(f'optim.lr={config.optim.lr} must be >= 0')
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
  if config.model.scan_unroll < 0:
    raise ConfigError(f'model.scan_unroll={config.model.scan_unroll} must be >= 0 (0 = auto)')
  c = config.eval
  if c.every_steps < 0 or (c.every_steps and c.every_steps % config.train.log_every):
    raise ConfigError(f'eval.every_steps={c.every_steps} must be 0 or a multiple of '
                      f'train.log_every={config.train.log_every} (evals are logged with a step)')
  if c.generate_path:
    if not os.path.isfile(c.generate_path):
      raise ConfigError(f'eval.generate_path={c.generate_path!r}: file not found')
    for key in ('max_new_tokens', 'batch_size'):
      if c[key] < 1:
        raise ConfigError(f'eval.{key}={c[key]} must be >= 1')
    try:
      evals.score_function(c.score_fn)
    except ValueError as e:
      raise ConfigError(str(e)) from None
  path = config.model.pretrained
  if path and path.endswith(gguf_file.SUFFIX) and not os.path.isfile(path):
    raise ConfigError(f'model.pretrained={path!r}: GGUF file not found')
  if path and not path.endswith(gguf_file.SUFFIX) and not os.path.isdir(path):
    raise ConfigError(f'model.pretrained={path!r}: folder not found')


def _check_grpo(config: ml_collections.ConfigDict, objective: objectives.Options) -> None:
  if objective.max_new_tokens >= config.data.seq_len:
    raise ConfigError(f'objective.max_new_tokens={objective.max_new_tokens} must be below '
                      f'data.seq_len={config.data.seq_len}: a row holds prompt + completion')
  stop = config.train.stop_at_step
  if stop and stop % objective.num_iterations:
    raise ConfigError(f'train.stop_at_step={stop} must be a multiple of objective.num_iterations='
                      f'{objective.num_iterations} (checkpoints fall between rollouts)')
  try:
    rewards.Scorer.load(objective.reward_specs, objectives.reward_names(objective))
  except ValueError as e:
    raise ConfigError(str(e)) from None


def _check_files(sources: tuple[data.Source, ...]) -> None:
  for source in sources:
    if not source.path.startswith(('tfds://', 'gs://')) and not glob.glob(source.path + '*'):
      raise ConfigError(f'data source {source.path!r}: file not found')


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


def generation_eval(r: Resolved) -> evals.GenerationEval | None:
  """The generation-based eval `eval.generate_path` asks for, prompts tokenized; or None."""
  if not r.eval.generate_path:
    return None
  encoder = data.formats.Encoder(r.data.options.tokenizer, train_on=r.data.options.train_on,
                                 chat_template=r.data.options.chat_template)
  try:
    return evals.GenerationEval.load(
        r.eval.generate_path, encoder, score_fn=r.eval.score_fn,
        max_new_tokens=r.eval.max_new_tokens, batch_size=r.eval.batch_size,
        num_samples=r.eval.num_samples, max_examples=r.data.max_eval_examples)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def run_json(r: Resolved) -> dict[str, Any]:
  """What `ftjax train` writes as config.json: the user's config, the architecture it resolved
  to (`resolved_model`, `resolved_arch`), and every resolved section (`resolved`)."""
  return {**r.config, 'resolved_model': dataclasses.asdict(r.model.arch),
          'resolved_arch': r.model.arch_name, 'resolved': r.to_json()}


def from_run_json(run: dict[str, Any]) -> Resolved:
  """The Resolved a run's config.json holds (`run`: the file's contents).

  Run directories written before the `resolved` block are resolved again from their config,
  with the architecture they recorded.
  """
  config = {k: v for k, v in run.items() if k not in ('resolved', 'resolved_model',
                                                      'resolved_arch')}
  if 'resolved' in run:
    return Resolved.from_json(run['resolved'], config)
  merged = schema.defaults()
  merged.unlock()
  merged.update_from_flattened_dict(workdir.flat(config))
  arch = models.config_from_dict(run.get('resolved_arch', 'llama'), run['resolved_model'])
  return resolve(merged, check_files=False, arch=arch)
