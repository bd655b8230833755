import math

import pytest
import torch
from e3nn import o3

from se3t import Basis, get_basis
from se3t.basis import clebsch_gordan, num_frequencies, spherical_harmonics
from se3t.testing import random_rotation, wigner_D

from core_helpers import SHARED


def test_pair_shapes_and_counts():
    basis = get_basis(torch.randn(7, 3), max_degree=3)
    assert len(basis) == 16
    assert sum(num_frequencies(*p) for p in basis) == 44
    for (d_in, d_out), b in basis.items():
        assert b.shape == (7, 2 * d_in + 1, 2 * min(d_in, d_out) + 1, 2 * d_out + 1)


def test_matches_definition():
    rel = torch.randn(9, 3, dtype=torch.float64)
    basis = get_basis(rel, 2)
    sh = o3.spherical_harmonics(list(range(5)), rel, normalize=True, normalization="integral")
    for (d_in, d_out), b in basis.items():
        for f, J in enumerate(range(abs(d_in - d_out), d_in + d_out + 1)):
            Y = sh[:, J * J:(J + 1) ** 2]
            expected = torch.einsum("em,mlk->elk", Y, o3.wigner_3j(J, d_in, d_out, dtype=torch.float64))
            assert torch.allclose(b[:, :, f, :], expected, atol=1e-14)


@pytest.mark.parametrize("name", ["P1", "P4"])
def test_matches_reference_fixture(name):
    fx = torch.load(SHARED / "fixtures" / f"nvidia_{name}.pt", weights_only=False)
    inp = fx["inputs"]
    rel = inp["pos"][inp["dst"]] - inp["pos"][inp["src"]]
    basis = get_basis(rel, max(d for d, _ in fx["basis_pairwise"]))
    for pair, ref in fx["basis_pairwise"].items():
        assert torch.allclose(basis[pair], ref, atol=1e-14), pair


def test_kernel_equivariance():
    """B(R r)[., f, .] = D_in(R) B(r) D_out(R)^T: the kernel maps rotated inputs to rotated outputs."""
    rel = torch.randn(5, 3, dtype=torch.float64)
    R = random_rotation(torch.Generator().manual_seed(1))
    b, b_rot = get_basis(rel, 3), get_basis(rel @ R.T, 3)
    for (d_in, d_out) in b:
        Din, Dout = wigner_D(d_in, R), wigner_D(d_out, R)
        expected = torch.einsum("il,elfk,jk->eifj", Din, b[(d_in, d_out)], Dout)
        assert torch.allclose(b_rot[(d_in, d_out)], expected, atol=1e-12)


def test_zero_length_edges_are_finite_with_finite_gradients():
    rel = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, -1.0]], dtype=torch.float64, requires_grad=True)
    basis = get_basis(rel, 3)
    total = sum(b.pow(2).sum() for b in basis.values())
    total.backward()
    assert all(torch.isfinite(b).all() for b in basis.values())
    assert torch.isfinite(rel.grad).all()
    sh = spherical_harmonics(rel.detach(), 2)
    assert sh[0, 0] == pytest.approx(1 / math.sqrt(4 * math.pi)) and (sh[0, 1:] == 0).all()


def test_gradients_flow_to_positions():
    rel = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda r: get_basis(r, 2)[(1, 2)], (rel,))


def test_clebsch_gordan_cached_float64_and_checked():
    cg = clebsch_gordan(2, 1, 2)
    assert cg.dtype == torch.float64 and cg.shape == (5, 3, 5)
    cg.zero_()  # a copy: the cache is not corrupted
    assert clebsch_gordan(2, 1, 2).abs().sum() > 0
    with pytest.raises(ValueError, match="triangle"):
        clebsch_gordan(4, 1, 2)


def test_from_pairs_and_cat_roundtrip():
    a, b = get_basis(torch.randn(3, 3), 2), get_basis(torch.randn(4, 3), 2)
    joined = Basis.cat([a, b])
    # bases held as harmonics join as harmonics (bitwise); their blocks agree to rounding (one GEMM vs two)
    assert torch.equal(joined.harmonics, torch.cat([a.harmonics, b.harmonics]))
    plain = {k: torch.cat([a[k], b[k]]) for k in a}
    rebuilt = Basis.from_pairs(plain)
    assert rebuilt.harmonics is None
    rejoined = Basis.cat([Basis.from_pairs({k: v[:3] for k, v in plain.items()}), b])  # blocks + harmonics
    for k in plain:
        assert torch.equal(rebuilt[k], plain[k]) and torch.equal(rejoined[k], plain[k])
        assert torch.allclose(joined[k], plain[k], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="must be"):
        Basis.from_pairs({(0, 0): torch.zeros(3, 2, 1, 1)})


def test_blocks_are_made_from_harmonics_on_first_use_and_kept_only_when_safe():
    rel = torch.randn(6, 3, dtype=torch.float64)
    basis = get_basis(rel, 3)
    assert basis.harmonics.shape == (6, 49) and basis.nbytes() == 6 * 49 * 8  # 49 numbers per edge, not 1,092
    reference = Basis.from_pairs({k: basis[k] for k in basis})
    assert basis.nbytes() == 6 * (49 + 1092) * 8  # made once, then kept
    for k in reference:
        assert torch.equal(basis[k], reference[k])
    # made under no_grad from harmonics that require grad: used, but not kept (would silently drop gradients)
    rel = rel.clone().requires_grad_(True)
    basis = get_basis(rel, 2)
    with torch.no_grad():
        assert basis[(1, 2)].grad_fn is None
    assert basis.nbytes() == basis.harmonics.numel() * 8
    assert basis[(1, 2)].grad_fn is not None
    with pytest.raises(ValueError, match=r"\[E, 25\]"):
        Basis.from_harmonics(torch.zeros(4, 16), 2)
    with pytest.raises(ValueError, match="input_degrees"):
        Basis.from_harmonics(torch.zeros(4, 25), 2, input_degrees=[3])


@pytest.mark.parametrize("d_out, d_ins", [(0, (0,)), (2, (1, 3)), (3, (0, 1, 2, 3))])
def test_kernel_projection_gives_the_kernel_major_bases(d_out, d_ins):
    from se3t.basis import kernel_projection
    basis = get_basis(torch.randn(5, 3, dtype=torch.float64), 3)
    M = kernel_projection(d_out, d_ins, torch.float64, torch.device("cpu"))
    made = basis.harmonics[:, :M.shape[0]] @ M
    expected = torch.cat([basis.kernel_major(d, d_out).flatten(1) for d in d_ins], dim=1)
    assert M.shape[0] == (max(d_ins) + d_out + 1) ** 2 and torch.allclose(made, expected, atol=1e-13, rtol=0)


def test_bad_input():
    with pytest.raises(ValueError, match=r"\[E, 3\]"):
        get_basis(torch.randn(4, 2), 1)
    with pytest.raises(TypeError, match="floating"):
        get_basis(torch.ones(4, 3, dtype=torch.long), 1)


def test_select_gives_the_basis_of_the_selected_edges_with_its_frames():
    rel = torch.randn(30, 3, dtype=torch.float64)
    full = get_basis(rel, 3)
    edges = torch.tensor([7, 3, 3, 29, 0, 12])
    fresh = get_basis(rel[edges], 3)
    lazy = full.select(edges)  # frames not made yet: the selection makes its own
    assert torch.equal(lazy.harmonics, fresh.harmonics) and not lazy._frames
    full.edge_frames()
    full.frame_rows(2, 1)  # one frame row made: selected; the others are made by the selection on first use
    picked = full.select(edges)
    for a, b in zip(picked.edge_frames(), fresh.edge_frames()):
        assert all(torch.allclose(x, y, atol=1e-13, rtol=0) for x, y in zip(a, b))
    assert (2, 1) in picked._frames[False][1] and (3, 2) not in picked._frames[False][1]
    for d in range(4):
        for m in range(d + 1):
            assert torch.allclose(picked.frame_rows(d, m), fresh.frame_rows(d, m), atol=1e-13, rtol=0)
    from_blocks = Basis.from_pairs({k: v for k, v in full.items()}).select(edges)
    assert all(torch.allclose(from_blocks[k], fresh[k], atol=1e-13, rtol=0) for k in fresh)
