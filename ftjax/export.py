"""`ftjax export`: a run's checkpoint as a Hugging Face model folder or a PEFT adapter folder.

An export never destroys its inputs and never leaves a half-written folder: it refuses an `--out`
that holds (or is) the run, its base model, adapter or tokenizer, refuses a non-empty `--out`
without `overwrite`, writes into a temporary sibling folder and renames it into place last.
"""

from __future__ import annotations

import os
import shutil

import jax
from flax import nnx

from ftjax import config as config_lib
from ftjax import lora, models, peft_io, tokenizer, trained
from ftjax.errors import UserError
from ftjax.hf import gguf_file, weights

FORMATS = ('hf', 'peft', 'gguf')
# --dtype spellings: Hugging Face names, and llama.cpp's for --format gguf (q8_0 only there).
_GGUF_DTYPE = {'float32': 'f32', 'float16': 'f16', 'bfloat16': 'bf16'}


class ExportError(UserError):
  """An export that would overwrite or destroy something; the message says what."""


def _within(path: str, folder: str) -> bool:
  return os.path.commonpath([path, folder]) == folder


_INPUTS = {'model.pretrained': "the run's base model folder",
           'lora.adapter': "the run's PEFT adapter folder",
           'data.tokenizer': "the run's tokenizer folder"}


def inputs_of(r: config_lib.Resolved) -> dict[str, str]:
  """The folders a run reads, by config key (what an export must never replace)."""
  return {'model.pretrained': r.model.pretrained, 'lora.adapter': r.lora.adapter if r.lora else '',
          'data.tokenizer': r.data.options.tokenizer}


def check_out(workdir: str, out_dir: str, inputs: dict[str, str], *, overwrite: bool) -> None:
  """Raises `ExportError` unless writing the export of a run (`inputs`: `inputs_of`) to
  `out_dir` is safe.

  Paths are compared as real paths (symlinks resolved). The run's inputs are refused even with
  `overwrite`: replacing a folder that is or holds one of them would delete what the export
  reads. Folders inside the run directory are fine, except under its checkpoints (Orbax owns
  that folder and may delete what it does not recognise).
  """
  out = os.path.realpath(out_dir)
  named = [('the run directory', '--workdir', workdir),
           *((_INPUTS[key], key, path) for key, path in inputs.items())]
  for what, key, path in named:
    if not path or not os.path.exists(path):  # e.g. no adapter, or the byte tokenizer
      continue
    real = os.path.realpath(path)
    if _within(real, out):
      verb = 'is' if real == out else 'contains'
      raise ExportError(f'--out={out_dir} {verb} {what} ({key}={path}); choose another folder '
                        '(--overwrite never replaces an input of the run)')
  checkpoints = os.path.realpath(os.path.join(workdir, 'checkpoints'))
  if _within(out, checkpoints):
    raise ExportError(f'--out={out_dir} is inside the run\'s checkpoints ({checkpoints}); '
                      'choose another folder')
  if os.path.lexists(out_dir) and not overwrite and (
      not os.path.isdir(out_dir) or os.listdir(out_dir)):
    raise ExportError(f'--out={out_dir} is not empty; pass --overwrite to replace it')


def base_dtype(r: config_lib.Resolved) -> str:
  """The dtype of the weights a run started from: its Hugging Face folder's `torch_dtype`, float32
  for a (dequantized) GGUF, or `model.param_dtype` for a randomly initialised model."""
  if not r.model.pretrained:
    return r.model.param_dtype
  hf = weights.open_checkpoint(r.model.pretrained).hf_config
  dtype = hf.get('torch_dtype') or hf.get('dtype') or 'float32'
  return dtype if dtype in weights.SAVE_DTYPES else 'float32'


def export(workdir: str, out_dir: str, *, fmt: str = 'hf', dtype: str | None = None,
           step: int | None = None, overwrite: bool = False) -> str:
  """Writes the run in `workdir` (its latest or `step` checkpoint); returns `out_dir`.

  `hf`: a full model folder (a LoRA run's adapters merged into the base). `peft`: only the
  adapters, as `adapter_config.json` + `adapter_model.safetensors` for `peft.PeftModel`. The
  weights are written in `dtype` (default: `base_dtype`, what the run started from). The
  model is rebuilt exactly as the run built it (same base, same adapters), restored straight
  into a fully sharded layout, and gathered one tensor at a time. Every process calls this
  (the gathers are collective); process 0 writes. `overwrite` replaces a non-empty `out_dir`,
  and only once the new folder is complete. Raises `ExportError` (see `check_out`).
  """
  if fmt not in FORMATS:
    raise ValueError(f'--format={fmt!r}; expected one of {FORMATS}')
  r = trained.read_run(workdir)
  if fmt == 'peft' and r.lora is None:
    raise ValueError(f'{workdir} is a full fine-tuning run (lora.rank=0): export it with '
                     '--format hf')
  check_out(workdir, out_dir, inputs_of(r), overwrite=overwrite)
  # With a symlinked --out, the folder it points to is replaced, not the link.
  final = os.path.realpath(out_dir)
  # A sibling, so the closing rename stays on one filesystem (atomic). Only process 0 writes
  # files, so the name need not agree across processes.
  partial = f'{final}.partial-{os.getpid()}'
  writer = jax.process_index() == 0
  if writer:
    shutil.rmtree(partial, ignore_errors=True)  # a crashed export's leftovers with our pid
  try:
    _write(workdir, r, partial, fmt=fmt, dtype=_dtype(fmt, dtype or base_dtype(r)), step=step)
  except BaseException:
    if writer:
      shutil.rmtree(partial, ignore_errors=True)
    raise
  if writer:
    _replace(partial, final)
  return out_dir


def _dtype(fmt: str, dtype: str) -> str:
  if fmt == 'gguf':
    return _GGUF_DTYPE.get(dtype, dtype)
  if dtype not in weights.SAVE_DTYPES:
    raise ValueError(f'--dtype={dtype!r} is for --format gguf; --format {fmt} writes one of '
                     f'{list(weights.SAVE_DTYPES)}')
  return dtype


def _write(workdir: str, r: config_lib.Resolved, out_dir: str, *, fmt: str, dtype: str,
           step: int | None) -> None:
  module = trained.from_run(workdir, r, step=step)
  base = r.model.pretrained
  if fmt == 'gguf':
    if r.lora is not None:
      lora.merge(module)
    _write_gguf(module, r, out_dir, dtype)
    return
  if fmt == 'peft':
    peft_io.save(module, out_dir, base_model=base)
    return
  if r.lora is not None:
    lora.merge(module)
  source = r.data.options.tokenizer
  folder = source if os.path.isdir(source) else None
  weights.save(nnx.state(module, nnx.Param), module.cfg, out_dir, dtype=dtype, tokenizer_dir=folder)
  if folder is None and jax.process_index() == 0:
    tokenizer.load(source).save(out_dir)


def _write_gguf(module: nnx.Module, r: config_lib.Resolved, path: str, dtype: str) -> None:
  cfg = module.cfg
  params = nnx.state(module, nnx.Param)
  tensors = weights.gathered(params, cfg)
  if jax.process_index() != 0:
    for _ in tensors:  # the gathers are collective
      pass
    return
  base = r.model.pretrained
  context = (weights.open_checkpoint(base).hf_config.get('max_position_embeddings')
             if base else None)
  hf = models.family_of(cfg).config_to_hf(cfg, 'float32')
  gguf_file.write(weights.layout(params, cfg), tensors, cfg, hf, path, dtype=dtype,
                  tok=tokenizer.load(r.data.options.tokenizer), context_length=context)


def _replace(partial: str, final: str) -> None:
  """Moves the finished `partial` folder to `final`; an old `final` goes only after that."""
  if not os.path.lexists(final):
    os.rename(partial, final)
    return
  # rename(2) replaces only an empty directory, so the old folder steps aside first.
  old = f'{final}.old-{os.getpid()}'
  os.rename(final, old)
  try:
    os.rename(partial, final)
  except BaseException:
    os.rename(old, final)
    raise
  if os.path.isdir(old) and not os.path.islink(old):
    shutil.rmtree(old)
  else:
    os.remove(old)
