"""Equivariance testing helpers, shipped for users' own models (the test suite uses the same ones).

>>> errors = assert_equivariant(lambda x, pos, e: model(x, edge_index, pos, e), node_feats, pos, edge_feats)

Rotations are random (from a seeded generator), their Wigner-D matrices are computed in float64 by a
least-squares fit of e3nn's spherical harmonics (exact to ~1e-15, unlike angle-based constructions), and the
error is reported per output degree, relative to the output's scale.
"""
from __future__ import annotations

from typing import Callable, Dict, Mapping, Optional, Union

import torch
from e3nn import o3
from torch import Tensor

from .fiber import Features

__all__ = ["FLOAT_TOLERANCE", "random_rotation", "wigner_D", "rotate_features", "equivariance_error",
           "assert_equivariant"]

#: Default tolerance on the relative equivariance error, per dtype.
FLOAT_TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float32: 1e-5, torch.float64: 1e-10}


def random_rotation(generator: Optional[torch.Generator] = None, dtype=torch.float64) -> Tensor:
    """A uniformly random rotation matrix ``[3, 3]`` (unit quaternion from a Gaussian), ``det = +1``."""
    q = torch.randn(4, generator=generator, dtype=torch.float64)
    w, x, y, z = q / q.norm()
    R = torch.stack([
        torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)]),
        torch.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)]),
        torch.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]),
    ])
    return R.to(dtype)


def wigner_D(degree: int, R: Tensor) -> Tensor:
    """The ``[2d+1, 2d+1]`` matrix by which e3nn's degree-``d`` features rotate under ``R`` (float64).

    Defined by ``Y_d(R x) = D Y_d(x)``; a degree-1 feature rotates as the vector itself (``D_1 = R``).
    """
    R = R.to(torch.float64)
    if degree == 0:
        return torch.ones(1, 1, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1234)
    points = torch.randn(8 * (2 * degree + 1), 3, generator=gen, dtype=torch.float64)
    Y = o3.spherical_harmonics(degree, points, normalize=True)
    Y_rot = o3.spherical_harmonics(degree, points @ R.T, normalize=True)
    return torch.linalg.lstsq(Y, Y_rot).solution.T


def rotate_features(features: Mapping[int, Tensor], R: Tensor) -> Dict[int, Tensor]:
    """Rotate ``{d: [..., C, 2d+1]}``: ``x @ D_d(R).T`` on the component axis."""
    R = R.detach().to("cpu", torch.float64)  # the small Wigner matrices are made on CPU, then sent to each x
    return {d: (x.to(torch.float64) @ wigner_D(d, R).T.to(x.device)).to(x.dtype) for d, x in features.items()}


def _as_dict(out: Union[Tensor, Features], output_degree: Optional[int]) -> Dict[int, Tensor]:
    if isinstance(out, Tensor):
        if output_degree is None:  # invariant output without a component axis (e.g. pooled scalars)
            return {0: out.unsqueeze(-1)}
        return {output_degree: out}
    if not isinstance(out, Mapping):
        raise TypeError(f"the function must return a Tensor or a dict {{degree: Tensor}}, got {type(out).__name__}")
    return dict(out)


def equivariance_error(fn: Callable[..., Union[Tensor, Features]], node_feats: Features, pos: Tensor,
                       edge_feats: Optional[Features] = None, *, output_degree: Optional[int] = None,
                       num_rotations: int = 3, translate: bool = True, seed: int = 0) -> Dict[int, float]:
    """Worst relative error per output degree of ``fn(node_feats, pos, edge_feats)`` over random rigid motions.

    ``error[d] = max |fn(g x)[d] - g fn(x)[d]| / max |fn(x)[d]|`` over ``num_rotations`` random rotations
    (each with a random translation of ``pos`` when ``translate``).
    """
    edge_feats = edge_feats or {}
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        reference = _as_dict(fn(node_feats, pos, edge_feats), output_degree)
    errors = {d: 0.0 for d in reference}
    for _ in range(num_rotations):
        R = random_rotation(gen)
        t = torch.randn(3, generator=gen, dtype=torch.float64) * 3 if translate else torch.zeros(3, dtype=torch.float64)
        pos_g = (pos.to(torch.float64) @ R.T.to(pos.device) + t.to(pos.device)).to(pos.dtype)
        with torch.no_grad():
            out_g = _as_dict(fn(rotate_features(node_feats, R), pos_g, rotate_features(edge_feats, R)), output_degree)
        expected = rotate_features(reference, R)
        for d, y in out_g.items():
            scale = reference[d].abs().max().item() if reference[d].numel() else 1.0
            diff = (y.to(torch.float64) - expected[d].to(torch.float64)).abs().max().item() if y.numel() else 0.0
            errors[d] = max(errors[d], diff / max(scale, 1e-30))
    return errors


def assert_equivariant(fn: Callable[..., Union[Tensor, Features]], node_feats: Features, pos: Tensor,
                       edge_feats: Optional[Features] = None, *, output_degree: Optional[int] = None,
                       num_rotations: int = 3, translate: bool = True, tolerance: Optional[float] = None,
                       seed: int = 0) -> Dict[int, float]:
    """Raise ``AssertionError`` if :func:`equivariance_error` exceeds ``tolerance`` for any output degree.

    The default tolerance is :data:`FLOAT_TOLERANCE` of ``pos.dtype``. Returns the errors per degree.
    """
    errors = equivariance_error(fn, node_feats, pos, edge_feats, output_degree=output_degree,
                                num_rotations=num_rotations, translate=translate, seed=seed)
    tol = FLOAT_TOLERANCE[pos.dtype] if tolerance is None else tolerance
    bad = {d: e for d, e in errors.items() if not e <= tol}
    if bad:
        hint = ("; a Tensor output is checked as invariant unless output_degree is given (a degree-d output "
                "[..., 2d+1] needs output_degree=d)" if output_degree is None and list(errors) == [0] else "")
        raise AssertionError(f"not equivariant: relative error per degree {bad} exceeds {tol:g} "
                             f"(all degrees: {errors}){hint}")
    return errors
