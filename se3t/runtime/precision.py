"""Numerical precision: fp32, tf32, fp16 (+ gradient scaler, CUDA only) and bf16 autocast.

TF32 is always switched *explicitly* (``torch.set_float32_matmul_precision`` and the cuDNN flag), never left to
torch's defaults, so that an fp32 run really is fp32 (equivariance checks need it).
"""

from __future__ import annotations

import contextlib
import enum
from dataclasses import dataclass

import torch

from .errors import UserError

__all__ = ["Precision", "PrecisionPolicy", "resolve_precision"]


class Precision(str, enum.Enum):
    FP32 = "fp32"
    TF32 = "tf32"
    FP16 = "fp16"
    BF16 = "bf16"


def resolve_precision(precision: str | None, amp: bool, device: torch.device) -> Precision:
    """The precision a run uses.

    ``--amp`` means fp16 on CUDA and bf16 on CPU (as the reference's ``--amp`` means fp16 on its GPUs).
    Without either flag: tf32 on CUDA (what the reference's published numbers used) and fp32 on CPU.
    """
    cuda = device.type == "cuda"
    amp_choice = (Precision.FP16 if cuda else Precision.BF16) if amp else None
    if precision is not None:
        chosen = Precision(precision)
        if amp_choice is not None and chosen is not amp_choice:
            raise UserError(
                f"--amp means {amp_choice.value} on {device.type}, but --precision {chosen.value} was also given; "
                "pass only one of them"
            )
    elif amp_choice is not None:
        chosen = amp_choice
    else:
        chosen = Precision.TF32 if cuda else Precision.FP32
    if chosen is Precision.FP16 and not cuda:
        raise UserError("--precision fp16 needs a CUDA device; on CPU use --precision bf16 (or --amp)")
    if chosen is Precision.TF32 and not cuda:
        raise UserError("--precision tf32 needs a CUDA device (TF32 is a GPU number format); use fp32 on CPU")
    return chosen


@dataclass(frozen=True)
class PrecisionPolicy:
    """How a run computes: autocast dtype, gradient scaling and the matmul precision."""

    precision: Precision
    device_type: str

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {Precision.FP16: torch.float16, Precision.BF16: torch.bfloat16}.get(self.precision)

    def apply_global_settings(self) -> None:
        """Switch TF32 on for ``tf32`` and off for every other precision (explicitly, both ways)."""
        tf32 = self.precision is Precision.TF32
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
        torch.backends.cudnn.allow_tf32 = tf32

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = self.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=dtype)

    def make_scaler(self) -> torch.amp.GradScaler | None:
        """A gradient scaler for fp16 (only); bf16 has fp32's range and needs none."""
        if self.precision is Precision.FP16:
            return torch.amp.GradScaler(self.device_type)
        return None
