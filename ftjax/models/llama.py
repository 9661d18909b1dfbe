"""Llama-family decoders: Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, Qwen3, Gemma 1/2/3, and the
mixtures of experts Qwen3-MoE, Qwen2-MoE and Mixtral (their MLP is `moe.MoeMlp`).

These families share one block structure; `Config` flags switch on what differs (q/k/v and
output biases, q/k norm, sliding-window layers, Gemma's (1+w) norms, GeGLU, embedding scaling,
pre/post norms, logit soft-capping, dual rope bases).

Letters: B batch, T length, D embed, F mlp, N heads, K kv heads, H head dim, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from ftjax import sharding
from ftjax.models import attention, layers, llama_hf, moe

ACTIVATIONS = {'silu': jax.nn.silu, 'gelu_tanh': functools.partial(jax.nn.gelu, approximate=True)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
  """Architecture of a Llama-family model (weights-shaping fields only)."""

  vocab_size: int
  embed_dim: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float = 500_000.0
  rope_scaling_factor: float = 1.0  # 1.0 = no scaling; Llama 3.1/3.2 use 8 / 32
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  norm_eps: float = 1e-5
  tie_embeddings: bool = False
  init_std: float = 0.02
  family: str = 'llama'  # the Hugging Face model_type this architecture exports as
  qkv_bias: bool = False  # Qwen2; Llama with attention_bias (together with o_bias)
  o_bias: bool = False  # Llama with attention_bias: a bias on the output projection
  qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over head_dim on q and k
  norm_plus_one: bool = False  # Gemma: norms scale by (1 + w)
  mlp_activation: str = 'silu'  # silu (SwiGLU) | gelu_tanh (GeGLU)
  embed_scale: bool = False  # Gemma: embeddings times sqrt(embed_dim)
  post_norms: bool = False  # Gemma 2/3: extra norms after attention and after the MLP
  attn_softcap: float = 0.0  # Gemma 2: tanh soft-capping of attention logits; 0 = off
  final_softcap: float = 0.0  # Gemma 2: soft-capping of output logits; 0 = off
  query_scale: float = 0.0  # attention scale is query_scale ** -0.5; 0 = head_dim
  sliding_window: int = 0  # attend to the last N positions; 0 = full attention everywhere
  global_every: int = 0  # with sliding_window: every N-th layer is global; 0 = none is
  rope_local_theta: float = 0.0  # Gemma 3: rope base of sliding layers; 0 = rope_theta
  rope_linear_factor: float = 1.0  # linear rope scaling (positions / factor) of global layers
  # Mixture of experts (Qwen3-MoE, Qwen2-MoE, Mixtral): every layer's MLP is `num_experts`
  # SwiGLU experts of width `moe_mlp_dim`, `num_experts_per_tok` per token; 0 = a dense MLP of
  # `mlp_dim`.
  num_experts: int = 0
  num_experts_per_tok: int = 2
  moe_mlp_dim: int = 0
  norm_topk_prob: bool = True  # renormalise the top-k router probabilities (Mixtral: always)
  # Qwen2-MoE: one more SwiGLU expert of this width that every token goes through, scaled by a
  # sigmoid gate of its own; 0 = none.
  shared_expert_dim: int = 0

  def is_global(self, layer: int) -> bool:
    """Whether `layer` attends to the whole context (else to `sliding_window` positions)."""
    if not self.sliding_window:
      return True
    return bool(self.global_every) and (layer + 1) % self.global_every == 0

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f'num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}'
      )
    if self.head_dim % 2:
      raise ValueError(f'head_dim={self.head_dim} must be even for rotary embeddings')
    if self.num_experts and not (0 < self.num_experts_per_tok <= self.num_experts
                                 and self.moe_mlp_dim > 0 and self.mlp_activation == 'silu'):
      raise ValueError(f'num_experts={self.num_experts}: needs 0 < num_experts_per_tok='
                       f'{self.num_experts_per_tok} <= num_experts, moe_mlp_dim='
                       f'{self.moe_mlp_dim} > 0 and SwiGLU experts')
    if self.shared_expert_dim and not self.num_experts:
      raise ValueError(f'shared_expert_dim={self.shared_expert_dim} needs num_experts > 0')
    if self.mlp_activation not in ACTIVATIONS:
      raise ValueError(
          f'mlp_activation={self.mlp_activation!r}; expected one of {list(ACTIVATIONS)}')

  def rope(self, is_global: bool = True) -> layers.Rope:
    if not is_global:
      return layers.Rope(theta=self.rope_local_theta or self.rope_theta)
    return layers.Rope(
        theta=self.rope_theta,
        scaling_factor=self.rope_scaling_factor,
        low_freq_factor=self.rope_low_freq_factor,
        high_freq_factor=self.rope_high_freq_factor,
        original_max_len=self.rope_original_max_len,
        linear_factor=self.rope_linear_factor,
    )


_LLAMA3_ROPE = dict(rope_theta=500_000.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                    rope_original_max_len=8192)

PRESETS = {
    'tiny': Config(vocab_size=512, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=16, mlp_dim=128, rope_theta=10_000.0),
    'llama3p2_1b': Config(vocab_size=128_256, embed_dim=2048, num_layers=16, num_heads=32,
                          num_kv_heads=8, head_dim=64, mlp_dim=8192, tie_embeddings=True,
                          rope_scaling_factor=32.0, **_LLAMA3_ROPE),
    'llama3p2_3b': Config(vocab_size=128_256, embed_dim=3072, num_layers=28, num_heads=24,
                          num_kv_heads=8, head_dim=128, mlp_dim=8192, tie_embeddings=True,
                          rope_scaling_factor=32.0, **_LLAMA3_ROPE),
    'llama3p1_8b': Config(vocab_size=128_256, embed_dim=4096, num_layers=32, num_heads=32,
                          num_kv_heads=8, head_dim=128, mlp_dim=14_336,
                          rope_scaling_factor=8.0, **_LLAMA3_ROPE),
    # Mixtures of experts, as their Hugging Face config.json describes them.
    'qwen3_30b_a3b': Config(vocab_size=151_936, embed_dim=2048, num_layers=48, num_heads=32,
                            num_kv_heads=4, head_dim=128, mlp_dim=6144, rope_theta=1_000_000.0,
                            norm_eps=1e-6, family='qwen3_moe', qk_norm=True, num_experts=128,
                            num_experts_per_tok=8, moe_mlp_dim=768, norm_topk_prob=True),
    'mixtral_8x7b': Config(vocab_size=32_000, embed_dim=4096, num_layers=32, num_heads=32,
                           num_kv_heads=8, head_dim=128, mlp_dim=14_336, rope_theta=1_000_000.0,
                           family='mixtral', num_experts=8, num_experts_per_tok=2,
                           moe_mlp_dim=14_336),
    'llama3p1_70b': Config(vocab_size=128_256, embed_dim=8192, num_layers=80, num_heads=64,
                           num_kv_heads=8, head_dim=128, mlp_dim=28_672,
                           rope_scaling_factor=8.0, **_LLAMA3_ROPE),
}


class Mlp(nnx.Module):
  """Gated MLP: SwiGLU (Llama, Mistral, Qwen) or GeGLU (Gemma)."""

  def __init__(self, cfg: Config, *, rngs: nnx.Rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, init_std=cfg.init_std, dtype=dtype, param_dtype=param_dtype)
    d, f = cfg.embed_dim, cfg.mlp_dim
    self.gate = layers.Einsum('BTD,DF->BTF', (d, f), ('embed', 'mlp'), **kw)
    self.up = layers.Einsum('BTD,DF->BTF', (d, f), ('embed', 'mlp'), **kw)
    self.down = layers.Einsum('BTF,FD->BTD', (f, d), ('mlp', 'embed'), **kw)
    self.activation = cfg.mlp_activation

  def __call__(self, x: Float[Array, 'B T D'], key=None) -> Float[Array, 'B T D']:
    keys = attention.split_keys(key, 3)
    hidden = ACTIVATIONS[self.activation](self.gate(x, key=keys[0])) * self.up(x, key=keys[1])
    return self.down(hidden, key=keys[2])


class Block(nnx.Module):

  def __init__(self, cfg: Config, *, rngs: nnx.Rngs, dtype, param_dtype, attention_impl):
    norm = dict(eps=cfg.norm_eps, rngs=rngs, plus_one=cfg.norm_plus_one, param_dtype=param_dtype)
    self.attn_norm = layers.RMSNorm(cfg.embed_dim, **norm)
    self.attn = attention.Attention(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                          implementation=attention_impl)
    self.mlp_norm = layers.RMSNorm(cfg.embed_dim, **norm)
    mlp = moe.MoeMlp if cfg.num_experts else Mlp
    self.mlp = mlp(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    if cfg.post_norms:
      self.attn_post_norm = layers.RMSNorm(cfg.embed_dim, **norm)
      self.mlp_post_norm = layers.RMSNorm(cfg.embed_dim, **norm)
    self.post_norms = cfg.post_norms

  def __call__(self, x: Float[Array, 'B T D'], rope, positions, segment_ids, window,
               key=None) -> Float[Array, 'B T D']:
    """The block's output and, for a mixture of experts, its router statistics (else None)."""
    keys = attention.split_keys(key, 2)
    y = self.attn(self.attn_norm(x), rope, positions, segment_ids, window, key=keys[0])
    x = x + (self.attn_post_norm(y) if self.post_norms else y)
    if isinstance(self.mlp, moe.MoeMlp):  # padding (segment 0) is left out of the statistics
      y, router = self.mlp.routed(self.mlp_norm(x), segment_ids != 0)
    else:
      y, router = self.mlp(self.mlp_norm(x), key=keys[1]), None
    x = x + (self.mlp_post_norm(y) if self.post_norms else y)
    return sharding.constrain(x, ('batch', 'seq', 'embed')), router

  def decode(self, x: Float[Array, 'B T D'], rope, positions, key_positions, window, k_cache,
             v_cache, start, prefill=False):
    """The block on new tokens with a KV cache (see `Attention.decode`)."""
    y, k_cache, v_cache = self.attn.decode(self.attn_norm(x), rope, positions, key_positions,
                                           window, k_cache, v_cache, start, prefill)
    x = x + (self.attn_post_norm(y) if self.post_norms else y)
    y = self.mlp(self.mlp_norm(x))
    x = x + (self.mlp_post_norm(y) if self.post_norms else y)
    return sharding.constrain(x, ('batch', 'seq', 'embed')), k_cache, v_cache


AUTO_UNROLL_LAYERS = 16  # scan_unroll=0 unrolls up to this many layers on CPU (compile time)


class Llama(nnx.Module):
  """Decoder with its layers stacked on a leading 'layers' axis and run by scan."""

  def __init__(
      self,
      cfg: Config,
      *,
      rngs: nnx.Rngs,
      dtype: jnp.dtype = jnp.float32,
      param_dtype: jnp.dtype = jnp.float32,
      remat: layers.RematPolicy = 'none',
      attention_impl: str | None = None,
      scan_unroll: int = 0,
  ):
    if remat not in ('auto', 'none', *layers.REMAT_POLICIES):
      raise ValueError(f"remat={remat!r}; expected one of 'auto', 'none', "
                       f"{', '.join(layers.REMAT_POLICIES)}")
    self.cfg = cfg
    self.dtype = dtype
    self.remat = remat
    self.scan_unroll = scan_unroll  # layers per iteration of the layer scan; 0 = `_unroll()`
    self.embed = layers.param(rngs, jax.nn.initializers.normal(cfg.init_std),
                              (cfg.vocab_size, cfg.embed_dim), ('vocab', 'embed'), param_dtype)

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
    def make_blocks(rngs: nnx.Rngs) -> Block:
      return Block(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                   attention_impl=attention_impl)

    self.blocks = make_blocks(rngs)
    self.final_norm = layers.RMSNorm(cfg.embed_dim, eps=cfg.norm_eps, rngs=rngs,
                                     plus_one=cfg.norm_plus_one, param_dtype=param_dtype)
    if not cfg.tie_embeddings:
      self.lm_head = layers.Einsum('BTD,DV->BTV', (cfg.embed_dim, cfg.vocab_size),
                                   ('embed', 'vocab'), rngs=rngs, init_std=cfg.init_std,
                                   dtype=dtype, param_dtype=param_dtype)

  def __call__(
      self,
      tokens: Int[Array, 'B T'],
      positions: Int[Array, 'B T'] | None = None,
      segment_ids: Int[Array, 'B T'] | None = None,
      *,
      dropout_key: jax.Array | None = None,
  ) -> Float[Array, 'B T V']:
    """Logits for every position. Packed rows pass per-segment positions and segment ids.

    `dropout_key` turns on dropout in layers that have it (LoRA adapters); None = inference.
    """
    return self.logits(self.hidden(tokens, positions, segment_ids, dropout_key=dropout_key))

  def hidden(
      self,
      tokens: Int[Array, 'B T'],
      positions: Int[Array, 'B T'] | None = None,
      segment_ids: Int[Array, 'B T'] | None = None,
      *,
      dropout_key: jax.Array | None = None,
  ) -> Float[Array, 'B T D']:
    """Final-norm hidden states: everything but the LM head (which a chunked loss applies)."""
    return self.hidden_and_aux(tokens, positions, segment_ids, dropout_key=dropout_key)[0]

  def hidden_and_aux(
      self,
      tokens: Int[Array, 'B T'],
      positions: Int[Array, 'B T'] | None = None,
      segment_ids: Int[Array, 'B T'] | None = None,
      *,
      dropout_key: jax.Array | None = None,
  ) -> tuple[Float[Array, 'B T D'], dict[str, jax.Array]]:
    """`hidden` and the model's auxiliary losses: a mixture of experts' `moe.router_losses`
    over all layers and unpadded tokens; none (`{}`) for a dense model."""
    cfg = self.cfg
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    if segment_ids is None:
      segment_ids = jnp.ones_like(tokens)
    is_global = np.array([cfg.is_global(i) for i in range(cfg.num_layers)])
    layer_rope = self._layer_rope(positions, is_global.all(), tokens.shape[1] + 1)
    x = self._embed(tokens)

    def layer(block: Block, x, layer_is_global, layer_key):
      rope, window = layer_rope(layer_is_global)
      key = None if dropout_key is None else layer_key
      return block(x, rope, positions, segment_ids, window, key=key)

    remat = layers.resolve_remat(self.remat)
    unroll = self._unroll(remat)
    if remat != 'none':
      # A rolled scan keeps XLA from merging the recomputation back into the forward pass; an
      # unrolled one does not, so there the recomputation needs its barrier (without it remat
      # was a no-op: the same temporaries as 'none').
      layer = nnx.remat(layer, policy=layers.REMAT_POLICIES[remat], prevent_cse=unroll > 1)
    layer_keys = jax.random.split(
        jax.random.key(0) if dropout_key is None else dropout_key, cfg.num_layers)
    x, router = nnx.scan(layer, in_axes=(0, nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0),
                         unroll=unroll,
                         transform_metadata={nnx.PARTITION_NAME: 'layers'})(
                             self.blocks, x, jnp.asarray(is_global), layer_keys)
    return self.final_norm(x), ({} if router is None else moe.router_losses(router))

  def _unroll(self, remat: str) -> int:
    """Layers per iteration of the training scan. `scan_unroll=0` (auto): on CPU, when every
    activation is kept (`remat='none'`), all of them up to `AUTO_UNROLL_LAYERS` (a rolled loop
    stacks the activations it saves into zero-filled buffers and writes the weight gradients
    the same way, which cost full fine-tuning about 15% there; docs/performance.md); else a
    rolled loop, which compiles each layer once (with remat it was the faster one on CPU, and
    TPU and GPU compilers run it without that cost)."""
    n = self.cfg.num_layers
    if self.scan_unroll:
      return min(self.scan_unroll, n)
    return n if (sharding.platform() == 'cpu' and remat == 'none'
                 and n <= AUTO_UNROLL_LAYERS) else 1

  def _layer_rope(self, positions: Int[Array, 'B T'], all_global: bool, global_window: int):
    """`layer_is_global -> (rope sin/cos, window)` for one scanned layer."""
    cfg = self.cfg
    global_rope = cfg.rope(True).sin_cos(positions, cfg.head_dim)
    if all_global:
      return lambda layer_is_global: (global_rope, None)
    local_rope = cfg.rope(False).sin_cos(positions, cfg.head_dim)
    if not any(cfg.is_global(i) for i in range(cfg.num_layers)):  # Mistral: one static window
      return lambda layer_is_global: (local_rope, cfg.sliding_window)

    def select(layer_is_global):
      rope = jax.tree.map(lambda g, l: jnp.where(layer_is_global, g, l), global_rope, local_rope)
      return rope, jnp.where(layer_is_global, global_window, cfg.sliding_window)

    return select

  def _embed(self, tokens: Int[Array, 'B T']) -> Float[Array, 'B T D']:
    # Gather from a table replicated along vocab: XLA cannot partition a gather whose
    # operand is split on the gathered axis without replicating it first.
    lookup = sharding.constrain(self.embed.get_value(), (None, 'embed'))
    x = jnp.take(lookup, tokens, axis=0).astype(self.dtype)
    if self.cfg.embed_scale:
      x = x * jnp.asarray(self.cfg.embed_dim**0.5, dtype=self.dtype)
    return sharding.constrain(x, ('batch', 'seq', 'embed'))

  def _head(self, x: Float[Array, 'B T D']) -> Float[Array, 'B T V']:
    """Final norm, then logits."""
    return self.logits(self.final_norm(x))

  def logits(self, x: Float[Array, 'B T D']) -> Float[Array, 'B T V']:
    """The LM head over final-norm hidden states (tied or not, soft-capped if the family does)."""
    cfg = self.cfg
    if cfg.tie_embeddings:
      logits = layers.project('BTD,VD->BTV', x, self.embed.get_value().astype(self.dtype))
    else:
      logits = self.lm_head(x)
    if cfg.final_softcap:
      logits = cfg.final_softcap * jnp.tanh(logits / cfg.final_softcap)
    return sharding.constrain(logits, ('batch', 'seq', 'vocab'))

  def decode(self, tokens: Int[Array, 'B T'], positions: Int[Array, 'B T'],
             cache: attention.KVCache,
             start: jax.Array | int, *, prefill: bool = False,
             last: jax.Array | None = None) -> tuple[Float[Array, 'B T V'], attention.KVCache]:
    """Logits of `tokens` written at cache slots `start..start+T-1`, and the updated cache.

    Prefill passes the whole (padded) prompt at `start=0` with `prefill=True`, decoding one
    token per call after it. `positions` are rope positions; -1 marks a padding token, whose
    slot stays empty so no later query attends to it. Any padding layout works (left, right,
    between). `last` (a column per row): only that position's logits, `[B, 1, V]`.
    """
    cfg = self.cfg
    start = jnp.asarray(start, jnp.int32)
    key_positions = jax.lax.dynamic_update_slice_in_dim(
        cache.positions, positions.astype(cache.positions.dtype), start, axis=1)
    is_global = np.array([cfg.is_global(i) for i in range(cfg.num_layers)])
    layer_rope = self._layer_rope(positions, is_global.all(), cache.k.shape[2] + 1)

    def layer(block: Block, x, k_cache, v_cache, layer_is_global):
      rope, window = layer_rope(layer_is_global)
      x, k_cache, v_cache = block.decode(x, rope, positions, key_positions, window, k_cache,
                                         v_cache, start, prefill)
      return x, (k_cache, v_cache)

    x, (k, v) = nnx.scan(layer, in_axes=(0, nnx.Carry, 0, 0, 0), out_axes=(nnx.Carry, 0),
                         transform_metadata={nnx.PARTITION_NAME: 'layers'})(
                             self.blocks, self._embed(tokens), cache.k, cache.v,
                             jnp.asarray(is_global))
    if last is not None:
      x = jnp.take_along_axis(x, last[:, None, None], axis=1)
    return self._head(x), attention.KVCache(k=k, v=v, positions=key_positions)


# ---------------------------------------------------------------- the family's registry entry
# What `ftjax.models` reads from every family module (see docs/adding_a_model.md).

Model = Llama
KVCache = attention.KVCache
# Short names users write in `lora.targets` -> module paths in `Model`.
LORA_TARGETS = {'q': 'attn.q', 'k': 'attn.k', 'v': 'attn.v', 'o': 'attn.o',
                'gate': 'mlp.gate', 'up': 'mlp.up', 'down': 'mlp.down',
                # Qwen2-MoE's shared expert (the routed experts are gate, up, down)
                'shared_gate': 'mlp.shared.gate', 'shared_up': 'mlp.shared.up',
                'shared_down': 'mlp.shared.down'}
# Module path -> the Hugging Face module name in a PEFT adapter (layer prefix added by peft_io).
PEFT_MODULES = {'attn.q': 'self_attn.q_proj', 'attn.k': 'self_attn.k_proj',
                'attn.v': 'self_attn.v_proj', 'attn.o': 'self_attn.o_proj',
                'mlp.gate': 'mlp.gate_proj', 'mlp.up': 'mlp.up_proj', 'mlp.down': 'mlp.down_proj',
                'mlp.shared.gate': 'mlp.shared_expert.gate_proj',
                'mlp.shared.up': 'mlp.shared_expert.up_proj',
                'mlp.shared.down': 'mlp.shared_expert.down_proj'}
HF_MODEL_TYPES = llama_hf.MODEL_TYPES
config_to_hf = llama_hf.config_to_hf
hf_tensors = llama_hf.tensor_map


def config_from_hf(hf: dict) -> Config:
  """The architecture of a Hugging Face config.json dict of one of `HF_MODEL_TYPES`."""
  return Config(**llama_hf.fields_from_hf(hf))
