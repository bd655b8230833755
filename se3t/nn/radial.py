"""Radial profile: an MLP from invariant edge features to the per-edge kernel weights."""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = ["RadialMLP"]


class RadialMLP(nn.Module):
    """``Linear(edge_dim, hidden) -> [LayerNorm] -> ReLU -> Linear(hidden, hidden) -> [LayerNorm] -> ReLU ->
    Linear(hidden, out_features, bias=False)``.

    Shapes: ``[E, edge_dim] -> [E, out_features]``. Module indices in ``net`` match the reference
    (0, 1, 3, 4, 6 with LayerNorm) so checkpoints map one to one.

    ``recompute_hidden`` (set by the model's ``low_memory``): :meth:`hidden_features` keeps only its input for
    backward and recomputes its activations there (three ``[E, hidden]`` tensors besides its output, which the
    fused kernel keeps anyway; a few microseconds of compute), so that they do not exist during the kernel's
    backward, which comes first and is where a low-memory step's live tensors peak.
    """

    def __init__(self, edge_dim: int, out_features: int, hidden: int = 32, use_layer_norm: bool = False):
        super().__init__()
        layers = [nn.Linear(edge_dim, hidden), nn.LayerNorm(hidden) if use_layer_norm else None, nn.ReLU(),
                  nn.Linear(hidden, hidden), nn.LayerNorm(hidden) if use_layer_norm else None, nn.ReLU(),
                  nn.Linear(hidden, out_features, bias=False)]
        self.net = nn.Sequential(*[m for m in layers if m is not None])
        self.edge_dim, self.out_features = edge_dim, out_features
        self.recompute_hidden = False

    @property
    def last(self) -> nn.Linear:
        return self.net[-1]

    def hidden_features(self, edge_feats: Tensor) -> Tensor:
        """Everything but the last (widest) layer: ``[E, hidden]``."""
        if self.recompute_hidden and torch.is_grad_enabled():
            return checkpoint(self.net[:-1], edge_feats, use_reentrant=False)
        return self.net[:-1](edge_feats)

    def forward(self, edge_feats: Tensor) -> Tensor:
        return self.net(edge_feats)
