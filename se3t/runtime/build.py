"""Model configuration (stored in checkpoints) and target bookkeeping (mean/std, unit)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from .errors import UserError

__all__ = ["ModelConfig", "TargetInfo", "build_model", "ENERGY_UNITS"]

#: Units whose MAE is also reported in milli-units (meV for energies).
ENERGY_UNITS = {"eV": "meV"}


@dataclass(frozen=True)
class ModelConfig:
    """The hyperparameters that define the weights' shapes: a checkpoint rebuilds its model from these."""

    num_layers: int = 7
    num_degrees: int = 4
    num_channels: int = 32
    num_heads: int = 8
    channels_div: int = 2
    pooling: str = "max"
    norm: bool = True
    use_layer_norm: bool = True
    low_memory: bool = False
    low_memory_blocks: int = 3
    low_memory_segment: int = 2
    node_features: int = 6
    edge_features: int = 4
    output_dim: int = 1

    @classmethod
    def from_args(cls, args: Any) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise UserError(f"the checkpoint's model configuration has unknown entries {sorted(unknown)} "
                            "(written by a newer se3t?)")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def differences(self, other: "ModelConfig") -> list[str]:
        return [f"{f.name}: checkpoint {getattr(other, f.name)!r}, command line {getattr(self, f.name)!r}"
                for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)]


def build_model(config: ModelConfig, fuse_level: str = "EDGE_FRAME") -> torch.nn.Module:
    """The QM9 model of the paper/reference at the given size: ``SE3TransformerPooled``."""
    import se3t

    if config.num_channels % config.channels_div:
        raise UserError(f"--num_channels {config.num_channels} must be divisible by --channels_div "
                        f"{config.channels_div}")
    if (config.num_channels // config.channels_div) % config.num_heads:
        raise UserError(f"--num_heads {config.num_heads} must divide num_channels / channels_div = "
                        f"{config.num_channels // config.channels_div}")
    return se3t.SE3TransformerPooled(
        fiber_in=se3t.Fiber({0: config.node_features}),
        fiber_out=se3t.Fiber({0: config.num_degrees * config.num_channels}),
        fiber_edge=se3t.Fiber({0: config.edge_features}),
        num_degrees=config.num_degrees,
        num_channels=config.num_channels,
        output_dim=config.output_dim,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        channels_div=config.channels_div,
        pooling=config.pooling,
        norm=config.norm,
        use_layer_norm=config.use_layer_norm,
        low_memory=config.low_memory,
        low_memory_blocks=config.low_memory_blocks,
        low_memory_segment=config.low_memory_segment,
        fuse_level=se3t.FuseLevel[fuse_level.upper()],
    )


@dataclass(frozen=True)
class TargetInfo:
    """What the model predicts: the target's name and unit, and the train split's mean/std used to standardise."""

    name: str
    unit: str
    mean: float
    std: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TargetInfo":
        return cls(**data)

    def describe_mae(self, mae: float) -> str:
        text = f"{mae:.5g} {self.unit}"
        if self.unit in ENERGY_UNITS:
            text += f" ({mae * 1000:.4g} {ENERGY_UNITS[self.unit]})"
        return text
