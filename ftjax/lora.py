"""LoRA adapters (plain, rsLoRA, DoRA) by module surgery, and merging them back for export.

`apply` swaps every `Einsum` whose path matches `targets` for a `LoRAEinsum` holding the frozen
base weight plus trainable `nnx.LoRAParam`s `a` and `b` (`b` starts at zero, so the model's
outputs are unchanged at step 0). Adapters take their logical axis names from the base kernel
(`(*in, 'lora')` and `('lora', *out)`, plus the stacked `'layers'` axis), so they shard with it.
Full and LoRA fine-tuning share one training path; only the trainable filter differs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ftjax import quantize, sharding
from ftjax.models import layers, moe


@dataclasses.dataclass(frozen=True, kw_only=True)
class Options:
  """The one schema of LoRA settings: the `lora` config section, a run's config.json, and a
  PEFT adapter folder's adapter_config.json all become this."""

  rank: int
  alpha: float = 16.0
  targets: str | tuple[str, ...] = 'all-linear'  # 'all-linear' | short names | a path regex
  use_rslora: bool = False
  use_dora: bool = False
  dropout: float = 0.0
  quantize_base: str | None = None  # None | 'int8' | 'int4': a frozen, quantized base
  adapter: str = ''  # a PEFT adapter folder to start from (its settings win over the above)

  def fresh(self) -> Options:
    """The same adapters, freshly initialised (no PEFT folder): same shapes when ranks agree."""
    return dataclasses.replace(self, adapter='')


def _targets_of(model: nnx.Module) -> dict[str, str]:
  from ftjax import models

  return models.family_of(model.cfg).LORA_TARGETS


def target_regex(targets: str | list[str] | tuple[str, ...], modules: dict[str, str]) -> str:
  """'all-linear', a list of short names (`modules`: the family's LORA_TARGETS), or a regex."""
  if targets == 'all-linear':
    targets = list(modules)
  if isinstance(targets, str) and re.fullmatch(r'\w+(,\w+)*', targets):
    targets = targets.split(',')
  if isinstance(targets, (list, tuple)):
    unknown = [t for t in targets if t not in modules]
    if unknown:
      raise ValueError(f'lora.targets: unknown modules {unknown}; choose from {list(modules)} '
                       "or 'all-linear', or give a regex over module paths")
    return r'(' + '|'.join(re.escape(modules[t]) for t in targets) + r')$'
  return targets


_ADAPTERS_OFF = [False]


@contextlib.contextmanager
def adapters_off():
  """While tracing inside this, every `LoRAEinsum` computes its frozen base alone: the base
  model, from the same weights (the preference objectives' reference), with no second copy."""
  _ADAPTERS_OFF.append(True)
  try:
    yield
  finally:
    _ADAPTERS_OFF.pop()


class LoRAEinsum(nnx.Module):
  """`base(x) + scale * (x a) b`, or DoRA's magnitude-normalised version of the same."""

  def __init__(self, base: layers.Einsum, *, rank: int, alpha: float, use_rslora: bool,
               use_dora: bool, rngs: nnx.Rngs, dropout: float = 0.0):
    x, w, out = layers.split_eqn(base.eqn)
    quantized = not isinstance(base, layers.Einsum)  # a quantize.QuantizedEinsum (QLoRA)
    kernel = base.q if quantized else base.w
    names = tuple(kernel.get_metadata().get('out_sharding') or (None,) * kernel.ndim)
    stacked = kernel.ndim == len(w) + 1  # a leading 'layers' axis from the scanned blocks
    lead_shape, lead_names = (kernel.shape[:1], names[:1]) if stacked else ((), ())
    w_shape, w_names = kernel.shape[len(lead_shape):], names[len(lead_names):]
    contracted = [i for i, c in enumerate(w) if c in x]
    kept = [i for i, c in enumerate(w) if c not in x]
    self.base = base
    self.rank, self.alpha, self.use_rslora, self.use_dora = rank, alpha, use_rslora, use_dora
    self.dropout = dropout
    self.scale = alpha / (rank**0.5 if use_rslora else rank)
    self.in_letters = ''.join(w[i] for i in contracted)
    self.out_letters = ''.join(w[i] for i in kept)
    self.x_letters, self.w_letters, self.y_letters = x, w, out
    dtype = jnp.float32 if quantized else kernel.get_value().dtype
    a_shape = (*lead_shape, *(w_shape[i] for i in contracted), rank)
    a_names = (*lead_names, *(w_names[i] for i in contracted), 'lora')
    b_shape = (*lead_shape, rank, *(w_shape[i] for i in kept))
    b_names = (*lead_names, 'lora', *(w_names[i] for i in kept))
    fan_in = math.prod(w_shape[i] for i in contracted)
    # As PEFT: a ~ Kaiming-uniform (a=sqrt(5)) i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)); b = 0.
    bound = 1.0 / fan_in**0.5
    self.a = nnx.LoRAParam(jax.random.uniform(rngs.params(), a_shape, dtype, -bound, bound),
                           out_sharding=a_names, eager_sharding=False)
    self.b = nnx.LoRAParam(jnp.zeros(b_shape, dtype), out_sharding=b_names,
                           eager_sharding=False)
    if use_dora:
      self.magnitude = nnx.LoRAParam(
          self._column_norm(self._base_weight()).astype(dtype),
          out_sharding=(*lead_names, *(w_names[i] for i in kept)), eager_sharding=False)

  def _base_weight(self) -> jax.Array:
    """The frozen base weight in float32 (dequantized for a quantized base)."""
    return self.base.weight()

  def _input_axes(self, ndim: int) -> tuple[int, ...]:
    """Axes of a (possibly layer-stacked) weight that the input contracts with."""
    # Weight dims are ordered as in the equation; contracted letters may not come first.
    lead = ndim - len(self.w_letters)
    return tuple(lead + i for i, c in enumerate(self.w_letters) if c in self.in_letters)

  def _column_norm(self, weight: jax.Array) -> jax.Array:
    """L2 norm over the input (contracted) dims, per output feature."""
    return jnp.sqrt(jnp.sum(jnp.square(weight), axis=self._input_axes(weight.ndim)))

  def delta(self) -> jax.Array:
    """scale * a b in the base weight's layout (dims ordered as the equation's weight)."""
    lead = 'L' if self.a.ndim > len(self.in_letters) + 1 else ''
    ab = jnp.einsum(f'{lead}{self.in_letters}R,{lead}R{self.out_letters}->{lead}{self.w_letters}',
                    self.a.get_value().astype(jnp.float32),
                    self.b.get_value().astype(jnp.float32))
    return self.scale * ab

  def merged_weight(self) -> jax.Array:
    """The plain weight equal to this adapted layer (for export), in float32."""
    weight = self._base_weight() + self.delta()
    if not self.use_dora:
      return weight
    factor = self.magnitude.get_value().astype(jnp.float32) / self._column_norm(weight)
    return weight * jnp.expand_dims(factor, self._input_axes(weight.ndim))

  def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
    if _ADAPTERS_OFF[-1]:
      return self.base(x.astype(self.base.dtype))
    dtype = self.base.dtype
    x = x.astype(dtype)
    if key is not None and self.dropout > 0:
      # Dropout on the adapter's input only (as PEFT); the frozen path sees the clean input.
      keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
      x_lora = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(dtype)
    else:
      x_lora = x
    if self.use_dora:
      # DoRA: magnitude * (W + s a b) / ||W + s a b||, the norm treated as a constant in the
      # backward pass (as in the paper and PEFT).
      weight = self._base_weight() + self.delta()
      norm = jax.lax.stop_gradient(self._column_norm(weight))
      factor = (self.magnitude.get_value().astype(jnp.float32) / norm).astype(dtype)
      if x_lora is x:
        y = layers.project(self.base.eqn, x, weight.astype(dtype))
      else:  # as PEFT: the base on the clean input, the adapter on the dropped-out one
        y = (layers.project(self.base.eqn, x, self._base_weight().astype(dtype))
             + layers.project(self.base.eqn, x_lora, self.delta().astype(dtype)))
      return y * factor.reshape((1,) * (y.ndim - factor.ndim) + factor.shape)
    a, b = self.a.get_value().astype(dtype), self.b.get_value().astype(dtype)
    spec = _Spec(self.base.eqn, self.in_letters, self.out_letters, self.scale)
    # The frozen weight and the adapter in one projection (`_adapted`), in float32 only: in
    # bfloat16 the merged weight `w + s a b` would round away an update far smaller than `w`,
    # which the two-branch form keeps at the precision of its own output.
    if x_lora is x and dtype == jnp.float32:
      return _adapted(spec, x, jax.lax.stop_gradient(self._base_weight()), a, b)
    rest = spec.rest
    xa = layers.project(f'{self.x_letters},{self.in_letters}R->{rest}R', x_lora, a)
    return self.base(x) + self.scale * layers.project(
        f'{rest}R,R{self.out_letters}->{self.y_letters}', xa, b)


@dataclasses.dataclass(frozen=True)
class _Spec:
  """What `_adapted` needs to know of a projection, static under jit."""

  eqn: str  # the base projection's, e.g. 'BTD,DNH->BTNH'
  in_letters: str  # the weight's contracted axes ('D')
  out_letters: str  # its kept axes ('NH')
  scale: float

  @property
  def rest(self) -> str:  # the input's axes that are not contracted ('BT')
    return ''.join(c for c in layers.split_eqn(self.eqn)[0] if c not in self.in_letters)

  def merged(self, w: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """`w + scale * a b` in `w`'s layout (a rank-r product, weight-sized)."""
    ab = jnp.einsum(f'{self.in_letters}R,R{self.out_letters}->{layers.split_eqn(self.eqn)[1]}',
                    a, b)
    return w + (self.scale * ab).astype(w.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _adapted(spec: _Spec, x: jax.Array, w: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
  """`x w + scale (x a) b` for a frozen `w`, as one projection through `w + scale a b`.

  Autodiff of the two-branch form reads every activation of the adapter's branch once more
  in the backward pass: the rank-r products `(x a) b` and `dy b^T a^T` each stream a full
  `[tokens, features]` array and add it to the base's. Merging the rank-r update into the
  weight (weight-sized, tokens/r times smaller) makes the forward and the input gradient one
  matmul each, as the frozen model's, and leaves the adapter two thin products for `a` and
  `b`'s gradients. The same values as the two-branch form; `w` gets no gradient (frozen).
  """
  return layers.project(spec.eqn, x, spec.merged(w, a, b))


def _adapted_fwd(spec, x, w, a, b):
  xs, _, _ = layers.split_eqn(spec.eqn)
  xa = layers.project(f'{xs},{spec.in_letters}R->{spec.rest}R', x, a)
  return layers.project(spec.eqn, x, spec.merged(w, a, b)), (x, w, a, b, xa)


def _adapted_bwd(spec, res, dy):
  x, w, a, b, xa = res
  xs, _, ys = layers.split_eqn(spec.eqn)
  rest = spec.rest
  # dx = dy (w + s a b)^T, the merged weight recomputed (weight-sized) rather than kept.
  _, vjp_x = jax.vjp(lambda x: layers.project(spec.eqn, x, spec.merged(w, a, b)), x)
  (dx,) = vjp_x(dy)
  g = spec.scale * layers.project(f'{ys},R{spec.out_letters}->{rest}R', dy, b)  # s dy b^T
  # a's gradient as g^T x, rank first: XLA:CPU runs that thin product 2-3x faster than x^T g
  # (for which it transposes the whole activation). The barrier keeps the small transpose to
  # a's layout from being folded back into the product.
  da = jnp.einsum(f'{rest}R,{xs}->R{spec.in_letters}', g, x)
  if sharding.platform() == 'cpu':
    da = jax.lax.optimization_barrier(da)
  da = jnp.moveaxis(da, 0, -1)
  db = jnp.einsum(f'{rest}R,{ys}->R{spec.out_letters}', spec.scale * xa, dy)
  return dx, None, da.astype(a.dtype), db.astype(b.dtype)


_adapted.defvjp(_adapted_fwd, _adapted_bwd)


class LoRAGrouped(nnx.Module):
  """A mixture of experts' stacked projection `[E, in, out]` with one adapter per expert:
  `base(x) + scale * (x a_e) b_e` for the rows of expert e, as two more grouped matmuls.
  `a` is `[(L,) E, in, r]` and `b` `[(L,) E, r, out]`, on the base's 'expert' axis, so they
  shard with it. Plain LoRA and rsLoRA; no DoRA or adapter dropout on experts."""

  def __init__(self, base: moe.Grouped | quantize.QuantizedGrouped, *, rank: int, alpha: float,
               use_rslora: bool, rngs: nnx.Rngs):
    quantized = isinstance(base, quantize.QuantizedGrouped)  # QLoRA: float32 adapters
    kernel = base.q if quantized else base.w
    names = tuple(kernel.get_metadata().get('out_sharding') or (None,) * kernel.ndim)
    lead, (n_in, n_out) = kernel.shape[:-2], kernel.shape[-2:]
    dtype = jnp.float32 if quantized else kernel.get_value().dtype
    self.base, self.rank, self.alpha, self.use_rslora = base, rank, alpha, use_rslora
    self.scale = alpha / (rank**0.5 if use_rslora else rank)
    bound = 1.0 / n_in**0.5  # as LoRAEinsum (PEFT's Kaiming-uniform a, zero b)
    self.a = nnx.LoRAParam(jax.random.uniform(rngs.params(), (*lead, n_in, rank), dtype, -bound,
                                              bound),
                           out_sharding=(*names[:-1], 'lora'), eager_sharding=False)
    self.b = nnx.LoRAParam(jnp.zeros((*lead, rank, n_out), dtype),
                           out_sharding=(*names[:-2], 'lora', names[-1]), eager_sharding=False)

  def delta(self) -> jax.Array:
    """scale * a_e b_e for every expert, in the base weight's layout."""
    return self.scale * jnp.einsum('...ir,...ro->...io', self.a.get_value().astype(jnp.float32),
                                   self.b.get_value().astype(jnp.float32))

  def merged_weight(self) -> jax.Array:
    return self.base.weight() + self.delta()  # float32, dequantized for a QLoRA base

  def __call__(self, x: jax.Array, group_sizes: jax.Array) -> jax.Array:
    y = self.base(x, group_sizes)
    if _ADAPTERS_OFF[-1]:
      return y
    dtype = self.base.dtype
    xa = moe.grouped_matmul(x.astype(dtype), self.a.get_value().astype(dtype), group_sizes)
    return y + self.scale * moe.grouped_matmul(xa, self.b.get_value().astype(dtype), group_sizes)


def _paths(model: nnx.Module) -> dict[str, tuple[Any, str, layers.Einsum]]:
  """'blocks.attn.q' -> (parent module, attribute, module) for every Einsum (and every
  mixture of experts' grouped projection) in the model."""
  out = {}
  for path, node in nnx.iter_graph(model):
    if isinstance(node, (layers.Einsum, quantize.QuantizedEinsum, moe.Grouped,
                         quantize.QuantizedGrouped)) and path:
      parent = model
      for key in path[:-1]:
        parent = getattr(parent, key) if not isinstance(key, int) else parent[key]
      out['.'.join(str(p) for p in path)] = (parent, path[-1], node)
  return out


def apply(model: nnx.Module, *, rank: int, alpha: float, targets: Any, use_rslora: bool = False,
          use_dora: bool = False, dropout: float = 0.0, seed: int = 0) -> list[str]:
  """Wraps every Einsum whose path matches `targets` in a LoRAEinsum; returns the wrapped paths."""
  short = _targets_of(model)
  pattern = re.compile(target_regex(targets, short))
  modules = _paths(model)
  chosen = sorted(p for p in modules if pattern.search(p))
  if not chosen:
    raise ValueError(f'lora.targets={targets!r} matches no module; the model has '
                     f'{sorted(modules)} (short names: {list(short)}, or "all-linear")')
  rngs = nnx.Rngs(seed)
  for path in chosen:
    parent, attr, base = modules[path]
    if isinstance(base, (moe.Grouped, quantize.QuantizedGrouped)):
      if use_dora or dropout:
        raise ValueError(f'lora: {path} is a mixture of experts\' projection; DoRA and adapter '
                         'dropout are not built for experts (set lora.use_dora=False, '
                         'lora.dropout=0, or leave gate/up/down out of lora.targets)')
      setattr(parent, attr, LoRAGrouped(base, rank=rank, alpha=alpha, use_rslora=use_rslora,
                                        rngs=rngs))
      continue
    setattr(parent, attr, LoRAEinsum(base, rank=rank, alpha=alpha, use_rslora=use_rslora,
                                     use_dora=use_dora, rngs=rngs, dropout=dropout))
  return chosen


def merge(model: nnx.Module) -> None:
  """Folds every adapter into its base weight in place (the model becomes a plain model)."""
  for path, node in list(nnx.iter_graph(model)):
    if isinstance(node, (LoRAEinsum, LoRAGrouped)):
      parent = model
      for key in path[:-1]:
        parent = getattr(parent, key)
      base = node.base
      base.w.set_value(node.merged_weight().astype(base.w.get_value().dtype))
      setattr(parent, path[-1], base)


def adapters(model: nnx.Module) -> dict[str, LoRAEinsum]:
  """'attn.q' -> its LoRAEinsum (stacked over layers), for every adapted module."""
  out = {}
  for path, node in nnx.iter_graph(model):
    if isinstance(node, (LoRAEinsum, LoRAGrouped)):
      out['.'.join(str(p) for p in path[1:] if p != 'blocks') if path[0] == 'blocks'
          else '.'.join(map(str, path))] = node
  return out


def apply_options(model: nnx.Module, options: Options, *, seed: int = 0) -> list[str]:
  """`apply` with the settings of `options` (a PEFT `adapter` is loaded by peft_io instead)."""
  return apply(model, rank=options.rank, alpha=options.alpha, targets=options.targets,
               use_rslora=options.use_rslora, use_dora=options.use_dora,
               dropout=options.dropout, seed=seed)
