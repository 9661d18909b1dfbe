"""Config checks and unpacking: the `ml_collections` config -> validated keyword arguments.

`configs/base.py` is the schema (every key ftjax knows); `validate` checks what its type lock
cannot, and the helpers turn config sections into the explicit arguments library code takes.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Any

import ml_collections

from ftjax import data, evals, models, pretrained, quantize, tokenizer, weights
from ftjax.errors import UserError
from ftjax.models import llama

DTYPES = pretrained.DTYPES


class ConfigError(UserError):
  """A config value is invalid; the message names the key."""


# model.attention: XLA everywhere; cuDNN flash (GPU) and Pallas splash (TPU) fall back to XLA,
# with a logged message, on other platforms.
ATTENTION = ('xla', 'cudnn', 'splash')


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


def optim_kwargs(o: ml_collections.ConfigDict, steps: int) -> dict[str, Any]:
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


def validate(config: ml_collections.ConfigDict, need_data: bool = True) -> llama.Config:
  """Checks values the type-locked config cannot; returns the resolved architecture."""
  from configs import base  # the schema: every key ftjax knows

  _check_keys(config, base.get_config())
  choices = {
      'model.dtype': (config.model.dtype, tuple(DTYPES)),
      'model.param_dtype': (config.model.param_dtype, tuple(DTYPES)),
      'model.remat': (config.model.remat, ('none', *llama.REMAT_POLICIES)),
      'model.attention': (config.model.attention, ATTENTION),
      'optim.schedule': (config.optim.schedule, ('cosine', 'linear', 'constant')),
      'data.train_on': (config.data.train_on, ('assistant', 'completion', 'all')),
      'data.on_bad_record': (config.data.on_bad_record, ('error', 'skip')),
      'data.on_too_long': (config.data.on_too_long, ('truncate', 'skip', 'error')),
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
  _validate_eval(config)
  if config.model.pretrained and not os.path.isdir(config.model.pretrained):
    raise ConfigError(f'model.pretrained={config.model.pretrained!r}: folder not found')
  for source in (train_sources(config.data) + eval_sources(config.data)) if need_data else ():
    if not source.path.startswith(('tfds://', 'gs://')) and not glob.glob(source.path + '*'):
      raise ConfigError(f'data source {source.path!r}: file not found')
  return model_config(config.model)


def _validate_eval(config: ml_collections.ConfigDict) -> None:
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


def generation_eval(config: ml_collections.ConfigDict) -> evals.GenerationEval | None:
  """The generation-based eval `eval.generate_path` asks for, prompts tokenized; or None."""
  c = config.eval
  if not c.generate_path:
    return None
  encoder = data.formats.Encoder(tokenizer_spec(config), train_on=config.data.train_on,
                                 chat_template=config.data.chat_template)
  try:
    return evals.GenerationEval.load(
        c.generate_path, encoder, score_fn=c.score_fn, max_new_tokens=c.max_new_tokens,
        batch_size=c.batch_size, num_samples=c.num_samples,
        max_examples=config.data.max_eval_examples)
  except ValueError as e:
    raise ConfigError(str(e)) from None


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
