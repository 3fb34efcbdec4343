"""Faster forms of a loaded model for the CPU, with the mattes of fp32 kept.

Every form takes and returns float32: (N, 3, 320, 320) in, (N, 1, 320, 320) saliency out.
"""

from __future__ import annotations

import torch
from torch import nn

# bf16-mixed runs in bf16 only the two stages at full resolution (320×320), where most of the
# arithmetic is; every other stage, the side outputs and their fusion stay fp32. Measured on the
# eval photos, bf16 rounding in the second stage (160×160, encoder and decoder) is what moves the
# matte: bf16 everywhere, or everywhere but the first and last stages and the side outputs, moves
# a cat's matte by 6/255 on average; this form by 0.9/255. It is worth having only where the CPU
# computes bf16 natively (elsewhere bf16 is emulated: 3× slower than fp32 on AVX2).
FULL_RESOLUTION = ("encoder.0", "decoder.4")
KEEP_FP32 = tuple(f"encoder.{i}" for i in range(1, 6)) + tuple(f"decoder.{i}" for i in range(4))
KEEP_FP32 += ("side", "outconv")


class Float32(nn.Module):
    """A module run in float32 inside a bf16-autocast model."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", enabled=False):
            out: torch.Tensor = self.module(x.float())
        return out


class Bfloat16(nn.Module):
    """A float32 model run under bf16 autocast: convolutions in bf16, the rest as autocast
    decides; float32 out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out: torch.Tensor = self.model(x)
        return out.float()


def bf16_except(model: nn.Module, keep: tuple[str, ...]) -> nn.Module:
    """``model`` in bf16 but for the submodules named in ``keep`` (a ModuleList's name keeps
    each of its members), which stay float32."""
    for name in keep:
        module = model.get_submodule(name)
        members = list(module.named_children()) if isinstance(module, nn.ModuleList) else None
        targets = [(f"{name}.{child}", m) for child, m in members] if members else [(name, module)]
        for target, member in targets:
            parent_name, _, attribute = target.rpartition(".")
            setattr(model.get_submodule(parent_name), attribute, Float32(member))
    return Bfloat16(model)


def frozen(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """TorchScript, traced and frozen: oneDNN fuses each convolution with its ReLU."""
    with torch.no_grad():
        traced = torch.jit.trace(model, example, check_trace=False)  # type: ignore[no-untyped-call]
        result: nn.Module = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
    return result
