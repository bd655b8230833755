"""Graph pooling: node features to one feature per graph."""
from __future__ import annotations

from torch import Tensor, nn

from ..fiber import Features
from ..scatter import scatter

__all__ = ["GraphPooling"]


class GraphPooling(nn.Module):
    """Max (degree 0 only: a max over vector components is not equivariant) or mean pooling of one degree.

    Shapes: ``features[d]: [N, C, 2d+1]``, ``graph_index: [N]`` -> ``[num_graphs, C]`` for degree 0,
    ``[num_graphs, C, 2d+1]`` otherwise. Graphs without nodes give zeros.
    """

    def __init__(self, pool: str = "max", feat_type: int = 0):
        super().__init__()
        pool = {"avg": "mean"}.get(pool, pool)
        if pool not in ("max", "mean"):
            raise ValueError(f"pooling must be 'max' or 'mean'/'avg', got {pool!r}")
        if pool == "max" and feat_type != 0:
            raise ValueError("max pooling of degree > 0 features would break equivariance; use 'mean'")
        self.pool, self.feat_type = pool, feat_type

    def forward(self, features: Features, graph_index: Tensor, num_graphs: int) -> Tensor:
        pooled = scatter(features[self.feat_type], graph_index, num_graphs, self.pool, check=False)
        return pooled.squeeze(-1) if self.feat_type == 0 else pooled

    def extra_repr(self) -> str:
        return f"pool={self.pool!r}, feat_type={self.feat_type}"
