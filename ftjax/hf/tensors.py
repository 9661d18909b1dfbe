"""How one ftjax array maps to one Hugging Face tensor: same, transposed, or heads split/joined."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

Index = tuple[slice, ...]


@dataclasses.dataclass(frozen=True)
class Tensor:
  """How one ftjax array (per layer, for stacked ones) maps to one HF tensor."""

  hf_name: str  # with '{i}' for the layer
  kind: str  # same | transpose | in_heads | out_heads | bias_heads

  def read(self, get_slice: Callable[[tuple[slice, ...]], np.ndarray], index: Index,
           shape: tuple[int, ...]) -> np.ndarray:
    """This ftjax slice (`index` over `shape`), read from the HF tensor with `get_slice`."""
    s = [slice(*i.indices(n)) for i, n in zip(index, shape, strict=True)]
    if self.kind == 'same':
      return get_slice(tuple(s))
    if self.kind == 'transpose':
      return get_slice((s[1], s[0])).T
    h = shape[-1] if self.kind != 'out_heads' else shape[1]
    if self.kind == 'in_heads':  # ftjax (D, N, H) <- HF (N*H, D)
      d, n, hs = s
      assert hs == slice(0, h, 1), 'head_dim is never sharded'
      rows = get_slice((slice(n.start * h, n.stop * h), d))
      return rows.T.reshape(d.stop - d.start, n.stop - n.start, h)
    if self.kind == 'out_heads':  # ftjax (N, H, D) <- HF (D, N*H)
      n, hs, d = s
      assert hs == slice(0, h, 1), 'head_dim is never sharded'
      cols = get_slice((d, slice(n.start * h, n.stop * h)))
      return cols.T.reshape(n.stop - n.start, h, d.stop - d.start)
    if self.kind == 'bias_heads':  # ftjax (N, H) <- HF (N*H,)
      n, hs = s
      return get_slice((slice(n.start * h, n.stop * h),)).reshape(n.stop - n.start, h)
    raise AssertionError(self.kind)

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    """The whole HF tensor from one ftjax array (one layer of a stacked one)."""
    if self.kind == 'same':
      return x
    if self.kind == 'transpose':
      return x.T
    if self.kind == 'in_heads':
      return x.reshape(x.shape[0], -1).T
    if self.kind == 'out_heads':
      return x.reshape(-1, x.shape[-1]).T
    return x.reshape(-1)

  def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF tensor's shape for an ftjax array (one layer) of `shape`."""
    kind = self.kind
    if kind == 'transpose':
      return shape[::-1]
    if kind == 'in_heads':
      return (shape[1] * shape[2], shape[0])
    if kind == 'out_heads':
      return (shape[2], shape[0] * shape[1])
    if kind == 'bias_heads':
      return (shape[0] * shape[1],)
    return shape
