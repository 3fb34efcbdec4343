"""Matting architectures by name, and loading their weights from safetensors (never pickles)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from safetensors.torch import load_file
from torch import Tensor, nn

from hotfolder.models.u2net import U2NET_WIDTHS, U2NETP_WIDTHS, U2Net

ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {
    "u2netp": lambda: U2Net(U2NETP_WIDTHS),
    "u2net": lambda: U2Net(U2NET_WIDTHS),
}

# Every registered architecture takes RGB at this size (rembg's U²-Net input).
INPUT_SIZE = 320


class WeightsError(Exception):
    """The weights file is missing, unreadable or does not fit the architecture."""


def build(arch: str) -> nn.Module:
    try:
        factory = ARCHITECTURES[arch]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise WeightsError(f"unknown model {arch!r}; known models: {known}") from None
    return factory()


def load(arch: str, weights: Path) -> nn.Module:
    """The architecture with its trained weights, in eval mode, on the CPU."""
    model = build(arch)
    if not weights.is_file():
        raise WeightsError(f"{weights}: weights file not found")
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise WeightsError(f"{weights}: not a readable safetensors file ({exc})") from exc
    problem = misfit(model, state)
    if problem:
        raise WeightsError(f"{weights}: does not fit model {arch!r}: {problem}{hint(arch, state)}")
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)


def misfit(model: nn.Module, state: dict[str, Tensor]) -> str:
    """Why ``state`` cannot be loaded into ``model``, in one line ('' when it can): counts of
    missing, unexpected, reshaped and integer-or-boolean tensors with the first of each, instead
    of PyTorch's message, which lists every tensor (hundreds of lines for weights of another
    model). Floating-point tensors of another precision (fp16, bf16) fit: loading converts them."""
    expected = model.state_dict()
    wanted = {name: tuple(t.shape) for name, t in expected.items()}
    missing = [name for name in wanted if name not in state]
    unexpected = [name for name in state if name not in wanted]
    reshaped = [
        (name, tuple(state[name].shape), shape)
        for name, shape in wanted.items()
        if name in state and tuple(state[name].shape) != shape
    ]
    # load_state_dict would cast these to float without a word: trained weights are never so.
    retyped = [
        (name, state[name].dtype, t.dtype)
        for name, t in expected.items()
        if name in state and state[name].is_floating_point() != t.is_floating_point()
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensors missing (first: {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} tensors it does not have (first: {unexpected[0]})")
    if reshaped:
        name, got, need = reshaped[0]
        parts.append(
            f"{len(reshaped)} tensors of other shapes (first: {name} is {list(got)}, "
            f"the model needs {list(need)})"
        )
    if retyped:
        name, got_dtype, need_dtype = retyped[0]
        parts.append(
            f"{len(retyped)} tensors of other types (first: {name} is {got_dtype}, "
            f"the model needs {need_dtype})"
        )
    return "; ".join(parts)


def hint(arch: str, state: dict[str, Tensor]) -> str:
    """'; they fit model X: set model.name: X' when the weights are another known model's."""
    for other in ARCHITECTURES:
        if other != arch and not misfit(build(other), state):
            return f"; they fit model {other!r}: set model.name: {other}"
    return ""


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """Named convolutions in the order the forward pass runs them (modules are registered so)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "ARCHITECTURES",
    "INPUT_SIZE",
    "WeightsError",
    "build",
    "conv_layers",
    "load",
    "parameter_count",
]
