"""The model's linear layers on the CPU through oneDNN: inference on a weight reordered once into oneDNN's
layout, training with the backward's products on oneDNN too.

PyTorch multiplies float32 matrices on the CPU with MKL, which on AMD processors runs its AVX2 kernels even where
the processor has AVX-512; oneDNN (also inside PyTorch) uses the processor's widest ones. On the AVX-512 EPYC of
docs/results.md ("oneDNN products") oneDNN ran every product of `MIN_PRODUCT` multiply-adds or more faster than
``F.linear`` (1.1-3.3x, median 2.0x; the same float32 arithmetic: results agree to rounding, and the model's
tokens were the same), and some smaller ones slower, where a call's fixed cost dominates: `linear` takes oneDNN
from `MIN_PRODUCT` up. Where MKL already runs a processor's widest kernels the two should be close (not measured).

It takes that path only for float32 CPU tensors without autocast, and never while something watches the operators
(tracing, an ONNX export among them, ``torch.compile`` and dispatch modes, such as FLOP counting, all see plain
``F.linear``). Without gradients the product reads the reordered weight, made on first use and again whenever the
weight may have changed (an optimizer step, fused ones included, a load, a move): not part of the state dict, it is
one more copy of the weight in memory while the model infers on the CPU. With gradients (`_Product`) it reads the
weight as it is, which changes at every step, and computes the input's and the weight's gradients on oneDNN too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils._python_dispatch import _get_current_dispatch_mode

ENABLED = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
"""Whether `linear` may use oneDNN: this PyTorch has its linear operator. Set it False to multiply with
``F.linear`` everywhere."""

MIN_PRODUCT = 1_100_000
"""The multiply-adds (rows x inputs x outputs) from which a product goes to oneDNN: above the largest one that
oneDNN lost to MKL on 1 or 2 threads here (16 x 256 x 256, 0.97x on 2 threads; scripts/onednn.py)."""


_optimizer_steps = 0
"""Optimizer steps taken in this process: fused optimizers (AdamW's ``fused=True``) update a weight in place without
counting a new version of it, so a reordered copy is remade after any step."""


def _count_optimizer_step(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_optimizer_step)


class ReorderedWeight:
    """oneDNN's reordered copy of one weight, remade when the weight changes (its storage or version, or an optimizer
    step). Copies of it start empty."""

    def __init__(self):
        self.key: tuple | None = None
        self.tensor: Tensor | None = None

    def of(self, weight: Tensor) -> Tensor:
        key = (weight.data_ptr(), weight._version, weight.shape, _optimizer_steps)
        if self.key != key:
            with torch.no_grad():
                self.tensor, self.key = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None), key
        return self.tensor

    def __getstate__(self) -> dict:  # oneDNN's layout cannot be pickled; a copy reorders its own weight
        return {"key": None, "tensor": None}


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, reordered: ReorderedWeight | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``, on oneDNN where it may. Without gradients, on the weight as ``reordered``
    holds it (none: the weight as it is); with them, `_Product`'s products, forward and backward."""
    if not _onednn(x, weight):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _Product.apply(x, weight, bias)
    return _product(x, weight if reordered is None else reordered.of(weight), bias)


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` of a (..., K) and b (K, N), on oneDNN where it may (without gradients)."""
    return _product(a.contiguous(), b.t().contiguous(), None) if _onednn(a, b.t()) else a @ b


def _product(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """oneDNN's ``x @ weight.T + bias`` (weight: as it is, or reordered)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _onednn(x: Tensor, weight: Tensor) -> bool:
    # the cheap refusals first: the model's small products (most of a small decoder's step) leave at the size
    if not ENABLED or torch.compiler.is_compiling() or torch.jit.is_tracing():  # ONNX export traces too
        return False
    return (x.numel() * weight.shape[0] >= MIN_PRODUCT
            and type(x) is Tensor and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.device.type == "cpu" and weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu")
            and _get_current_dispatch_mode() is None)


class _Product(torch.autograd.Function):
    """``F.linear`` with its forward product and backward's two (the input's and the weight's gradient) on
    oneDNN. The weight changes at every step, so it is used as it is, not reordered; it saves what F.linear saves."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _product(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        needs_x, needs_weight, needs_bias = ctx.needs_input_grad
        rows = grad.reshape(-1, grad.shape[-1])  # (R, out)
        grad_x = matmul(grad, weight) if needs_x else None
        grad_weight = matmul(rows.t(), x.reshape(-1, x.shape[-1])) if needs_weight else None
        grad_bias = rows.sum(0) if needs_bias and ctx.has_bias else None
        return grad_x, grad_weight, grad_bias


class OneDNNLinear(nn.Linear):
    """``nn.Linear`` computed by `linear`: on the CPU, through oneDNN."""

    def forward(self, x: Tensor) -> Tensor:
        reordered = self.__dict__.get("reordered")
        if reordered is None:  # made here: `use_onednn` turns existing layers into this class
            reordered = self.__dict__["reordered"] = ReorderedWeight()
        return linear(x, self.weight, self.bias, reordered)


def use_onednn(module: nn.Module) -> nn.Module:
    """Make every plain ``nn.Linear`` inside ``module`` (the encoder's too) a `OneDNNLinear`: the same layer, with
    the same parameters and state dict. Returns the module."""
    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = OneDNNLinear
    return module
