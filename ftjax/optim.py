"""The optax chain: clipping, AdamW with a weight-decay mask, warmup + decay schedule."""

from __future__ import annotations

from typing import Any, Literal

import jax
import optax

Schedule = Literal['cosine', 'linear', 'constant']


def schedule(
    *, lr: float, steps: int, warmup_steps: int, decay: Schedule, end_lr_ratio: float
) -> optax.Schedule:
  """Linear warmup to `lr`, then `decay` to `lr * end_lr_ratio` at `steps`."""
  warmup_steps = min(warmup_steps, steps)
  decay_steps = max(steps - warmup_steps, 1)
  end = lr * end_lr_ratio
  if decay == 'cosine':
    tail = optax.cosine_decay_schedule(lr, decay_steps, alpha=end_lr_ratio)
  elif decay == 'linear':
    tail = optax.linear_schedule(lr, end, decay_steps)
  elif decay == 'constant':
    tail = optax.constant_schedule(lr)
  else:
    raise ValueError(f"optim.schedule={decay!r}; expected 'cosine', 'linear' or 'constant'")
  if warmup_steps == 0:
    return tail
  # Start warmup at lr/warmup (not 0) so the first step already moves the weights.
  warm = optax.linear_schedule(lr / warmup_steps, lr, warmup_steps)
  return optax.join_schedules([warm, tail], [warmup_steps])


def decay_mask(params: Any, *, decay_embeddings: bool) -> Any:
  """True where weight decay applies: matrices, but not norms/biases (nor embeddings by default)."""

  def one(path, x):
    names = [str(getattr(k, 'key', getattr(k, 'name', k))) for k in path]
    if 'embed' in names and not decay_embeddings:
      return False
    if 'magnitude' in names:  # DoRA magnitudes are scales, like norms
      return False
    layered = 'blocks' in names  # stacked layers carry one extra leading axis
    return x.ndim - int(layered) >= 2

  return jax.tree_util.tree_map_with_path(one, params)


def make(
    *,
    lr: float,
    steps: int,
    warmup_steps: int,
    schedule_kind: Schedule,
    end_lr_ratio: float,
    weight_decay: float,
    b1: float,
    b2: float,
    eps: float,
    clip_norm: float,
    decay_embeddings: bool,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer and its learning-rate schedule."""
  lr_fn = schedule(lr=lr, steps=steps, warmup_steps=warmup_steps, decay=schedule_kind,
                   end_lr_ratio=end_lr_ratio)
  parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm > 0 else []
  parts.append(
      optax.adamw(lr_fn, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                  mask=lambda p: decay_mask(p, decay_embeddings=decay_embeddings))
  )
  return optax.chain(*parts), lr_fn
