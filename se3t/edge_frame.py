"""The TFN kernel in each edge's own frame (``FuseLevel.EDGE_FRAME``): an exact reparametrisation, no basis.

The kernel of a degree pair is equivariant, ``B(r̂) = D_in(g) B(ŷ) D_out(g)^T`` for any rotation ``g`` with
``g ŷ = r̂`` (``D``: e3nn's Wigner matrices; rows are ``m_in``, columns ``m_out``). Rotating the input features
into the edge's frame, ``x' = x @ D_in``, applying the constant kernel ``B(ŷ)`` and rotating back,
``out = out' @ D_out^T``, gives exactly the TFN message. ``B(ŷ)`` only couples the components ``±m`` of the
two degrees (e3nn's ``ŷ`` is the polar axis), and over the radial frequencies ``f`` it spans, for each
``m > 0``, the matrices ``[[a, -c], [c, a]]`` acting on ``(x'_{+m}, x'_{-m})`` (a scalar ``a`` for ``m = 0``).
So with the radial weights mapped once per forward from frequencies to these slots (:func:`so2_coefficients`,
``(a_0, a_1, c_1, a_2, c_2, ...)``: as many as frequencies), the messages of one ``m`` over all degree pairs
are one small matrix product per edge, of width ``2`` instead of ``2*d_out+1``, and no per-edge basis exists:
the contraction costs about a third of the basis path's and the bases are replaced by the rotations
(152 numbers per edge at degree 3, against 1,092 basis values).

Frames need the edge directions; they are read from the harmonics a :class:`~se3t.basis.Basis` holds
(``Y_1 ∝ r̂``), with each edge's harmonics scale (0 on padding edges). Harmonics that are not a scaled
``Y(r̂)`` (zero-length edges: ``Y_0`` only) have no frame: :func:`edge_frames` returns ``None`` and the
convolution uses the basis path.

Gradients with respect to positions (forces) flow through the frames when the harmonics require them: a frame
is defined up to a turn about the polar axis (the gauge), and the messages do not depend on it, so a change
``dr̂ = ω × r̂`` of the direction acts on the frames as the rotation ``ω``, ``dF_l = (ω · X_l) F_l`` (``X_l``: e3nn's
generators), whose torque ``g_k = Σ_l <G_l F_l^T, X_lk>`` gives the direction's gradient ``g × r̂``: no derivative
of the angles, which has none on the polar axis (:class:`_FrameRotations`).
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

import torch
from e3nn import o3
from torch import Tensor

from ._validate import defer_check, value_check_mode

__all__ = ["EdgeFrames", "edge_frames", "so2_coefficients", "frame_rows", "num_slots"]

#: Largest deviation (relative to the harmonics' scale) of the given harmonics from ``s * Y(r̂)`` accepted
#: for frames: float32 rounding is ~1e-7; anything larger is not a set of spherical harmonics.
HARMONICS_TOLERANCE = 1e-4


def num_slots(m: int) -> int:
    """Weights per channel pair and input degree at order ``m``: ``a_0`` for ``m = 0``, ``(a_m, c_m)`` else."""
    return 1 if m == 0 else 2


@functools.lru_cache(maxsize=None)
def _so2_coefficients_float64(d_in: int, d_out: int) -> Tensor:
    from .basis import get_basis  # noqa: PLC0415  (basis imports this module)

    y_axis = torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64)
    B = get_basis(y_axis, max(d_in, d_out), input_degrees=[d_in])[(d_in, d_out)][0]  # [2d_in+1, F, 2d_out+1]
    rows = [B[d_in, :, d_out]]
    for m in range(1, min(d_in, d_out) + 1):
        rows += [B[d_in + m, :, d_out + m], B[d_in + m, :, d_out - m]]
    return torch.stack(rows)  # [F slots, F frequencies]


def so2_coefficients(d_in: int, d_out: int) -> Tensor:
    """``T [F, F]`` (float64): the edge-frame slot weights ``(a_0, a_1, c_1, ...)`` of the pair are ``T @ R_f``
    for the radial weights ``R_f`` of its frequencies ``f``."""
    return _so2_coefficients_float64(int(d_in), int(d_out)).clone()


class EdgeFrames(NamedTuple):
    """Per-edge rotations into the edge frame: ``rot[l] [E, 2l+1, 2l+1]`` (``x' = x @ rot[l]``) and the
    rotations back with the harmonics' scale, ``back[l] = (s * rot[l])^T`` (``out = out' @ back[l]``); zero on
    padding edges. Where ``s`` is one, ``back[l]`` is a transposed view of ``rot[l]`` (no second copy)."""

    rot: List[Tensor]
    back: List[Tensor]

    def index_select(self, edges: Tensor) -> "EdgeFrames":
        """The frames of ``edges`` (int64 ``[E']``); a ``back`` that is a view of its ``rot`` stays one."""
        rot = [r.index_select(0, edges) for r in self.rot]
        back = [s.transpose(1, 2) if _transposed_view(b, r) else b.index_select(0, edges)
                for b, r, s in zip(self.back, self.rot, rot)]
        return EdgeFrames(rot, back)


def _transposed_view(b: Tensor, r: Tensor) -> bool:
    """Whether ``b`` is ``r.transpose(1, 2)`` (the same memory)."""
    t = r.transpose(1, 2)
    return b.data_ptr() == t.data_ptr() and b.shape == t.shape and b.stride() == t.stride()


def _trig(theta: Tensor, l: int) -> Tensor:
    """``[..., 2l+1]``: ``1, cos(m θ), sin(m θ)`` for ``m = 1..l``."""
    m = torch.arange(1, l + 1, dtype=theta.dtype, device=theta.device)
    mt = theta[..., None] * m
    return torch.cat([torch.ones_like(theta)[..., None], mt.cos(), mt.sin()], dim=-1)


@contextlib.contextmanager
def _float64_default() -> Iterator[None]:
    """e3nn builds its generators (and so its Wigner matrices) in the default dtype: float64 within."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@functools.lru_cache(maxsize=None)
def _rotation_terms(l: int, axis: int) -> Tensor:
    """``[2l+1, (2l+1)**2]``: a rotation by ``θ`` about e3nn's y (``axis=0``) or x (``axis=1``) axis in degree
    ``l`` is ``_trig(θ, l) @ terms`` (its entries are trigonometric polynomials of order ``l``): fitted exactly
    from e3nn's Wigner matrices at ``2l+1`` angles, where these functions are independent."""
    theta = torch.arange(2 * l + 1, dtype=torch.float64) * (2 * math.pi / (2 * l + 1))
    zero = torch.zeros_like(theta)
    with _float64_default():
        D = o3.wigner_D(l, theta, zero, zero) if axis == 0 else o3.wigner_D(l, zero, theta, zero)
    return torch.linalg.solve(_trig(theta, l), D.reshape(2 * l + 1, -1))


@functools.lru_cache(maxsize=None)
def _generators(l: int) -> Tensor:
    """``[(2l+1)**2, 3]`` (float64): e3nn's generators ``X_lk`` of degree ``l`` about x, y, z, flattened (one
    column each): ``D_l(exp(t K_k)) = exp(t X_lk)`` for the rotation ``exp(t K_k)`` about axis ``k``
    (``K_k v = e_k × v``)."""
    with _float64_default():
        return o3.so3_generators(l).reshape(3, -1).t().contiguous()


_constants_on: Dict[Tuple[Callable[..., Tensor], tuple, torch.dtype, torch.device], Tensor] = {}


def _constant_like(make: Callable[..., Tensor], args: tuple, like: Tensor) -> Tensor:
    """``make(*args)`` (a float64 constant) in ``like``'s dtype and device, copied there once (no host-to-device
    copy per call, which CUDA graph capture would refuse)."""
    key = (make, args, like.dtype, like.device)
    if key not in _constants_on:
        with torch.inference_mode(False):
            _constants_on[key] = make(*args).to(like.device, like.dtype)
    return _constants_on[key]


def _wigner(l: int, alpha: Tensor, beta: Tensor) -> Tensor:
    """e3nn's ``wigner_D(l, alpha, beta, 0)`` (``[E, 2l+1, 2l+1]``, in the angles' dtype) without its matrix
    exponentials."""
    L = 2 * l + 1
    about_y = (_trig(alpha, l) @ _constant_like(_rotation_terms, (l, 0), alpha)).view(-1, L, L)
    about_x = (_trig(beta, l) @ _constant_like(_rotation_terms, (l, 1), alpha)).view(-1, L, L)
    return torch.bmm(about_y, about_x)


def _rotations(unit: Tensor, max_degree: int) -> List[Tensor]:
    """``[D_l(R) for l <= max_degree]`` (``[E, 2l+1, 2l+1]``) for the rotations ``R = R_y(α) R_x(β)`` taking e3nn's
    polar axis ``ŷ`` to the unit vectors ``unit [E, 3]``."""
    x, y, z = unit.unbind(1)
    alpha, beta = torch.atan2(x, z), torch.atan2(torch.hypot(x, z), y)
    return [_wigner(l, alpha, beta) for l in range(max_degree + 1)]


class _FrameRotations(torch.autograd.Function):
    """:func:`_rotations` with the gradient of the frames' gauge-invariant functions (see the module docstring):
    exact for any loss that does not change when every frame turns about the polar axis, ``F_l -> F_l D_l(S)``,
    as the edge-frame messages (whose kernel commutes with those turns); other functions of the frames get no
    meaningful gradient here. The backward is made of differentiable ops: second derivatives (training on forces)
    go through it again."""

    @staticmethod
    def forward(ctx, unit: Tensor, max_degree: int):
        rot = _rotations(unit, max_degree)
        ctx.save_for_backward(unit, *rot)
        return tuple(rot)

    @staticmethod
    def backward(ctx, *grads: Optional[Tensor]):
        unit, *rot = ctx.saved_tensors
        torque = None
        for l in range(1, len(rot)):
            if grads[l] is None:
                continue
            L = 2 * l + 1
            G = torch.bmm(grads[l], rot[l].transpose(1, 2)).reshape(unit.shape[0], L * L)  # G_l F_l^T
            part = G @ _constant_like(_generators, (l,), G)
            torque = part if torque is None else torque + part
        if torque is None:
            return None, None
        # dr̂ = ω × r̂ with ω = r̂ × dr̂; ``unit`` is scaled out exactly (the frames depend on its direction only)
        return torch.linalg.cross(torque, unit, dim=1) / (unit * unit).sum(1, keepdim=True), None


def edge_frames(harmonics: Tensor, max_degree: int, from_edge_vectors: bool = False) -> Optional[EdgeFrames]:
    """The frames of edges whose harmonics ``[E, (2*max_degree+1)**2]`` are ``s * Y(r̂)`` (``s >= 0``; ``s = 0``:
    padding), or ``None`` when some edge's are not (zero-length edges). Computed in float64 (float32 on MPS,
    which has no float64), returned in the harmonics' dtype (at least float32).

    ``from_edge_vectors``: the harmonics are :func:`se3t.basis.spherical_harmonics` of edge vectors (what
    :func:`se3t.basis.get_basis` makes), so only a zero-length edge (``Y_0`` with a zero direction) can lack a
    frame: that is checked instead of rebuilding every degree from the direction (hundreds of small kernels).

    When ``harmonics`` require gradients (and grad mode is on), the frames carry them (forces: see the module
    docstring); else they are constants."""
    with torch.set_grad_enabled(harmonics.requires_grad and torch.is_grad_enabled()):
        return _edge_frames(harmonics, max_degree, from_edge_vectors)


def _edge_frames(harmonics: Tensor, max_degree: int, from_edge_vectors: bool) -> Optional[EdgeFrames]:
    differentiable = torch.is_grad_enabled()
    sh = harmonics.to(torch.float32 if harmonics.device.type == "mps" else torch.float64)
    dtype = torch.promote_types(harmonics.dtype, torch.float32)
    scale = sh[:, 0] * math.sqrt(4 * math.pi)  # Y_0 = 1/sqrt(4 pi)
    if max_degree == 0:  # scalars only: no rotation, the scale is all there is
        return EdgeFrames([torch.ones_like(sh).view(-1, 1, 1).to(dtype)], [scale.view(-1, 1, 1).to(dtype)])
    direction = sh[:, 1:4]  # Y_1 = sqrt(3 / (4 pi)) * (x, y, z)
    norm = direction.norm(dim=1, keepdim=True)
    # A zero direction (padding, or a zero-length edge's Y_0-only harmonics) gets the polar axis: padding still
    # matches (scale 0), a zero-length edge does not (it has no frame).
    polar = (torch.arange(3, device=sh.device) == 1).to(sh.dtype).view(1, 3)  # made on the device: capturable
    unit = torch.where(norm > 0, direction / norm.clamp_min(1e-300), polar)
    mode = value_check_mode(sh) if sh.shape[0] else "skip"
    if mode != "skip":
        with torch.no_grad():
            if from_edge_vectors:
                ok = ~((scale != 0) & (norm[:, 0] == 0)).any()
            else:
                rebuilt = scale[:, None] * o3.spherical_harmonics(list(range(2 * max_degree + 1)), unit,
                                                                  normalize=False, normalization="integral")
                ok = (rebuilt - sh).abs().max() <= HARMONICS_TOLERANCE * scale.abs().max().clamp_min(1.0)
        if mode == "now" and not bool(ok):
            return None
        if mode == "defer":  # no fallback to the basis path inside a CUDA graph: the replay reports such edges
            defer_check(ok, "some edge has no edge frame (a zero-length edge: coincident points); the EDGE_FRAME "
                            "level cannot fall back to the basis path inside a CUDA graph: use fuse_level FULL or "
                            "drop such edges")
    live = (scale > 0).to(sh.dtype).detach().view(-1, 1, 1)
    rot = _FrameRotations.apply(unit, max_degree) if differentiable else _rotations(unit, max_degree)
    rot = [r * live for r in rot]
    if from_edge_vectors:
        # Harmonics of edge vectors have s = 1 on every edge but padding (their Y_0 differs from 1/sqrt(4 pi) by
        # rounding only): the rotations back are the frames' transposes, kept as views of them.
        rot = [r.to(dtype) for r in rot]
        return EdgeFrames(rot, [r.transpose(1, 2) for r in rot])
    back = [(r * scale.view(-1, 1, 1)).transpose(1, 2).contiguous() for r in rot]
    return EdgeFrames([r.to(dtype) for r in rot], [b.to(dtype) for b in back])


def frame_rows(rot: Tensor, l: int, m: int) -> Tensor:
    """The fused kernel's basis of input degree ``l`` at order ``m``: ``[E, K*S, 2l+1]`` with rows ``(k, slot)``
    (``k``: output components ``+m, -m``; ``K = S = 1`` for ``m = 0``), so that ``rows @ x^T`` holds, per
    output component, the rotated inputs each slot multiplies: ``+m: (x'_{+m}, -x'_{-m})``,
    ``-m: (x'_{-m}, x'_{+m})``. ``rot``: the frame rotation of degree ``l`` ``[E, 2l+1, 2l+1]``."""
    if m == 0:
        return rot[:, :, l:l + 1].transpose(1, 2).contiguous()
    plus, minus = rot[:, :, l + m], rot[:, :, l - m]
    return torch.stack([plus, -minus, minus, plus], dim=1)

