"""`ftjax export`: a run's checkpoint as a Hugging Face model folder or a PEFT adapter folder."""

from __future__ import annotations

import json
import os

import jax
from flax import nnx

from ftjax import build, checkpoint, lora, pretrained, sharding, tokenizer, weights
from ftjax.models import llama

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
  with open(os.path.join(workdir, 'config.json')) as f:
    run = json.load(f)
  cfg = llama.Config(**run['resolved_model'])
  mesh = sharding.make_mesh((1, -1, 1))
  rules = sharding.get_rules(run['mesh']['rules'])
  c_lora = run['lora']
  lora_options = (dict(rank=c_lora['rank'], alpha=c_lora['alpha'], targets=c_lora['targets'],
                       use_rslora=c_lora['use_rslora'], use_dora=c_lora['use_dora'],
                       adapter=c_lora.get('adapter', ''))  # merged into the unquantized base
                  if c_lora['rank'] or c_lora.get('adapter') else None)
  if fmt == 'peft' and lora_options is None:
    raise ValueError(f'{workdir} is a full fine-tuning run (lora.rank=0): export it with '
                     '--format hf')
  base = run['model']['pretrained']
  module, trainable = build.model(
      cfg, model_options=dict(param_dtype=pretrained.DTYPES[run['model']['param_dtype']]),
      mesh=mesh, rules=rules, seed=run['train']['seed'], pretrained_path=base,
      lora_options=lora_options)
  current = nnx.state(module, trainable)
  shardings = jax.tree.map(lambda x: x.sharding, current)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), current)
  nnx.update(module, checkpoint.restore_params(workdir, abstract, shardings, step))
  if fmt == 'peft':
    lora.save_peft(module, out_dir, base_model=base)
    return out_dir
  if lora_options:
    lora.merge(module)
  source = run['data']['tokenizer'] or base or tokenizer.BYTE
  folder = source if os.path.isdir(source) else None
  weights.save(nnx.state(module, nnx.Param), cfg, out_dir, dtype=dtype, tokenizer_dir=folder)
  if folder is None and jax.process_index() == 0:
    tokenizer.load(source).save(out_dir)
  return out_dir
