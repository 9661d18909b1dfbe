"""The config schema: every key ftjax knows, with its default and what it means.

`defaults()` is what `configs/base.py` gives users to override; `ftjax.config.resolve` refuses
any key not defined here. Keys are documented in docs/configuration.md.
"""

from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections import config_dict

from ftjax import models

_TYPES = {'int': int, 'float': float, 'bool': bool, 'str': str}


def arch_fields() -> dict[str, type]:
  """Architecture fields of every registered family (each may be set as `model.<field>`)."""
  out: dict[str, type] = {}
  for family in models.FAMILIES.values():
    for field in dataclasses.fields(family.Config):
      out.setdefault(field.name, _TYPES[field.type])
  return out


def defaults() -> ml_collections.ConfigDict:
  """A fresh config with every key at its default (what `configs/base.py` returns)."""
  c = ml_collections.ConfigDict()
  c.model = dict(
      preset='tiny',  # a name in ftjax.models.PRESETS (its family sets the architecture)
      pretrained='',  # a Hugging Face folder: its config.json sets the architecture, its weights
      # the initial parameters (model.preset and architecture overrides are then ignored)
      dtype='float32',  # compute dtype: float32 | bfloat16
      param_dtype='float32',  # storage dtype of the weights
      remat='auto',  # auto | none | dots | offload | full: what a scanned layer keeps for the
      # backward pass: dots on CPU, none on TPU/GPU | everything | matmul outputs | matmul
      # outputs in host memory | only its input
      attention='xla',  # xla | cudnn (GPU flash) | splash (TPU Pallas); falls back to xla
      loss_chunk=512,  # positions per chunk of the LM head + loss (never all [B, T, V] logits)
      # 0 = one chunk; lower it for huge vocabularies, raise it if the head is slow
      scan_unroll=0,  # layers per iteration of the layer scan; >= num_layers unrolls it all
      # (no per-layer slicing and stacking, longer compiles); 0 = auto: unrolled on CPU up to
      # 16 layers, rolled elsewhere (docs/performance.md)
  )
  # Every architecture field of the preset may be overridden; None keeps the preset's value.
  for name, kind in arch_fields().items():
    c.model[name] = config_dict.placeholder(kind)
  c.lora = dict(
      rank=0,  # 0 = full fine-tuning; > 0 trains only low-rank adapters
      alpha=16.0,  # adapter scale alpha / rank (alpha / sqrt(rank) with use_rslora)
      dropout=0.0,
      targets='all-linear',  # 'all-linear' | comma-separated q,k,v,o,gate,up,down | a path regex
      use_rslora=False,
      use_dora=False,
      quantize_base=config_dict.placeholder(str),  # None | 'int8' | 'int4': QLoRA-style frozen base
      adapter='',  # a PEFT LoRA adapter folder to continue training (its settings win)
  )
  c.data = dict(
      path='',  # shorthand for one source: .jsonl(.gz) | .json | .parquet | .array_record | tfds://
      sources=[],  # [{'path': ..., 'weight': 1.0, 'format': 'auto', 'split': ''}, ...]: a mixture
      eval_path='',  # held-out data, same formats; '' = no evaluation
      tokenizer='',  # '' = model.pretrained's, else 'byte' (built in) | tokenizer.json | folder
      chat_template='',  # '' = the tokenizer's (else chatml) | 'chatml' | a Jinja template
      seq_len=512,
      global_batch=8,  # rows per optimizer step, over all hosts
      pack=True,  # pack several documents per row (segment ids keep them apart)
      train_on='assistant',  # assistant (= completion) | all: which tokens count in the loss
      on_bad_record='error',  # error | skip (counted per reason in skipped_records)
      on_too_long='truncate',  # truncate | skip | error
      dedup='none',  # none | exact | near: drop duplicates of an earlier record before training
      drop_contradictions=False,  # drop every record of a prompt with differing answers
      decontaminate=False,  # drop records sharing a 13-gram with data.eval_path/eval.generate_path
      workers=0,  # grain worker processes for tokenizing and packing (0 = in the main process)
      prefetch=2,  # global batches put on the devices ahead of the step that uses them
      tfds_data_dir='',  # where tfds:// datasets were prepared
      max_eval_examples=-1,  # -1 = the whole eval set
  )
  c.objective = dict(
      kind='sft',  # sft | dpo | ipo | simpo | orpo; all but sft read preference pairs
      beta=0.1,  # dpo/ipo/simpo: strength of the preference (ipo: its regularization tau)
      label_smoothing=0.0,  # dpo/simpo: assumed share of flipped labels (conservative DPO)
      gamma=0.5,  # simpo: target reward margin
      lambda_=0.1,  # orpo: weight of the odds-ratio term next to the SFT term on chosen
      precompute_ref=False,  # dpo/ipo: reference log-probs computed once before training and
      # stored with the run, so training holds one model (no reference copy)
      # grpo (online RL; the data are prompts, docs/grpo.md):
      group_size=4,  # completions sampled per prompt (advantages compare them)
      prompts_per_step=8,  # prompts per rollout; a step trains on prompts x group_size rows
      rewards=({'fn': 'exact_match', 'weight': 1.0},),  # ({'fn': exact_match | regex | number |
      # 'module:function', 'weight': w, ...options}, ...); summed with their weights
      epsilon=0.2,  # clip of the policy ratio below 1 (and above, unless epsilon_high is set)
      epsilon_high=0.0,  # DAPO's upper clip (0 = epsilon)
      kl_beta=0.0,  # weight of the k3 KL to the reference (0 = none, no reference kept)
      num_iterations=1,  # optimizer steps per rollout batch (> 1: clipped against old log-probs)
      loss_norm='token',  # token (DAPO/BNPO) | sequence (GRPO) | fixed (Dr. GRPO: rows x max)
      scale_rewards='group',  # group | batch | none (Dr. GRPO: no std division)
      temperature=1.0,  # rollout sampling (the loss scores at the same temperature)
      top_p=1.0,
      top_k=0,  # 0 = all tokens
      max_new_tokens=32,  # per completion; data.seq_len must hold prompt + completion
      # mixtures of experts, any kind (both are logged whatever their weight, docs/moe.md):
      router_aux_loss_coef=0.0,  # load balancing (transformers' router_aux_loss_coef: 0.001)
      router_z_loss_coef=0.0,  # ST-MoE's router z-loss (1e-3 in its paper)
  )
  c.optim = dict(
      lr=1e-4,
      schedule='cosine',  # cosine | linear | constant, after linear warmup
      warmup_steps=100,
      end_lr_ratio=0.1,  # final lr = lr * end_lr_ratio
      weight_decay=0.0,
      decay_embeddings=False,  # norms and biases are never decayed
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      clip_norm=1.0,  # global-norm gradient clipping; 0 = off
      grad_accum=1,  # microbatches per optimizer step
  )
  c.mesh = dict(
      shape=(1, -1, 1),  # (data, fsdp, tensor) or (data, fsdp, expert, tensor); one -1 fills
      rules='fsdp_tp',  # a rule set in ftjax.sharding.RULES
      num_slices=1,  # multi-slice TPU: the data axis spans slices (DCN), the rest stays in ICI
  )
  c.train = dict(
      steps=1000,  # optimizer steps; also the length of the lr schedule
      log_every=10,
      seed=0,
      progress=True,  # progress bar on process 0
      stop_at_step=0,  # > 0: after this step save and exit 75 as a preemption would
      nan_policy='stop',  # non-finite loss/grad norm: stop (nothing saved after it) | skip_step
      wandb_project='',  # '' = no Weights & Biases; else log there too (WANDB_MODE=offline works)
  )
  c.eval = dict(
      every_steps=200,  # a multiple of train.log_every; 0 = only before and after training
      generate_path='',  # JSONL of prompts with references: greedy completions are scored
      max_new_tokens=32,  # per generated completion
      score_fn='exact_match',  # exact_match | 'module:function' (prediction, reference) -> float
      num_samples=3,  # completions logged as text (TensorBoard, metrics.jsonl)
      batch_size=16,  # prompts generated at once
  )
  c.audit = dict(  # `ftjax data audit --strict` fails when a share exceeds its threshold
      max_bad_record_share=0.01,  # records that cannot be parsed or used
      max_duplicate_share=0.05,  # exact duplicates (normalised text) of an earlier record
      max_near_duplicate_share=0.10,  # near duplicates (MinHash, Jaccard >= 0.8)
      max_contradiction_share=0.01,  # records whose prompt has another, different answer
      max_contamination=0.0,  # held-out examples with a 13-gram in the training data
      max_truncated_share=0.05,  # records longer than data.seq_len + 1 (cut or skipped)
  )
  c.ckpt = dict(
      every_steps=500,  # 0 = only by time / at the end
      every_minutes=0.0,  # 0 = only by steps / at the end
      max_to_keep=3,
      keep_period=0,  # > 0: also keep every checkpoint whose step is a multiple of this
      resume='auto',  # auto (latest in workdir) | never | a checkpoints folder or step folder
      async_save=True,  # the loop blocks only for the device-to-host copy
      overwrite=False,  # True: replace the checkpoints and metrics already in the workdir
  )
  return c
