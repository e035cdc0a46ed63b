"""The base of the Linears that hold their weight laid out for a kernel, not as nn.Linear's (N, K).

`packed.PackedLinear` (oneDNN's blocked layout) and `bf16_linear.Bf16RowsLinear` (row tiles) keep
only the laid-out copy, yet must act as an nn.Linear wherever a model is saved, loaded, quantized
or turned back for training: `state_dict()` gives the plain `weight` (and `bias`), `load_state_dict`
lays out what it loads, `to_linear` gives an nn.Linear back. A subclass says how to read the plain
weight (`dense_weight`), how to store one (`_store_dense`), and where a stand-in for loading lives
(`_stand_in`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LaidOutLinear(nn.Module):
    """F.linear(x, W, bias) with W held in a kernel's layout; `bias` is a buffer."""

    in_features: int
    out_features: int

    def dense_weight(self) -> Tensor:
        """The (N, K) weight in the plain layout, in a fresh tensor."""
        raise NotImplementedError

    def _store_dense(self, weight: Tensor) -> None:
        """Hold the plain (N, K) `weight` (just loaded) in this module's layout."""
        raise NotImplementedError

    def _stand_in(self) -> Tensor:
        """An empty (N, K) tensor of the dtype and device a loaded weight is cast to."""
        raise NotImplementedError

    def to_linear(self) -> nn.Linear:
        """An nn.Linear with this module's weight and bias."""
        weight = self.dense_weight()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta",
                           dtype=weight.dtype)
        linear.weight = nn.Parameter(weight)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.clone())
        return linear

    # The state dict holds the plain weight, as nn.Linear's does.
    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        destination[prefix + "weight"] = self.dense_weight()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        # nn.Module loads the weight into a plain stand-in (its checks, messages, casting and
        # `assign` semantics), then the stand-in is laid out and dropped; a refused load changes nothing.
        errors = len(error_msgs)
        self.register_buffer("weight", self._stand_in())
        try:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)
        finally:
            plain = self._buffers.pop("weight")
        if prefix + "weight" in state_dict and len(error_msgs) == errors:
            self._store_dense(plain)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def replace_module(module: nn.Module, name: str, make) -> None:
    """Set the submodule `name` of `module` to make(that submodule), in place."""
    parent_name, _, attr = name.rpartition(".")
    parent = module.get_submodule(parent_name)
    setattr(parent, attr, make(getattr(parent, attr)))


__all__ = ["LaidOutLinear", "replace_module"]
