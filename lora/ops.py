"""How a layer applies its weight: the one description the adapters, bypass mode and training share.

An ``Op`` is a Linear or a ConvNd (its geometry, groups and padding mode) together with the shape of
its weight. Adapters use it to run their factors the way the layer runs W (``op(x, w)``: the same
stride, padding, dilation and groups; ``op.pointwise(h, w)``: a 1×1 channel mix), so a forward-pass
(bypass) route never needs ΔW; training uses the shape to initialise factors.

This module sits below ``lora.adapters`` (adapters import it) and imports nothing of the pack.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@dataclass(frozen=True)
class Op:
    """A Linear (``conv_dims`` 0) or ConvNd layer's weight application, bias excluded."""
    conv_dims: int = 0                     # 0: Linear; 1, 2, 3: ConvNd
    stride: tuple | int = 1
    padding: tuple | int | str = 0
    dilation: tuple | int = 1
    groups: int = 1
    padding_mode: str = "zeros"
    pad: tuple = ()                        # F.pad amounts when padding_mode is not "zeros"
    shape: tuple = ()                      # the weight's shape: (out, in // groups, *kernel); () if unknown

    @classmethod
    def of(cls, module: torch.nn.Module) -> "Op":
        """The op of a Linear or (non-transposed) Conv1d/2d/3d; TypeError for any other layer."""
        if isinstance(module, torch.nn.Linear):
            return cls(shape=tuple(getattr(module.weight, "shape", ())))
        if isinstance(module, torch.nn.modules.conv._ConvNd) and not module.transposed:
            dims = len(module.kernel_size)
            return cls(dims, module.stride, module.padding, module.dilation, module.groups, module.padding_mode,
                       tuple(getattr(module, "_reversed_padding_repeated_twice", ())),
                       tuple(getattr(module.weight, "shape", ())))
        raise TypeError(f"bypass supports Linear and Conv1d/2d/3d layers, not {type(module).__name__}")

    # ---- the weight's geometry -----------------------------------------------------------------
    @property
    def channel_axis(self) -> int:
        """The channel axis of this layer's activations (Linear: last; Conv: 1)."""
        return 1 if self.conv_dims else -1

    @property
    def out_channels(self) -> int:
        return self.shape[0]

    @property
    def in_channels(self) -> int:
        """Input channels one output channel sees (``in // groups``)."""
        return self.shape[1]

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.shape[2:])

    @property
    def kernel_numel(self) -> int:
        return math.prod(self.kernel)

    # ---- applying weights as the layer does ----------------------------------------------------
    def __call__(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The layer's own op on ``w`` (shaped like its weight, any number of output channels)."""
        if not self.conv_dims:
            return F.linear(x, w)
        padding = self.padding
        if self.padding_mode != "zeros":
            x, padding = F.pad(x, self.pad, mode=self.padding_mode), 0
        return _CONV[self.conv_dims](x, w, None, self.stride, padding, self.dilation, self.groups)

    def pointwise(self, x: torch.Tensor, w: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """A 1×1 (stride 1, no padding) channel mix by ``w`` (out, in) or (out, in, 1, …)."""
        if not self.conv_dims:
            return F.linear(x, w.flatten(1))
        return _CONV[self.conv_dims](x, w.reshape(*w.shape[:2], *[1] * self.conv_dims), groups=groups)


def on_channels(v: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    """A per-channel vector shaped to broadcast along ``axis`` of a ``ndim``-dim tensor."""
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)
