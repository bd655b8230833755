"""se3t: the SE(3)-Transformer on plain edge-index tensors (no DGL, no graph object).

Features are dicts ``{degree: Tensor[N, C, 2d+1]}``; graphs are ``edge_index [2, E]`` (src, dst).
"""
from . import cuda_graphs, graph, scatter, testing
from .basis import Basis, get_basis
from .cuda_graphs import CUDAGraphStep, HostSyncDetector
from .fiber import Features, Fiber
from .model import SE3Transformer, SE3TransformerPooled
from .nn import (RADIAL_SHARING, AttentionBlockSE3, ConvSE3, FuseLevel, GraphPooling, LinearSE3, NormSE3,
                 cached_kernel_weights)

__version__ = "0.1.0"

__all__ = [
    "Fiber",
    "Features",
    "FuseLevel",
    "RADIAL_SHARING",
    "Basis",
    "get_basis",
    "LinearSE3",
    "NormSE3",
    "ConvSE3",
    "AttentionBlockSE3",
    "GraphPooling",
    "SE3Transformer",
    "SE3TransformerPooled",
    "cached_kernel_weights",
    "CUDAGraphStep",
    "HostSyncDetector",
    "cuda_graphs",
    "scatter",
    "graph",
    "testing",
    "__version__",
]
