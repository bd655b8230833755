"""Equivariant kernel bases: spherical harmonics of the edge direction times Clebsch–Gordan coefficients.

For an input degree ``d_in`` and output degree ``d_out`` the basis of an edge is

    B[e, m_in, f, m_out] = sum_m Y_J[e, m] * CG_J[m, m_in, m_out],   J = |d_in - d_out| + f,

with ``Y_J`` e3nn's real spherical harmonics (``normalize=True``, ``normalization='integral'``) of
``rel_pos = pos[dst] - pos[src]`` and ``CG_J = e3nn.o3.wigner_3j(J, d_in, d_out)``. All pairs of one edge set
are produced by a single GEMM ``Y @ M`` with a constant, cached matrix ``M``.

Layout: one contiguous block per input degree, ``[E, 2*d_in+1, W_in]`` with columns ordered by
``(d_out, f, m_out)``; every pair is a strided view of its block (no copies). The fused convolution reads each
pair in its own layout, :meth:`Basis.kernel_major` (a cached copy).

:func:`get_basis` keeps only the spherical harmonics ``Y [E, (2*max_degree+1)**2]`` (49 numbers per edge for
degree 3 instead of 1,092) and makes the blocks on first use. The fused convolution never asks for them: it
projects ``Y`` onto each edge chunk's bases itself (:func:`kernel_projection`), so with every conv at
``FuseLevel.FULL`` no per-edge basis is ever stored; at ``FuseLevel.EDGE_FRAME`` (the default) the convolution
uses the edges' frame rotations instead (:meth:`Basis.edge_frames`, :mod:`se3t.edge_frame`), read off ``Y``.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple

import torch
from e3nn import o3
from torch import Tensor

from .edge_frame import EdgeFrames, edge_frames, frame_rows
from .fiber import degree_to_dim

__all__ = [
    "Basis",
    "get_basis",
    "kernel_projection",
    "clebsch_gordan",
    "spherical_harmonics",
    "num_frequencies",
    "safe_norm",
]

Pair = Tuple[int, int]


def num_frequencies(d_in: int, d_out: int) -> int:
    """Number of ``J`` values (radial frequencies) of the pair: ``2 * min(d_in, d_out) + 1``."""
    return 2 * min(d_in, d_out) + 1


@functools.lru_cache(maxsize=None)
def _cg_float64(J: int, d_in: int, d_out: int) -> Tensor:
    return o3.wigner_3j(J, d_in, d_out, dtype=torch.float64)


def clebsch_gordan(J: int, d_in: int, d_out: int) -> Tensor:
    """Clebsch–Gordan coefficients ``[2J+1, 2d_in+1, 2d_out+1]`` in float64 (computed once, cached).

    These are e3nn's ``wigner_3j(J, d_in, d_out)`` as in e3nn >= 0.5. (e3nn 0.3.3 differs by a sign for
    a few triples; :mod:`se3t.compat.nvidia` absorbs that sign into converted weights.)
    """
    if not abs(d_in - d_out) <= J <= d_in + d_out:
        raise ValueError(f"J={J} violates the triangle rule for degrees ({d_in}, {d_out})")
    return _cg_float64(J, d_in, d_out).clone()


def safe_norm(vectors: Tensor, eps: float = 1e-20) -> Tuple[Tensor, Tensor]:
    """Euclidean norm over the last axis with a finite gradient at zero.

    Returns ``(norm [..., 1], is_zero [..., 1])``; zero-length vectors get norm 0 and zero gradient.
    """
    sq = vectors.pow(2).sum(-1, keepdim=True)
    is_zero = sq <= eps
    norm = torch.where(is_zero, torch.zeros_like(sq), sq.clamp_min(eps).sqrt())
    return norm, is_zero


def spherical_harmonics(rel_pos: Tensor, max_J: int) -> Tensor:
    """Real spherical harmonics ``[E, (max_J+1)**2]`` of the edge directions, degrees ``0..max_J``.

    Zero-length edges get ``Y_0`` and zeros for ``J > 0`` (the value of the homogeneous polynomials at 0),
    with zero gradient, instead of NaN.
    """
    norm, is_zero = safe_norm(rel_pos)
    unit_dir = rel_pos / torch.where(is_zero, torch.ones_like(norm), norm)
    sh = o3.spherical_harmonics(list(range(max_J + 1)), unit_dir, normalize=False, normalization="integral")
    if max_J > 0:
        # Degrees J > 0 are homogeneous polynomials of the direction: 0 at the zero vector.
        higher = torch.arange(sh.shape[-1], device=sh.device) > 0  # no element writes: capturable in CUDA graphs
        sh = torch.where(is_zero & higher, torch.zeros_like(sh), sh)
    return sh


@functools.lru_cache(maxsize=None)
def _layout(max_degree: int) -> Tuple[Dict[Pair, Tuple[int, int, int]], Dict[int, int]]:
    """Column offsets: pair -> (offset within its input block, F, 2d_out+1); d_in -> block width."""
    offsets: Dict[Pair, Tuple[int, int, int]] = {}
    widths: Dict[int, int] = {}
    for d_in in range(max_degree + 1):
        col = 0
        for d_out in range(max_degree + 1):
            F, K = num_frequencies(d_in, d_out), degree_to_dim(d_out)
            offsets[(d_in, d_out)] = (col, F, K)
            col += F * K
        widths[d_in] = col
    return offsets, widths


@functools.lru_cache(maxsize=None)
def _projection_float64(max_degree: int, d_in: int) -> Tensor:
    """Constant ``M [(2*max_degree+1)**2, (2d_in+1) * W_in]`` with ``basis_block = Y @ M``."""
    offsets, widths = _layout(max_degree)
    L = degree_to_dim(d_in)
    num_sh = (2 * max_degree + 1) ** 2
    M = torch.zeros(num_sh, L, widths[d_in], dtype=torch.float64)
    for d_out in range(max_degree + 1):
        col, F, K = offsets[(d_in, d_out)]
        for f, J in enumerate(range(abs(d_in - d_out), d_in + d_out + 1)):
            cg = _cg_float64(J, d_in, d_out)  # [2J+1, L, K]
            M[J * J:(J + 1) * (J + 1), :, col + f * K: col + (f + 1) * K] = cg
    return M.reshape(num_sh, -1)


_projection_cache: Dict[Tuple[int, int, torch.dtype, torch.device], Tensor] = {}


def _projection(max_degree: int, d_in: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    key = (max_degree, d_in, dtype, device)
    if key not in _projection_cache:
        with torch.inference_mode(False):  # a cached constant must be a normal tensor, usable with autograd later
            _projection_cache[key] = _projection_float64(max_degree, d_in).to(device=device, dtype=dtype)
    return _projection_cache[key]


@functools.lru_cache(maxsize=None)
def _kernel_projection_float64(d_out: int, d_ins: Tuple[int, ...]) -> Tensor:
    K = degree_to_dim(d_out)
    rows = (max(d_ins) + d_out + 1) ** 2  # harmonics of degree J <= d_in + d_out only
    parts = []
    for d_in in d_ins:
        offsets, widths = _layout(max(d_ins + (d_out,)))
        col, F, _ = offsets[(d_in, d_out)]
        L = degree_to_dim(d_in)
        M = _projection_float64(max(d_ins + (d_out,)), d_in).view(-1, L, widths[d_in])[:rows, :, col:col + F * K]
        parts.append(M.reshape(rows, L, F, K).permute(0, 3, 2, 1).reshape(rows, K * F * L))
    return torch.cat(parts, dim=1)


_kernel_projection_cache: Dict[Tuple[int, Tuple[int, ...], torch.dtype, torch.device], Tensor] = {}


def kernel_projection(d_out: int, d_ins: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Constant ``M [(max(d_ins) + d_out + 1)**2, sum_d_in (2d_out+1) * F * (2d_in+1)]`` such that
    ``(Y[:, :rows] @ M)`` holds, side by side, the :meth:`Basis.kernel_major` layout ``[E, (2d_out+1) * F,
    2d_in+1]`` of every pair ``(d_in, d_out)`` in the order of ``d_ins`` (each flattened). ``Y``: the
    harmonics of :attr:`Basis.harmonics`. Cached per dtype and device."""
    key = (int(d_out), tuple(int(d) for d in d_ins), dtype, device)
    if key not in _kernel_projection_cache:
        with torch.inference_mode(False):  # a normal tensor, usable with autograd later
            _kernel_projection_cache[key] = _kernel_projection_float64(key[0], key[1]).to(device=device, dtype=dtype)
    return _kernel_projection_cache[key]


class Basis(Mapping):
    """Kernel bases of one edge set: a read-only mapping ``(d_in, d_out) -> Tensor[E, 2d_in+1, F, 2d_out+1]``.

    Internally one block per input degree (see the module docstring); :meth:`pair_matrix` gives the
    ``[E, 2d_in+1, F*(2d_out+1)]`` view, :meth:`kernel_major` the fused convolution's layout.
    Build with :func:`get_basis` (holds only the harmonics, :attr:`harmonics`; the blocks are made on first use),
    from a plain dict with :meth:`from_pairs`, join per-molecule bases with :meth:`cat`.
    """

    def __init__(self, blocks: Dict[int, Tensor], max_degree: int):
        self.max_degree = max_degree
        self._blocks: Optional[Dict[int, Tensor]] = dict(blocks)
        self._harmonics: Optional[Tensor] = None
        self._degrees = tuple(sorted(self._blocks))
        self._offsets, self._widths = _layout(max_degree)
        self._kernel_major: Dict[Pair, Tensor] = {}
        # frames and frame rows, made on first use: constants (False) and, for forces, with gradients (True)
        self._frames: Dict[bool, Tuple[Optional[EdgeFrames], Dict[Tuple[int, int], Tensor]]] = {}
        self._from_edge_vectors = False  # harmonics made by get_basis (see se3t.edge_frame.edge_frames)
        for d_in, block in self._blocks.items():
            expected = (degree_to_dim(d_in), self._widths[d_in])
            if block.dim() != 3 or tuple(block.shape[1:]) != expected:
                raise ValueError(f"basis block for d_in={d_in} must be [E, {expected[0]}, {expected[1]}], "
                                 f"got {list(block.shape)}")

    @classmethod
    def from_harmonics(cls, harmonics: Tensor, max_degree: int, input_degrees: Optional[Sequence[int]] = None
                       ) -> "Basis":
        """A basis held as its spherical harmonics ``[E, (2*max_degree+1)**2]`` (see :func:`spherical_harmonics`);
        the blocks of ``input_degrees`` (default: all) are made on first use."""
        num_sh = (2 * max_degree + 1) ** 2
        if harmonics.dim() != 2 or harmonics.shape[1] != num_sh:
            raise ValueError(f"harmonics for max_degree={max_degree} must be [E, {num_sh}], "
                             f"got {list(harmonics.shape)}")
        degrees = tuple(range(max_degree + 1)) if input_degrees is None else tuple(sorted(set(input_degrees)))
        if not degrees or degrees[0] < 0 or degrees[-1] > max_degree:
            raise ValueError(f"input_degrees must be within 0..{max_degree}, got {input_degrees}")
        basis = cls({}, max_degree)
        basis._blocks, basis._harmonics, basis._degrees = None, harmonics, degrees
        return basis

    @property
    def input_degrees(self) -> Tuple[int, ...]:
        """The input degrees this basis serves (its blocks' ``d_in``)."""
        return self._degrees

    @property
    def harmonics(self) -> Optional[Tensor]:
        """The spherical harmonics ``[E, (2*max_degree+1)**2]`` this basis was made from, or ``None`` when it was
        built from blocks (:meth:`from_pairs`, :meth:`cat` of such bases)."""
        return self._harmonics

    @property
    def blocks(self) -> Dict[int, Tensor]:
        """``{d_in: [E, 2d_in+1, W_in]}``: made from the harmonics on first use and kept when that is safe (same
        rules as :meth:`kernel_major`)."""
        if self._blocks is not None:
            return self._blocks
        sh = self._harmonics
        with torch.autocast(device_type=sh.device.type, enabled=False):
            blocks = {d: (sh @ _projection(self.max_degree, d, sh.dtype, sh.device)).view(
                sh.shape[0], degree_to_dim(d), self._widths[d]) for d in self._degrees}
        made = next(iter(blocks.values()))
        if made.requires_grad == sh.requires_grad and made.is_inference() == sh.is_inference():
            self._blocks = blocks
        return blocks

    # Mapping interface --------------------------------------------------------------------------------------
    def __getitem__(self, pair: Pair) -> Tensor:
        d_in, d_out = pair
        mat = self.pair_matrix(d_in, d_out)
        _, F, K = self._offsets[(d_in, d_out)]
        return mat.unflatten(-1, (F, K))

    def __iter__(self) -> Iterator[Pair]:
        return iter((d_in, d_out) for d_in in self._degrees for d_out in range(self.max_degree + 1))

    def __len__(self) -> int:
        return len(self._degrees) * (self.max_degree + 1)

    # Views used by the convolution ---------------------------------------------------------------------------
    @property
    def num_edges(self) -> int:
        if self._harmonics is not None:
            return self._harmonics.shape[0]
        return next(iter(self._blocks.values())).shape[0]

    def pair_matrix(self, d_in: int, d_out: int) -> Tensor:
        """``[E, 2d_in+1, F*(2d_out+1)]`` (a strided view of the input block)."""
        if d_in not in self._degrees or d_out > self.max_degree:
            raise KeyError(f"basis has no pair ({d_in}, {d_out}); it was built for max_degree={self.max_degree}")
        col, F, K = self._offsets[(d_in, d_out)]
        return self.blocks[d_in][:, :, col: col + F * K]

    def kernel_major(self, d_in: int, d_out: int) -> Tensor:
        """``[E, (2d_out+1) * F, 2d_in+1]``, rows ordered ``(m_out, f)``: the layout of the fused conv
        (:mod:`se3t.nn.fused`), where ``Bt @ x^T`` is directly component-major ``[E, 2d_out+1, F * C]``.

        A contiguous copy, kept for later calls only when the bases do not require gradients (forces: a cached
        copy made under no_grad would silently drop them, one made with grad could not be backpropagated twice)
        and it is no inference tensor made from normal ones.
        """
        key = (d_in, d_out)
        cached = self._kernel_major.get(key)
        if cached is not None:
            return cached
        mat = self.pair_matrix(d_in, d_out)
        _, F, K = self._offsets[key]
        E, L = mat.shape[0], mat.shape[1]
        out = mat.reshape(E, L, F, K).permute(0, 3, 2, 1).reshape(E, K * F, L).contiguous()
        if not mat.requires_grad and out.is_inference() == mat.is_inference():
            self._kernel_major[key] = out
        return out

    def edge_frames(self) -> Optional[EdgeFrames]:
        """The edges' frame rotations (:func:`se3t.edge_frame.edge_frames`), or ``None`` when this basis holds no
        harmonics or they have no frame (zero-length edges). Made once and kept (as normal tensors even under
        ``inference_mode``, so the same basis serves inference and training): constants, or, while the harmonics
        require gradients and grad mode is on, frames that carry them (forces; made then, kept beside)."""
        return self._edge_frame_state()[0]

    @property
    def frames_orthogonal(self) -> bool:
        """Whether the frames' rotations back are the rotations transposed (harmonics of edge vectors, made by
        :func:`get_basis`: ``s = 1``), so ``back[l] @ back[l]^T`` is the identity (zero on padding edges). A
        plain attribute: read without a graph break under ``torch.compile``."""
        return self._from_edge_vectors

    def frame_rows(self, d_in: int, m: int) -> Tensor:
        """The fused kernel's edge-frame basis of ``d_in`` at order ``m`` (:func:`se3t.edge_frame.frame_rows`),
        made from the frames on first use and kept; only valid when :meth:`edge_frames` is not ``None``."""
        rows = self._edge_frame_state()[1]
        return rows[(d_in, m)] if (d_in, m) in rows else self._make_frame_rows(d_in, m)

    @torch.compiler.disable  # a constant of the edge set, kept: made outside any traced graph
    def _make_frame_rows(self, d_in: int, m: int) -> Tensor:
        frames, rows = self._edge_frame_state()
        with torch.inference_mode(False):
            rows[(d_in, m)] = frame_rows(frames.rot[d_in], d_in, m)
        return rows[(d_in, m)]

    @torch.compiler.disable  # made once per edge set (one host sync): a graph break, not a traced recompute
    def _edge_frame_state(self) -> Tuple[Optional[EdgeFrames], Dict[Tuple[int, int], Tensor]]:
        sh = self._harmonics
        with_grad = sh is not None and sh.requires_grad and torch.is_grad_enabled()
        # without grad mode, frames made with gradients serve as well (the same values)
        state = self._frames.get(with_grad) or (None if with_grad else self._frames.get(True))
        if state is None:
            # normal tensors, usable under either mode later (leaving inference mode turns grad mode on: set again)
            with torch.inference_mode(False), torch.set_grad_enabled(with_grad):
                frames = None if sh is None else edge_frames(sh, self.max_degree, self._from_edge_vectors)
            state = self._frames[with_grad] = (frames, {})  # rows are made on first use (frame_rows)
        return state

    # Construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_pairs(cls, pairs: Mapping[Pair, Tensor], max_degree: Optional[int] = None) -> "Basis":
        """From a plain dict ``{(d_in, d_out): [E, 2d_in+1, F, 2d_out+1]}`` (e.g. precomputed and collated)."""
        if isinstance(pairs, Basis):
            return pairs
        if not pairs:
            raise ValueError("basis dict is empty")
        keys = [tuple(int(v) for v in (k.split(",") if isinstance(k, str) else k)) for k in pairs]
        if max_degree is None:
            max_degree = max(max(k) for k in keys)
        by_key = {k: v for k, v in zip(keys, pairs.values())}
        blocks = {}
        for d_in in range(max_degree + 1):
            parts = []
            for d_out in range(max_degree + 1):
                t = by_key.get((d_in, d_out))
                if t is None:
                    break
                F, K = num_frequencies(d_in, d_out), degree_to_dim(d_out)
                if t.dim() != 4 or tuple(t.shape[1:]) != (degree_to_dim(d_in), F, K):
                    raise ValueError(f"basis[({d_in}, {d_out})] must be [E, {degree_to_dim(d_in)}, {F}, {K}], "
                                     f"got {list(t.shape)}")
                parts.append(t.reshape(t.shape[0], degree_to_dim(d_in), F * K))
            else:
                blocks[d_in] = torch.cat(parts, dim=-1)
        return cls(blocks, max_degree)

    @classmethod
    def cat(cls, bases: Sequence["Basis"]) -> "Basis":
        """Concatenate the bases of several edge sets along the edge axis (batching)."""
        if not bases:
            raise ValueError("cannot concatenate an empty list of bases")
        max_degree = bases[0].max_degree
        if any(b.max_degree != max_degree for b in bases):
            raise ValueError("cannot concatenate bases of different max_degree")
        if all(b.harmonics is not None and b._degrees == bases[0]._degrees for b in bases):
            return cls.from_harmonics(torch.cat([b.harmonics for b in bases]), max_degree, bases[0]._degrees)
        return cls({d: torch.cat([b.blocks[d] for b in bases]) for d in bases[0].blocks}, max_degree)

    def apply(self, fn: Callable[[Tensor], Tensor]) -> "Basis":
        """The same basis with ``fn`` applied to what it holds: its harmonics, or each block (e.g. ``.to``,
        ``.pin_memory``, a dtype cast)."""
        if self._harmonics is not None:
            return Basis.from_harmonics(fn(self._harmonics), self.max_degree, self._degrees)
        return Basis({d: fn(b) for d, b in self.blocks.items()}, self.max_degree)

    def select(self, edges: Tensor) -> "Basis":
        """The basis of the edges ``edges [E_b]`` (int64 ids), in that order. Frames (and frame rows) this basis
        has already made are selected with it, not made again."""
        if self._harmonics is not None:
            out = Basis.from_harmonics(self._harmonics.index_select(0, edges), self.max_degree, self._degrees)
            out._from_edge_vectors = self._from_edge_vectors
        else:
            out = Basis({d: b.index_select(0, edges) for d, b in self._blocks.items()}, self.max_degree)
        for with_grad, (frames, rows) in self._frames.items():
            if frames is not None:
                frames = frames.index_select(edges)
            # selected without grad mode, frames with gradients are constants (and kept as such)
            out._frames[with_grad and torch.is_grad_enabled()] = (
                frames, {key: r.index_select(0, edges) for key, r in rows.items()})
        return out

    def to(self, *args, **kwargs) -> "Basis":
        return self.apply(lambda t: t.to(*args, **kwargs))

    def nbytes(self) -> int:
        """Bytes this basis holds now: its harmonics, or its blocks (blocks made from harmonics and kept count
        too)."""
        held = [self._harmonics] if self._harmonics is not None else []
        held += list(self._blocks.values()) if self._blocks is not None else []
        return sum(t.numel() * t.element_size() for t in held)

    def __repr__(self) -> str:
        return f"Basis(max_degree={self.max_degree}, num_edges={self.num_edges})"


def get_basis(rel_pos: Tensor, max_degree: int, input_degrees: Optional[Sequence[int]] = None) -> Basis:
    """Kernel bases of all degree pairs up to ``max_degree`` for the edge vectors ``rel_pos [E, 3]``.

    Computed in the dtype of ``rel_pos`` (float32 under autocast); gradients flow to ``rel_pos`` when it
    requires them (forces). ``input_degrees`` limits the input blocks (default: all). Only the harmonics are
    computed here; the blocks on first use (the fused convolution never needs them).
    """
    if not isinstance(rel_pos, Tensor) or rel_pos.dim() != 2 or rel_pos.shape[-1] != 3:
        raise ValueError(f"rel_pos must be a [E, 3] tensor, got {getattr(rel_pos, 'shape', type(rel_pos))}")
    if not rel_pos.is_floating_point():
        raise TypeError(f"rel_pos must be floating point, got {rel_pos.dtype}")
    if max_degree < 0:
        raise ValueError(f"max_degree must be >= 0, got {max_degree}")
    with torch.autocast(device_type=rel_pos.device.type, enabled=False):
        sh = spherical_harmonics(rel_pos, 2 * max_degree)
    basis = Basis.from_harmonics(sh, max_degree, input_degrees)
    basis._from_edge_vectors = True
    return basis
