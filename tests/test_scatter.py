import pytest
import torch

from se3t import scatter as sc


def _loop_reduce(src, index, n, reduce):
    out = torch.zeros((n,) + src.shape[1:], dtype=src.dtype)
    for i in range(n):
        rows = src[index == i]
        if len(rows):
            out[i] = {"sum": rows.sum(0), "mean": rows.mean(0), "max": rows.max(0).values}[reduce]
    return out


@pytest.mark.parametrize("reduce", ["sum", "mean", "max"])
def test_reductions_match_loop(reduce):
    src = torch.randn(40, 3, 2, dtype=torch.float64)
    index = torch.randint(0, 9, (40,))
    out = sc.scatter(src, index, 10, reduce)  # node 9 (and maybe others) empty -> 0
    assert torch.allclose(out, _loop_reduce(src, index, 10, reduce))


def test_edge_softmax():
    logits = torch.randn(30, 4, dtype=torch.float64) * 50  # large: must not overflow
    dst = torch.randint(0, 6, (30,))
    a = sc.edge_softmax(logits, dst, 8)
    assert torch.isfinite(a).all()
    sums = sc.scatter_sum(a, dst, 8)
    present = torch.bincount(dst, minlength=8) > 0
    assert torch.allclose(sums[present], torch.ones_like(sums[present]))
    assert (sums[~present] == 0).all()
    for node in range(6):
        m = dst == node
        if m.any():
            assert torch.allclose(a[m], torch.softmax(logits[m], dim=0))


def test_edge_softmax_gradcheck():
    logits = torch.randn(10, 2, dtype=torch.float64, requires_grad=True)
    dst = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 0, 2])
    assert torch.autograd.gradcheck(lambda x: sc.edge_softmax(x, dst, 5), (logits,))


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_sum_and_mean_gradients_first_and_second_order(reduce):
    src = torch.randn(12, 3, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([0, 2, 2, 4, 0, 1, 1, 2, 4, 4, 0, 2])  # node 3 empty
    fn = lambda x: sc.scatter(x, index, 5, reduce, backend="torch") ** 2  # noqa: E731  (non-linear: 2nd order)
    assert torch.autograd.gradcheck(fn, (src,))
    assert torch.autograd.gradgradcheck(fn, (src,))


def test_sum_keeps_only_the_index_for_backward():
    """The sum's gradient is grad[index]: the edge-sized source must not be stored (autograd's index_add would)."""
    src = torch.randn(1000, 16, requires_grad=True)
    index = torch.randint(0, 10, (1000,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = sc.scatter_sum(src * 1.0, index, 10, backend="torch")
    kept = [t for t in saved if t.is_floating_point() and t.numel() >= src.numel()]
    assert kept == [] and any(t is index or t.equal(index) for t in saved)
    out.sum().backward()
    assert torch.equal(src.grad, torch.ones_like(src))


def test_errors():
    src = torch.randn(5, 2)
    with pytest.raises(TypeError, match="int64"):
        sc.scatter_sum(src, torch.zeros(5, dtype=torch.int32), 3)
    with pytest.raises(ValueError, match="5 rows"):
        sc.scatter_sum(src, torch.zeros(4, dtype=torch.long), 3)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        sc.scatter_sum(src, torch.tensor([0, 1, 2, 3, 0]), 3)
    with pytest.raises(ValueError, match="reduce"):
        sc.scatter(src, torch.zeros(5, dtype=torch.long), 3, "prod")
    with pytest.raises(ValueError, match="unknown scatter backend"):
        sc.set_backend("cuda_magic")


@pytest.mark.skipif(sc.WITH_TORCH_SCATTER, reason="torch-scatter is installed")
def test_torch_scatter_backend_absent_is_a_clear_error():
    with pytest.raises(ValueError, match="not installed"):
        sc.scatter_sum(torch.randn(3, 2), torch.zeros(3, dtype=torch.long), 1, backend="torch_scatter")


@pytest.mark.torch_scatter
@pytest.mark.skipif(not sc.WITH_TORCH_SCATTER, reason="torch-scatter not installed")
@pytest.mark.parametrize("reduce", ["sum", "mean", "max"])
def test_torch_scatter_matches_torch(reduce):
    src = torch.randn(50, 4, 3, dtype=torch.float64, requires_grad=True)
    index = torch.randint(0, 12, (50,))
    a = sc.scatter(src, index, 13, reduce, backend="torch")
    ga, = torch.autograd.grad(a.pow(2).sum(), src)
    with sc.use_backend("torch_scatter"):
        b = sc.scatter(src, index, 13, reduce)
    gb, = torch.autograd.grad(b.pow(2).sum(), src)
    assert torch.allclose(a, b, atol=1e-12) and torch.allclose(ga, gb, atol=1e-12)
