"""`ftjax export`: a run's checkpoint as a Hugging Face model folder or a PEFT adapter folder."""

from __future__ import annotations

import os

import jax
from flax import nnx

from ftjax import build, lora, tokenizer, weights

FORMATS = ('hf', 'peft')


def export(workdir: str, out_dir: str, *, fmt: str = 'hf', dtype: str = 'bfloat16',
           step: int | None = None) -> str:
  """Writes the run in `workdir` (its latest or `step` checkpoint); returns `out_dir`.

  `hf`: a full model folder (a LoRA run's adapters merged into the base). `peft`: only the
  adapters, as `adapter_config.json` + `adapter_model.safetensors` for `peft.PeftModel`. The
  model is rebuilt exactly as the run built it (same base, same adapters), restored straight
  into a fully sharded layout, and gathered one tensor at a time.
  """
  if fmt not in FORMATS:
    raise ValueError(f'--format={fmt!r}; expected one of {FORMATS}')
  run = build.read_run(workdir)
  lora_options = build.run_lora_options(run)
  if fmt == 'peft' and lora_options is None:
    raise ValueError(f'{workdir} is a full fine-tuning run (lora.rank=0): export it with '
                     '--format hf')
  module = build.from_run(workdir, run, step=step)
  base = run['model']['pretrained']
  if fmt == 'peft':
    lora.save_peft(module, out_dir, base_model=base)
    return out_dir
  if lora_options:
    lora.merge(module)
  source = build.run_tokenizer(run)
  folder = source if os.path.isdir(source) else None
  weights.save(nnx.state(module, nnx.Param), module.cfg, out_dir, dtype=dtype, tokenizer_dir=folder)
  if folder is None and jax.process_index() == 0:
    tokenizer.load(source).save(out_dir)
  return out_dir
