"""Equivariant layers, one module each."""
from .attention import AttentionBlockSE3
from .conv import RADIAL_SHARING, ConvSE3, FuseLevel
from .fused import cached_kernel_weights
from .linear import LinearSE3
from .norm import NormSE3
from .pooling import GraphPooling
from .radial import RadialMLP

__all__ = ["AttentionBlockSE3", "ConvSE3", "FuseLevel", "RADIAL_SHARING", "LinearSE3", "NormSE3", "GraphPooling",
           "RadialMLP", "cached_kernel_weights"]
