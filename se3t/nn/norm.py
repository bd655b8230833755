"""NormSE3: an equivariant nonlinearity acting on the norms of the features only."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..fiber import Features, Fiber
from .._validate import check_features

__all__ = ["NormSE3"]


class NormSE3(nn.Module):
    """``out = x / |x| * ReLU(LayerNorm(|x|))`` per degree, norms over the ``2d+1`` components.

    ``|x|`` is clamped at ``2**-24`` (smallest fp16 subnormal) so zero features stay finite. When every degree
    has the same channel count the per-degree LayerNorms are computed as one GroupNorm (one group per degree,
    same result, one kernel); otherwise one LayerNorm per degree. (The reference's non-uniform branch has a
    bug that breaks equivariance; se3t does not reproduce it.)

    Shapes: ``x[d]: [N, C_d, 2d+1] -> [N, C_d, 2d+1]``.
    """

    NORM_CLAMP = 2 ** -24

    def __init__(self, fiber: Fiber, nonlinearity: Optional[nn.Module] = None):
        super().__init__()
        if len(fiber) == 0:
            raise ValueError("NormSE3 needs a non-empty fiber")
        self.fiber = fiber
        self.nonlinearity = nonlinearity if nonlinearity is not None else nn.ReLU()
        if fiber.uniform_channels:
            self.group_norm = nn.GroupNorm(num_groups=len(fiber), num_channels=sum(fiber.channels))
        else:
            self.layer_norms = nn.ModuleDict({str(d): nn.LayerNorm(c) for d, c in fiber})

    def forward(self, features: Features) -> Features:
        check_features(features, self.fiber, None, "features")
        degrees = self.fiber.degrees
        norms = [self._clamped_norm(features[d]) for d in degrees]
        if hasattr(self, "group_norm"):
            fused = torch.cat(norms, dim=-2).squeeze(-1)  # [N, sum C]
            new_norms = self.nonlinearity(self.group_norm(fused)).unsqueeze(-1).chunk(len(degrees), dim=-2)
        else:
            new_norms = [self.nonlinearity(self.layer_norms[str(d)](n.squeeze(-1))).unsqueeze(-1)
                         for d, n in zip(degrees, norms)]
        # x * (new|x| / |x|): the scale is [N, C, 1], so backward keeps x (already kept by the norm) and the small
        # scale, not a second feature-sized tensor x / |x|.
        return {d: features[d] * (nn_ / n) for d, n, nn_ in zip(degrees, norms, new_norms)}

    def _clamped_norm(self, x: Tensor) -> Tensor:
        """``max(|x|, NORM_CLAMP)`` over the components, ``[N, C, 1]``, as ``sqrt(max(|x|^2, NORM_CLAMP^2))``: where
        ``|x|`` is below the clamp (zero features of padding atoms) the gradient is masked before any division, to
        every order (``torch.norm``'s second derivative at zero is 0/0: NaN parameter gradients when training on
        forces). The square is summed in at least float32: ``NORM_CLAMP^2`` underflows to 0 in float16."""
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        return wide.pow(2).sum(-1, keepdim=True).clamp(min=self.NORM_CLAMP ** 2).sqrt().to(x.dtype)

    def extra_repr(self) -> str:
        return f"fiber={self.fiber}"
