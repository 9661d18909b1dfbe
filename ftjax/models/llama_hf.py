"""The Llama family's Hugging Face form: config.json <-> `llama.Config` fields, and its tensor map.

Ten checkpoint types share the Llama block structure (llama, mistral, qwen2, qwen3, gemma,
gemma2, gemma3_text, and the mixtures of experts qwen3_moe, qwen2_moe and mixtral); what
differs between them is read from, and written back to, config.json here. `tensor_map` says
which Hugging Face tensor each ftjax parameter is, and how it is laid out.
"""

from __future__ import annotations

from typing import Any

from ftjax.errors import CheckpointError
from ftjax.hf.tensors import Tensor

MODEL_TYPES = ('llama', 'mistral', 'qwen2', 'qwen3', 'gemma', 'gemma2', 'gemma3_text',
               'qwen3_moe', 'qwen2_moe', 'mixtral')
MOE_TYPES = ('qwen3_moe', 'qwen2_moe', 'mixtral')


def _rope(hf: dict[str, Any], kind: str | None = None) -> dict[str, Any]:
  """Rope settings from either the 5.x `rope_parameters` or the 4.x `rope_theta/rope_scaling`."""
  params = hf.get('rope_parameters')
  if params and kind and kind in params:
    params = params[kind]
  if params is None:
    params = dict(hf.get('rope_scaling') or {}, rope_theta=hf.get('rope_theta', 10_000.0))
  rope_type = params.get('rope_type', params.get('type')) or 'default'
  out: dict[str, Any] = dict(theta=float(params.get('rope_theta', hf.get('rope_theta', 1e4))))
  if rope_type == 'llama3':
    out.update(scaling_factor=float(params['factor']),
               low_freq_factor=float(params['low_freq_factor']),
               high_freq_factor=float(params['high_freq_factor']),
               original_max_len=int(params['original_max_position_embeddings']))
  elif rope_type == 'linear':
    out.update(linear_factor=float(params['factor']))
  elif rope_type != 'default':
    raise CheckpointError(f"config.json: rope_type {rope_type!r} is not supported "
                          "(supported: default, linear, llama3)")
  return out


def _global_every(hf: dict[str, Any], default: int) -> int:
  """The sliding/global pattern as 'every N-th layer is global', checked against layer_types."""
  layer_types = hf.get('layer_types')
  if not layer_types:
    return int(hf.get('sliding_window_pattern') or default)
  is_global = [t == 'full_attention' for t in layer_types]
  unknown = sorted({t for t in layer_types} - {'full_attention', 'sliding_attention'})
  if unknown:
    raise CheckpointError(f'config.json: layer_types {unknown} are not supported')
  for every in [0, *range(1, len(layer_types) + 1)]:
    if is_global == [bool(every) and (i + 1) % every == 0 for i in range(len(layer_types))]:
      return every
  raise CheckpointError('config.json: layer_types is not a repeating sliding/global pattern '
                        f'ftjax supports: {layer_types}')


def fields_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
  """`Config` fields for a Hugging Face `config.json` dict; refuses what it cannot match."""
  family = hf.get('model_type')
  if family not in MODEL_TYPES:
    raise CheckpointError(f'config.json: model_type {family!r} is not one of {MODEL_TYPES}')
  gemma = family.startswith('gemma')
  activation = hf.get('hidden_activation') or hf.get('hidden_act') or 'silu'
  act = {'silu': 'silu', 'gelu_pytorch_tanh': 'gelu_tanh', 'gelu': 'gelu_tanh'}.get(activation)
  if act is None or (activation == 'gelu' and not gemma):
    raise CheckpointError(f'config.json: activation {activation!r} is not supported')
  changes_the_math = {
      'mlp_bias': False, 'use_bidirectional_attention': False, 'use_sliding_window': False,
      'attention_bias': family == 'qwen2', 'pretraining_tp': 1, 'partial_rotary_factor': 1.0,
  }
  if family not in ('gemma2', 'gemma3_text'):
    changes_the_math.update(attn_logit_softcapping=None, final_logit_softcapping=None)
  # Qwen2 always has q/k/v biases (transformers ignores its attention_bias); Llama's
  # attention_bias puts biases on q, k, v and o alike. Mistral has no such option.
  if family in ('qwen2', 'llama'):
    del changes_the_math['attention_bias']
  if family in ('qwen3_moe', 'qwen2_moe'):
    # Dense layers between sparse ones (decoder_sparse_step > 1, mlp_only_layers) are not built.
    changes_the_math.update(decoder_sparse_step=1)
    if hf.get('mlp_only_layers'):
      raise CheckpointError(f"config.json: mlp_only_layers={hf['mlp_only_layers']} (dense MLP "
                            'layers in a mixture of experts) is not supported by ftjax')
  llama_bias = family == 'llama' and bool(hf.get('attention_bias'))
  for key, expected in changes_the_math.items():
    value = hf.get(key)
    if value not in (None, expected) and not (key == 'use_sliding_window' and not value):
      raise CheckpointError(f'config.json: {key}={value!r} is not supported by ftjax '
                            f'(expected {expected!r}); refusing to compute wrong logits')
  heads = hf['num_attention_heads']
  fields: dict[str, Any] = dict(
      family=family,
      vocab_size=hf['vocab_size'], embed_dim=hf['hidden_size'],
      num_layers=hf['num_hidden_layers'], num_heads=heads,
      num_kv_heads=hf.get('num_key_value_heads') or heads,
      head_dim=hf.get('head_dim') or hf['hidden_size'] // heads,
      mlp_dim=hf['intermediate_size'],
      norm_eps=float(hf.get('rms_norm_eps', 1e-6)),
      tie_embeddings=bool(hf.get('tie_word_embeddings', gemma)),
      init_std=float(hf.get('initializer_range', 0.02)),
      mlp_activation=act,
      qkv_bias=(family == 'qwen2' or llama_bias
                or (family == 'qwen2_moe' and bool(hf.get('qkv_bias', True)))),
      o_bias=llama_bias,
      qk_norm=family in ('qwen3', 'gemma3_text', 'qwen3_moe'),
      norm_plus_one=gemma, embed_scale=gemma,
      post_norms=family in ('gemma2', 'gemma3_text'),
      attn_softcap=float(hf.get('attn_logit_softcapping') or 0.0),
      final_softcap=float(hf.get('final_logit_softcapping') or 0.0),
      query_scale=float(hf.get('query_pre_attn_scalar') or 0.0),
  )
  if family in MOE_TYPES:
    qwen = family != 'mixtral'
    fields.update(
        num_experts=int(hf.get('num_experts') or hf['num_local_experts']),
        num_experts_per_tok=int(hf['num_experts_per_tok']),
        moe_mlp_dim=int(hf['moe_intermediate_size'] if qwen else hf['intermediate_size']),
        norm_topk_prob=bool(hf.get('norm_topk_prob', False)) if qwen else True)
  if family == 'qwen2_moe':
    fields['shared_expert_dim'] = int(hf['shared_expert_intermediate_size'])
  rope_kind = 'full_attention' if family == 'gemma3_text' else None
  rope = _rope(hf, rope_kind)
  fields.update({f'rope_{k}' if k != 'theta' else 'rope_theta': v for k, v in rope.items()
                 if k not in ('scaling_factor', 'linear_factor', 'original_max_len')})
  fields.update(rope_scaling_factor=rope.get('scaling_factor', 1.0),
                rope_linear_factor=rope.get('linear_factor', 1.0))
  if 'original_max_len' in rope:
    fields['rope_original_max_len'] = rope['original_max_len']
  window = hf.get('sliding_window') or 0
  if family in ('qwen2', 'qwen3', 'llama', 'qwen3_moe', 'qwen2_moe'):
    window = 0  # only used with use_sliding_window, refused above
  if window:
    fields['sliding_window'] = int(window)
    fields['global_every'] = _global_every(hf, {'gemma2': 2, 'gemma3_text': 6}.get(family, 0))
  if family == 'gemma3_text':
    local = _rope(hf, 'sliding_attention') if 'rope_parameters' in hf else dict(
        theta=float(hf.get('rope_local_base_freq', 10_000.0)))
    fields['rope_local_theta'] = local['theta']
  return fields


def config_to_hf(cfg: Any, dtype: str) -> dict[str, Any]:
  """A `config.json` dict that `transformers` reads back into the same architecture."""
  gemma = cfg.family.startswith('gemma')
  # Llama's attention_bias biases q, k, v and o alike; no other family has an o bias.
  if cfg.o_bias != (cfg.family == 'llama' and cfg.qkv_bias):
    raise ValueError(f'family={cfg.family!r} with qkv_bias={cfg.qkv_bias}, o_bias={cfg.o_bias} '
                     'has no Hugging Face form: only llama has an output-projection bias, and '
                     'only together with q/k/v biases (attention_bias)')
  arch = {'llama': 'LlamaForCausalLM', 'mistral': 'MistralForCausalLM',
          'qwen2': 'Qwen2ForCausalLM', 'qwen3': 'Qwen3ForCausalLM', 'gemma': 'GemmaForCausalLM',
          'gemma2': 'Gemma2ForCausalLM', 'gemma3_text': 'Gemma3ForCausalLM',
          'qwen3_moe': 'Qwen3MoeForCausalLM', 'qwen2_moe': 'Qwen2MoeForCausalLM',
          'mixtral': 'MixtralForCausalLM'}[cfg.family]
  if bool(cfg.num_experts) != (cfg.family in MOE_TYPES):
    raise ValueError(f'family={cfg.family!r} with num_experts={cfg.num_experts} has no Hugging '
                     f'Face form: only {", ".join(MOE_TYPES)} are mixtures of experts')
  if bool(cfg.shared_expert_dim) != (cfg.family == 'qwen2_moe'):
    raise ValueError(f'family={cfg.family!r} with shared_expert_dim={cfg.shared_expert_dim} has '
                     'no Hugging Face form: qwen2_moe, and only it, has a shared expert')
  if cfg.family == 'mixtral' and not cfg.norm_topk_prob:
    raise ValueError('mixtral always renormalises its top-k router weights (norm_topk_prob)')
  rope: dict[str, Any] = {'rope_type': 'default', 'rope_theta': cfg.rope_theta}
  if cfg.rope_scaling_factor != 1.0:
    rope = {'rope_type': 'llama3', 'rope_theta': cfg.rope_theta,
            'factor': cfg.rope_scaling_factor, 'low_freq_factor': cfg.rope_low_freq_factor,
            'high_freq_factor': cfg.rope_high_freq_factor,
            'original_max_position_embeddings': cfg.rope_original_max_len}
  elif cfg.rope_linear_factor != 1.0:
    rope = {'rope_type': 'linear', 'rope_theta': cfg.rope_theta, 'factor': cfg.rope_linear_factor}
  hf: dict[str, Any] = {
      'architectures': [arch], 'model_type': cfg.family, 'vocab_size': cfg.vocab_size,
      'hidden_size': cfg.embed_dim, 'num_hidden_layers': cfg.num_layers,
      'num_attention_heads': cfg.num_heads, 'num_key_value_heads': cfg.num_kv_heads,
      'head_dim': cfg.head_dim, 'intermediate_size': cfg.mlp_dim, 'rms_norm_eps': cfg.norm_eps,
      'tie_word_embeddings': cfg.tie_embeddings, 'initializer_range': cfg.init_std,
      'dtype': dtype, 'rope_parameters': rope,
      # The 4.x keys too, for readers (older transformers, vLLM) that predate rope_parameters.
      'rope_theta': cfg.rope_theta, 'torch_dtype': dtype,
      ('hidden_activation' if gemma else 'hidden_act'):
          {'silu': 'silu', 'gelu_tanh': 'gelu_pytorch_tanh'}[cfg.mlp_activation],
  }
  if rope['rope_type'] != 'default' and cfg.family != 'gemma3_text':
    hf['rope_scaling'] = {k: v for k, v in rope.items() if k != 'rope_theta'}
  if cfg.family == 'gemma3_text':
    hf['rope_local_base_freq'] = cfg.rope_local_theta or cfg.rope_theta
    if rope['rope_type'] != 'default':
      hf['rope_scaling'] = {k: v for k, v in rope.items() if k != 'rope_theta'}
  if cfg.family == 'llama':
    hf['attention_bias'] = cfg.o_bias
  if cfg.family == 'qwen2':
    hf['use_sliding_window'] = False
  if cfg.family in ('mistral', 'mixtral'):
    hf['sliding_window'] = cfg.sliding_window or None
  if cfg.num_experts:
    hf.update(num_experts_per_tok=cfg.num_experts_per_tok)
  if cfg.family in ('qwen3_moe', 'qwen2_moe'):
    hf.update(num_experts=cfg.num_experts, moe_intermediate_size=cfg.moe_mlp_dim,
              norm_topk_prob=cfg.norm_topk_prob, decoder_sparse_step=1, mlp_only_layers=[],
              use_sliding_window=False)
  if cfg.family == 'qwen2_moe':
    hf.update(shared_expert_intermediate_size=cfg.shared_expert_dim, qkv_bias=cfg.qkv_bias)
  if cfg.family == 'mixtral':
    hf.update(num_local_experts=cfg.num_experts, intermediate_size=cfg.moe_mlp_dim)
  if cfg.family in ('gemma2', 'gemma3_text'):
    scalar = cfg.query_scale or cfg.head_dim
    hf.update(sliding_window=cfg.sliding_window,
              query_pre_attn_scalar=int(scalar) if float(scalar).is_integer() else scalar,
              attn_logit_softcapping=cfg.attn_softcap or None,
              final_logit_softcapping=cfg.final_softcap or None,
              layer_types=['full_attention' if cfg.is_global(i) else 'sliding_attention'
                           for i in range(cfg.num_layers)])
  if cfg.family == 'gemma3_text':
    hf['rope_parameters'] = {'full_attention': rope, 'sliding_attention': {
        'rope_type': 'default', 'rope_theta': cfg.rope_local_theta or cfg.rope_theta}}
  return hf


def tensor_map(cfg: Any) -> dict[tuple[str, ...], Tensor]:
  """ftjax parameter path -> HF tensor, for the parameters `cfg` creates."""
  layer = 'model.layers.{i}.'
  m = {
      ('embed',): Tensor('model.embed_tokens.weight', 'same'),
      ('final_norm', 'scale'): Tensor('model.norm.weight', 'same'),
      ('blocks', 'attn_norm', 'scale'): Tensor(layer + 'input_layernorm.weight', 'same'),
      ('blocks', 'attn', 'o', 'w'): Tensor(layer + 'self_attn.o_proj.weight', 'out_heads'),
  }
  if cfg.o_bias:
    m[('blocks', 'attn', 'o_bias')] = Tensor(layer + 'self_attn.o_proj.bias', 'same')
  for name in 'qkv':
    m[('blocks', 'attn', name, 'w')] = Tensor(layer + f'self_attn.{name}_proj.weight', 'in_heads')
    if cfg.qkv_bias:
      m[('blocks', 'attn', f'{name}_bias')] = Tensor(layer + f'self_attn.{name}_proj.bias',
                                                     'bias_heads')
  if cfg.qk_norm:
    for name in 'qk':
      m[('blocks', 'attn', f'{name}_norm', 'scale')] = Tensor(
          layer + f'self_attn.{name}_norm.weight', 'same')
  if cfg.family == 'mixtral':  # '{e}': the expert, a second stacked axis
    moe, experts = layer + 'block_sparse_moe.', dict(gate='w1', up='w3', down='w2')
  else:
    moe, experts = layer + 'mlp.', dict(gate='gate_proj', up='up_proj', down='down_proj')
  for name in ('gate', 'up', 'down'):
    if cfg.num_experts:
      m[('blocks', 'mlp', name, 'w')] = Tensor(
          moe + f'experts.{{e}}.{experts[name]}.weight', 'transpose')
    else:
      m[('blocks', 'mlp', name, 'w')] = Tensor(layer + f'mlp.{name}_proj.weight', 'transpose')
  if cfg.num_experts:
    m[('blocks', 'mlp', 'router')] = Tensor(moe + 'gate.weight', 'transpose')
  if cfg.shared_expert_dim:  # Qwen2-MoE
    for name in ('gate', 'up', 'down'):
      m[('blocks', 'mlp', 'shared', name, 'w')] = Tensor(
          moe + f'shared_expert.{name}_proj.weight', 'transpose')
    m[('blocks', 'mlp', 'shared_gate')] = Tensor(moe + 'shared_expert_gate.weight', 'transpose')
  if cfg.post_norms:
    m[('blocks', 'attn_post_norm', 'scale')] = Tensor(layer + 'post_attention_layernorm.weight',
                                                       'same')
    m[('blocks', 'mlp_norm', 'scale')] = Tensor(layer + 'pre_feedforward_layernorm.weight', 'same')
    m[('blocks', 'mlp_post_norm', 'scale')] = Tensor(layer + 'post_feedforward_layernorm.weight',
                                                      'same')
  else:
    m[('blocks', 'mlp_norm', 'scale')] = Tensor(layer + 'post_attention_layernorm.weight', 'same')
  if not cfg.tie_embeddings:
    m[('lm_head', 'w')] = Tensor('lm_head.weight', 'transpose')
  return m
