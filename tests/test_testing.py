"""The equivariance helper must detect non-equivariant functions, not only pass equivariant ones."""
import pytest
import torch

from se3t.testing import assert_equivariant, random_rotation, rotate_features, wigner_D


def test_wigner_D_is_a_representation():
    g = torch.Generator().manual_seed(3)
    R1, R2 = random_rotation(g), random_rotation(g)
    assert torch.allclose(wigner_D(1, R1), R1, atol=1e-13)
    for d in range(4):
        D12 = wigner_D(d, R1 @ R2)
        assert torch.allclose(D12, wigner_D(d, R1) @ wigner_D(d, R2), atol=1e-12)
        assert torch.allclose(wigner_D(d, R1) @ wigner_D(d, R1).T, torch.eye(2 * d + 1, dtype=torch.float64), atol=1e-12)


def test_passes_equivariant_function():
    pos = torch.randn(6, 3, dtype=torch.float64)
    x = {0: torch.randn(6, 2, 1, dtype=torch.float64), 1: torch.randn(6, 2, 3, dtype=torch.float64)}

    def fn(feats, p, e):  # degree-1 output: centred positions scaled by an invariant
        c = p - p.mean(0)
        return {1: (c * feats[0][:, 0]).unsqueeze(1) + feats[1][:, :1]}

    errors = assert_equivariant(fn, x, pos)
    assert errors[1] < 1e-12


@pytest.mark.parametrize("kind", ["component_scaling", "not_translation_invariant", "wrong_degree"])
def test_fails_on_non_equivariant_function(kind):
    pos = torch.randn(6, 3, dtype=torch.float64)
    x = {1: torch.randn(6, 2, 3, dtype=torch.float64), 2: torch.randn(6, 1, 5, dtype=torch.float64)}

    def fn(feats, p, e):
        if kind == "component_scaling":
            return {1: feats[1] * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)}
        if kind == "not_translation_invariant":
            return {1: p.unsqueeze(1)}
        return {1: feats[2][:, :, :3]}  # a degree-2 slice labelled as degree 1

    with pytest.raises(AssertionError, match="not equivariant"):
        assert_equivariant(fn, x, pos)


def test_rotate_features_shapes():
    R = random_rotation(torch.Generator().manual_seed(0))
    out = rotate_features({2: torch.randn(4, 3, 5)}, R)
    assert out[2].shape == (4, 3, 5) and out[2].dtype == torch.float32


def test_tensor_output_of_a_degree_needs_output_degree():
    """A Tensor output is checked as invariant by default: a vector output fails with a hint, passes with
    output_degree=1."""
    pos = torch.randn(6, 3, dtype=torch.float64)
    fn = lambda x, p, e: (p - p.mean(0))[:, None, :]  # noqa: E731  (centred positions: degree 1, [N, 1, 3])
    with pytest.raises(AssertionError, match="output_degree=d"):
        assert_equivariant(fn, {0: torch.ones(6, 1, 1, dtype=torch.float64)}, pos)
    assert_equivariant(fn, {0: torch.ones(6, 1, 1, dtype=torch.float64)}, pos, output_degree=1)
