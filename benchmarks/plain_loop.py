"""A plain, single-file JAX training step for the benchmark shape (`configs/bench_llama.py`): the
reference ftjax's full fine-tuning step is measured against (the framework should cost nothing).

It is what a careful user would write by hand: parameters in a dict, a Python loop over the
layers, 2-D matmuls, causal attention with grouped-query heads, full logits and a log-softmax
cross entropy, `optax.adamw`, one `jax.jit` with the state donated. No sharding, no packing, no
chunked loss, no scan: one device.

`python benchmarks/plain_loop.py` times ftjax's full step and this one alternately (call by
call, in one process, after both have compiled and warmed up) and prints a JSON summary:
both medians, their ratio, each step's model FLOP/s against the measured matmul peak.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import bench_llama

SHAPE = bench_llama.SHAPE


def init_params(key: jax.Array, s: dict) -> dict:
  d, h, k, hd, f, v = (s['embed_dim'], s['num_heads'], s['num_kv_heads'], s['head_dim'],
                       s['mlp_dim'], s['vocab_size'])
  keys = iter(jax.random.split(key, 2 + 7 * s['num_layers']))

  def w(*shape):
    return 0.02 * jax.random.normal(next(keys), shape, jnp.float32)

  layers = [dict(attn_norm=jnp.ones(d), q=w(d, h * hd), k=w(d, k * hd), v=w(d, k * hd),
                 o=w(h * hd, d), mlp_norm=jnp.ones(d), gate=w(d, f), up=w(d, f), down=w(f, d))
            for _ in range(s['num_layers'])]
  return dict(embed=w(v, d), layers=layers, final_norm=jnp.ones(d), lm_head=w(d, v))


def rms_norm(x, scale, eps=1e-5):
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale.reshape(
      (1,) * (x.ndim - 1) + (-1,))


def rope(x, positions, theta):
  half = x.shape[-1] // 2
  inv = 1.0 / theta ** (jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions[..., None].astype(jnp.float32) * inv[None, None]  # [B, T, half]
  sin, cos = jnp.sin(angles)[:, :, None], jnp.cos(angles)[:, :, None]
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def loss_fn(params: dict, tokens: jax.Array, targets: jax.Array, s: dict) -> jax.Array:
  b, t = tokens.shape
  h, kv, hd = s['num_heads'], s['num_kv_heads'], s['head_dim']
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  causal = jnp.tril(jnp.ones((1, 1, 1, t, t), bool))
  x = params['embed'][tokens]
  for p in params['layers']:
    y = rms_norm(x, p['attn_norm']).reshape(b * t, -1)
    q = rope((y @ p['q']).reshape(b, t, h, hd), positions, s['rope_theta'])
    k = rope((y @ p['k']).reshape(b, t, kv, hd), positions, s['rope_theta'])
    v = (y @ p['v']).reshape(b, t, kv, hd)
    q = q.reshape(b, t, kv, h // kv, hd)
    scores = jnp.einsum('btkgd,bskd->bkgts', q, k) / math.sqrt(hd)
    scores = jnp.where(causal, scores, -1e30)
    attn = jnp.einsum('bkgts,bskd->btkgd', jax.nn.softmax(scores, axis=-1), v)
    x = x + (attn.reshape(b * t, h * hd) @ p['o']).reshape(b, t, -1)
    y = rms_norm(x, p['mlp_norm']).reshape(b * t, -1)
    x = x + ((jax.nn.silu(y @ p['gate']) * (y @ p['up'])) @ p['down']).reshape(b, t, -1)
  logits = rms_norm(x, params['final_norm']).reshape(b * t, -1) @ params['lm_head']
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, targets.reshape(-1, 1), axis=-1))


def make_step(s: dict, optimizer: optax.GradientTransformation):
  def step(params, opt_state, tokens, targets):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens, targets, s)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


class Plain:
  """The plain step with its own state; `once()` times one call, as `ftjax.bench` does."""

  def __init__(self, s: dict, batch: int, seq_len: int, lr: float = 1e-4):
    self.params = init_params(jax.random.key(0), s)
    optimizer = optax.adamw(lr, weight_decay=0.0)
    self.opt_state = optimizer.init(self.params)
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, s['vocab_size'], (batch, seq_len + 1), dtype=np.int32)
    self.tokens, self.targets = jnp.asarray(tokens[:, :-1]), jnp.asarray(tokens[:, 1:])
    start = time.perf_counter()
    self.step = make_step(s, optimizer).lower(
        self.params, self.opt_state, self.tokens, self.targets).compile()
    self.compile_s = time.perf_counter() - start
    self.times: list[float] = []

  def once(self, record: bool) -> None:
    start = time.perf_counter()
    self.params, self.opt_state, loss = self.step(self.params, self.opt_state, self.tokens,
                                                  self.targets)
    jax.block_until_ready((self.params, loss))
    if record:
      self.times.append(time.perf_counter() - start)


def main() -> None:
  import lora_vs_full

  from ftjax import bench

  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--seq_len', type=int, default=256)
  p.add_argument('--batch', type=int, default=4)
  p.add_argument('--steps', type=int, default=8)
  p.add_argument('--set', action='append', default=[], help='section.key=value (ftjax step)')
  args = p.parse_args()
  plain = Plain(SHAPE, args.batch, args.seq_len)
  out = bench.side_by_side({'ftjax': lora_vs_full.config(args, lora=False)}, steps=args.steps,
                           others={'plain': plain})
  tokens = args.batch * args.seq_len
  ftjax_s = out['ftjax']['step_s']['median']
  plain_s = statistics.median(plain.times)
  flops = out['ftjax']['model_tflops_per_step'] * 1e12
  peak = out['ftjax']['peak']
  print(json.dumps(dict(
      ftjax_tokens_per_s=tokens / ftjax_s, plain_tokens_per_s=tokens / plain_s,
      ftjax_vs_plain=plain_s / ftjax_s,
      ftjax_fraction_of_peak=flops / ftjax_s / peak['flops_per_s'],
      plain_fraction_of_peak=flops / plain_s / peak['flops_per_s'],
      peak_gflops=peak['flops_per_s'] / 1e9, peak_spread=peak.get('spread'),
      steps=args.steps, shape=dict(SHAPE, seq_len=args.seq_len, batch=args.batch),
      overrides=args.set)))


if __name__ == '__main__':
  main()
