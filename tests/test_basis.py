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
    plain = {k: torch.cat([a[k], b[k]]) for k in a}
    rebuilt = Basis.from_pairs(plain)
    for k in plain:
        assert torch.equal(rebuilt[k], plain[k]) and torch.equal(joined[k], plain[k])
    with pytest.raises(ValueError, match="must be"):
        Basis.from_pairs({(0, 0): torch.zeros(3, 2, 1, 1)})


def test_bad_input():
    with pytest.raises(ValueError, match=r"\[E, 3\]"):
        get_basis(torch.randn(4, 2), 1)
    with pytest.raises(TypeError, match="floating"):
        get_basis(torch.ones(4, 3, dtype=torch.long), 1)
