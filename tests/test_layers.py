"""Each layer on its own: equivariance (float32 and float64), fast path == reference path, gradients."""

import pytest
import torch

from se3t import (AttentionBlockSE3, Basis, ConvSE3, Fiber, FuseLevel, LinearSE3, NormSE3, SE3Transformer,
                  get_basis)
from se3t.basis import safe_norm
from se3t.testing import assert_equivariant

from core_helpers import KERNEL_ORDERS, random_features, random_graph, set_kernel_order

FIBER_IN = Fiber({0: 3, 1: 2, 2: 2})
FIBER_EDGE = Fiber({0: 2, 1: 1})


def _edge_inputs(dtype, num_nodes=10):
    pos, ei, _ = random_graph(num_nodes, dtype=dtype)
    E = ei.shape[1]
    return pos, ei, random_features(FIBER_IN, num_nodes, dtype), random_features(FIBER_EDGE, E, dtype)


def _conv_fn(layer, ei, max_degree):
    def fn(x, pos, e):
        rel = pos[ei[1]] - pos[ei[0]]
        scalars = [e[0].squeeze(-1)] if 0 in e else []
        radial_in = torch.cat(scalars + [safe_norm(rel)[0]], -1)
        return layer(x, e, radial_in, ei, get_basis(rel, max_degree))
    return fn


def test_linear_equivariance(dtype, tol):
    layer = LinearSE3(FIBER_IN, Fiber({0: 4, 2: 3})).to(dtype)
    pos, _, x, _ = _edge_inputs(dtype)
    assert_equivariant(lambda a, p, e: layer(a), x, pos, tolerance=tol)
    with pytest.raises(ValueError, match="degrees"):
        LinearSE3(Fiber({0: 2}), Fiber({1: 2}))


@pytest.mark.parametrize("fiber", [Fiber({0: 4, 1: 4, 2: 4}), Fiber({0: 4, 1: 8})], ids=["uniform", "nonuniform"])
def test_norm_equivariance(fiber, dtype, tol):
    layer = NormSE3(fiber).to(dtype)
    pos = torch.randn(7, 3, dtype=dtype)
    assert_equivariant(lambda a, p, e: layer(a), random_features(fiber, 7, dtype), pos, tolerance=tol)


def test_norm_group_path_equals_layer_norm_path():
    fiber = Fiber.create(3, 4)
    fused = NormSE3(fiber).double()
    with torch.no_grad():
        fused.group_norm.weight.uniform_(0.5, 1.5)
        fused.group_norm.bias.uniform_(-0.3, 0.3)
    x = random_features(fiber, 9)
    out = fused(x)
    for i, d in enumerate(fiber.degrees):
        ln = torch.nn.LayerNorm(4).double()
        ln.weight.data, ln.bias.data = fused.group_norm.weight[4 * i:4 * i + 4], fused.group_norm.bias[4 * i:4 * i + 4]
        n = x[d].norm(dim=-1)
        expected = x[d] / n[..., None] * torch.relu(ln(n))[..., None]
        assert torch.allclose(out[d], expected, atol=1e-12)


def test_norm_zero_features_finite():
    """Zero features (padding atoms) give finite outputs, gradients and second derivatives (a loss on a
    gradient, as training on forces makes), also in float16, where the clamp's square underflows."""
    layer = NormSE3(Fiber({0: 3, 1: 3})).double()
    x = {0: torch.randn(2, 3, 1, dtype=torch.float64), 1: torch.randn(2, 3, 3, dtype=torch.float64)}
    x[1][0] = 0
    x = {d: t.requires_grad_(True) for d, t in x.items()}
    out = layer(x)
    grad, = torch.autograd.grad(sum((o.sin()).sum() for o in out.values()), x[1], create_graph=True)
    grad.pow(2).sum().backward()
    assert all(torch.isfinite(o).all() for o in out.values()) and torch.isfinite(grad).all()
    assert all(torch.isfinite(t.grad).all() for t in (x[0], x[1], *layer.parameters()))
    # the norms: torch.norm's, clamped, in every dtype
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        half = {d: t.detach().to(dtype) for d, t in x.items()}
        assert all(torch.isfinite(o).all() for o in layer.to(dtype)(half).values())
        expected = half[1].norm(dim=-1, keepdim=True).clamp(min=NormSE3.NORM_CLAMP)
        torch.testing.assert_close(layer._clamped_norm(half[1]), expected)


@pytest.mark.parametrize("radial", ["conv", "output_degree", "input_degree", "pair"])
@pytest.mark.parametrize("pool", [True, False])
def test_conv_equivariance(radial, pool, dtype, tol):
    layer = ConvSE3(FIBER_IN, Fiber({0: 3, 1: 2, 2: 1, 3: 2}), FIBER_EDGE, pool=pool, self_interaction=True,
                    radial=radial, use_layer_norm=True).to(dtype)
    pos, ei, x, e = _edge_inputs(dtype)
    assert_equivariant(_conv_fn(layer, ei, 3), x, pos, e, tolerance=tol)


@pytest.mark.parametrize("radial", ["conv", "output_degree", "input_degree", "pair"])
def test_conv_fuse_levels_agree_forward_and_backward(radial):
    """Execution fusion never changes the function: outputs and all gradients agree to 1e-10 in float64."""
    layer = ConvSE3(FIBER_IN, Fiber({0: 3, 1: 2, 2: 4}), FIBER_EDGE, self_interaction=True, radial=radial).double()
    pos, ei, x, e = _edge_inputs(torch.float64)
    pos.requires_grad_(True)
    fn = _conv_fn(layer, ei, 2)
    results = {}
    for level in FuseLevel:
        layer.fuse_level = level
        out = fn(x, pos, e)
        loss = sum((o * torch.randn(o.shape, generator=torch.Generator().manual_seed(d), dtype=o.dtype)).sum()
                   for d, o in out.items())
        grads = torch.autograd.grad(loss, [pos] + list(layer.parameters()))
        results[level] = (out, grads)
    ref_out, ref_grads = results[FuseLevel.NONE]
    for level in (FuseLevel.PARTIAL, FuseLevel.FULL, FuseLevel.EDGE_FRAME):  # EDGE_FRAME: forces through frames
        out, grads = results[level]
        for d in ref_out:
            assert torch.allclose(out[d], ref_out[d], atol=1e-10, rtol=0)
        for g, rg in zip(grads, ref_grads):
            assert torch.allclose(g, rg, atol=1e-10, rtol=0)


def test_conv_radial_parametrizations_are_reparametrizations():
    """A shared radial MLP's weights, split per pair, give a per-pair conv with identical outputs."""
    shared = ConvSE3(FIBER_IN, Fiber({0: 2, 1: 3}), FIBER_EDGE, radial="conv").double()
    pairwise = ConvSE3(FIBER_IN, Fiber({0: 2, 1: 3}), FIBER_EDGE, radial="pair").double()
    mlp = shared.radial[0]
    for g, pm in enumerate(pairwise.radial):
        block, = [b for d in pairwise.fiber_out.degrees for b in pairwise._blocks[d] if b.group == g]
        sblock, = shared._blocks[block.d_out]
        c_out = shared.fiber_out[block.d_out]
        d_in = block.d_ins[0]
        a = sblock.in_offsets[sblock.d_ins.index(d_in)]
        rows = torch.arange(sblock.offset, sblock.offset + c_out * sblock.k_in).view(c_out, sblock.k_in)
        rows = rows[:, a: a + block.k_in].reshape(-1)
        pm.load_state_dict({**mlp.state_dict(), f"net.{len(mlp.net) - 1}.weight": mlp.last.weight[rows]})
    pos, ei, x, e = _edge_inputs(torch.float64)
    out_s = _conv_fn(shared, ei, 2)(x, pos, e)
    out_p = _conv_fn(pairwise, ei, 2)(x, pos, e)
    for d in out_s:
        assert torch.allclose(out_s[d], out_p[d], atol=1e-12)


def test_conv_self_interaction_reference_parity_scales_by_in_degree():
    fin, fout = Fiber({0: 2, 1: 2}), Fiber({0: 3, 1: 1})
    a = ConvSE3(fin, fout, self_interaction=True).double()
    b = ConvSE3(fin, fout, self_interaction=True, reference_parity=True).double()
    b.load_state_dict(a.state_dict())
    no_si = ConvSE3(fin, fout).double()
    no_si.load_state_dict({k: v for k, v in a.state_dict().items() if "kernel_self" not in k})
    pos, ei, _ = random_graph(8)
    x = random_features(fin, 8)
    fa, fb, f0 = (_conv_fn(m, ei, 1)(x, pos, {}) for m in (a, b, no_si))
    indeg = torch.bincount(ei[1], minlength=8).double()
    for d in fout.degrees:
        si = torch.matmul(a.to_kernel_self[str(d)], x[d])
        assert torch.allclose(fa[d], f0[d] + si, atol=1e-12)
        assert torch.allclose(fb[d], f0[d] + indeg[:, None, None] * si, atol=1e-12)


def test_conv_low_memory_matches_and_every_parameter_gets_a_gradient():
    fout = Fiber({0: 2, 1: 2})
    normal = ConvSE3(FIBER_IN, fout, FIBER_EDGE, self_interaction=True).double()
    low = ConvSE3(FIBER_IN, fout, FIBER_EDGE, self_interaction=True, low_memory=True).double()
    low.load_state_dict(normal.state_dict())
    pos, ei, x, e = _edge_inputs(torch.float64)
    grads = []
    for m in (normal, low):
        out = _conv_fn(m, ei, 2)(x, pos, e)
        loss = sum(o.pow(2).sum() for o in out.values())
        grads.append(torch.autograd.grad(loss, list(m.parameters())))
    for g0, g1 in zip(*grads):
        assert torch.allclose(g0, g1, atol=1e-12)
        assert g1.abs().sum() > 0


def test_attention_equivariance(dtype, tol):
    layer = AttentionBlockSE3(FIBER_IN, Fiber({0: 8, 1: 8, 2: 4}), FIBER_EDGE, num_heads=2, channels_div=2,
                              use_layer_norm=True).to(dtype)
    pos, ei, x, e = _edge_inputs(dtype)
    assert_equivariant(_conv_fn(layer, ei, 2), x, pos, e, tolerance=tol)


def test_attention_weights_are_a_softmax_over_incoming_edges():
    """Against a direct per-node implementation of the attention formula (SPEC section 4)."""
    fin, fout = Fiber({0: 4, 1: 4}), Fiber({0: 4, 1: 4})
    layer = AttentionBlockSE3(fin, fout, num_heads=2, channels_div=2).double()
    pos, ei, _ = random_graph(7, p=0.5)
    x = random_features(fin, 7)
    rel = pos[ei[1]] - pos[ei[0]]
    basis = get_basis(rel, 1)
    radial_in = safe_norm(rel)[0]
    out = layer(x, {}, radial_in, ei, basis)
    kv = layer.to_key_value(x, {}, radial_in, ei, basis)
    q = layer.to_query(x)
    for node in range(7):
        edges = (ei[1] == node).nonzero().flatten()
        z = {d: torch.zeros(2, 2 * d + 1, dtype=torch.float64) for d in (0, 1)}
        if len(edges):
            logits = torch.zeros(len(edges), 2, dtype=torch.float64)
            for h in range(2):
                for d in (0, 1):
                    k = kv[d][edges, 2:][:, h:h + 1]       # key channels of head h (1 per head)
                    qq = q[d][node, h:h + 1]
                    logits[:, h] += (k * qq).sum((-1, -2))
            alpha = torch.softmax(logits / (2 * 1 + 2 * 3) ** 0.5, dim=0)  # key fiber {0: 2, 1: 2}
            for d in (0, 1):
                v = kv[d][edges, :2]                        # value channels (2: one per head)
                z[d] = (alpha[:, :, None] * v).sum(0)
        for d in (0, 1):
            skip = torch.cat([z[d], x[d][node]], 0)
            assert torch.allclose(out[d][node], layer.project.weights[str(d)] @ skip, atol=1e-12)
    with torch.no_grad():  # without autograd the block takes plain ops (no custom functions): same values
        plain = layer(x, {}, radial_in, ei, basis)
    assert all(torch.allclose(plain[d], out[d], atol=1e-13, rtol=0) for d in out)


def test_conv_gradcheck_positions():
    layer = ConvSE3(Fiber({0: 1, 1: 1}), Fiber({0: 1, 1: 1}), radial="pair", use_layer_norm=True).double()
    pos, ei, _ = random_graph(5, p=0.6)
    x = random_features(Fiber({0: 1, 1: 1}), 5)
    fn = _conv_fn(layer, ei, 1)
    assert torch.autograd.gradcheck(lambda p: fn(x, p, {})[1], (pos.requires_grad_(True),))


@pytest.mark.parametrize("order", KERNEL_ORDERS)
@pytest.mark.parametrize("level", [FuseLevel.FULL, FuseLevel.EDGE_FRAME], ids=lambda v: v.name)
@pytest.mark.parametrize("edge_degrees", [(0, 1), (0,)], ids=["edge-features-of-degree-1", "scalar-edge-features"])
@pytest.mark.parametrize("chunk, group, values", [(1, 4, None), (7, 7, None), (3, 256, None), (1000, 256, None),
                                                  (1000, 256, 48), (1000, 256, 1)])
def test_fused_kernel_chunks_match_reference_path(chunk, group, values, edge_degrees, level, order, monkeypatch):
    """FULL (fused radial + contraction, chunked custom autograd) against NONE (plain autograd), many groups of
    edges (several edge ranges on worker threads when torch has more than one thread) and, with a small budget of
    kernel-weight ``values``, tiles of output channels (down to one channel of one edge per tile). With scalar
    edge features only, the kernel gathers the source nodes' features itself; with degree-1 edge features (part
    of x) it takes edge-level inputs. EDGE_FRAME (the same kernel on the edge frames) is checked without
    position gradients, which it leaves to FULL. One-row blocks in both of the kernel's orders."""
    from se3t.nn import fused
    set_kernel_order(monkeypatch, order)
    monkeypatch.setattr(fused, "GROUP_EDGES", group)
    monkeypatch.setattr(fused, "PARALLEL_MIN_VALUES", 0)
    if values is not None:
        monkeypatch.setattr(fused, "CHUNK_VALUES", values)
    fiber_edge = FIBER_EDGE.restrict(edge_degrees)
    layer = ConvSE3(FIBER_IN, Fiber({0: 3, 1: 2, 2: 2}), fiber_edge, self_interaction=True,
                    use_layer_norm=True).double()
    layer.chunk_size = chunk
    pos, ei, x, e = _edge_inputs(torch.float64, num_nodes=14)
    e = {d: v for d, v in e.items() if d in edge_degrees}
    assert ei.shape[1] > 2 * 7
    pos.requires_grad_(level == FuseLevel.FULL)
    xs = {d: v.clone().requires_grad_(True) for d, v in x.items()}
    fn = _conv_fn(layer, ei, 2)
    res = []
    for lvl in (FuseLevel.NONE, level):
        layer.fuse_level = lvl
        out = fn(xs, pos, e)
        loss = sum((o.sin() * (d + 1)).sum() for d, o in out.items())
        wrt = ([pos] if pos.requires_grad else []) + [*xs.values(), *layer.parameters()]
        res.append((out, torch.autograd.grad(loss, wrt)))
    for d in res[0][0]:
        assert torch.allclose(res[0][0][d], res[1][0][d], atol=1e-11, rtol=0)
    for a, b in zip(res[0][1], res[1][1]):
        assert torch.allclose(a, b, atol=1e-10, rtol=0)


@pytest.mark.parametrize("order", KERNEL_ORDERS)
@pytest.mark.parametrize("parallel, chunk, group, values", [(False, 2, 4, None), (True, 2, 2, None), (True, 1, 3, None),
                                                           (False, 2, 4, 22), (True, 3, 4, 11)])
def test_fused_kernel_gradcheck(parallel, chunk, group, values, order, monkeypatch):
    """The fused kernel alone, every input (radial hidden, weights, features, bases), several groups of edges,
    tiles of output channels (a budget of 22 or 11 kernel-weight ``values``: block 0's two channels in two tiles)
    and parts, on the calling thread and split over worker threads, one-row blocks in both orders."""
    from se3t.nn import fused
    from se3t.nn.fused import BlockSpec, PartSpec, fused_conv
    set_kernel_order(monkeypatch, order)
    monkeypatch.setattr(fused, "PARALLEL_RANGES", parallel)
    monkeypatch.setattr(fused, "GROUP_EDGES", group)
    monkeypatch.setattr(fused, "PARALLEL_MIN_VALUES", 0)
    if values is not None:
        monkeypatch.setattr(fused, "CHUNK_VALUES", values)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # workers even on a one-core runner
    E = 9
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, dtype=torch.float64, generator=g).requires_grad_(True)  # noqa: E731
    h = rnd(E, 4)
    xs = [rnd(E, 2, 1), rnd(E, 3, 3)]                       # C=2 of degree 0, C=3 of degree 1
    # block 0: d_out=1 (K=3) from d_in 0 (F=1) and d_in 1 (F=3): K_in = 2 + 9 = 11, C_out = 2
    # block 1: d_out=0 (K=1) from d_in 1 (F=1): K_in = 3, C_out = 3 (the outer order, or R's outer-product branch)
    bts = [rnd(E, 3 * 1, 1), rnd(E, 3 * 3, 3), rnd(E, 1 * 1, 3)]
    blocks = [BlockSpec(0, 2, 3, 11, (PartSpec(0, 0, 0, 1, 2), PartSpec(1, 1, 2, 3, 3))),
              BlockSpec(22, 3, 1, 3, (PartSpec(1, 2, 0, 1, 3),))]
    W = rnd(22 + 9, 4)
    rows = torch.randperm(W.shape[0], generator=g)  # any row order the conv asks for
    n = len(xs)
    nodes_for_gg = [rnd(6, 2, 1), rnd(6, 3, 3)]
    assert torch.autograd.gradcheck(lambda *a: fused_conv(a[0], a[1], rows, blocks, a[2:2 + n], a[2 + n:], chunk=chunk),
                                    (h, W, *xs, *bts))
    # second derivatives (create_graph: a loss on forces): fused calls again (_FusedConvVJP), so with this tiling
    # and these threads (fast mode, a random projection of the second derivatives, except on the calling thread
    # with whole tiles); then the differentiable reference, which does not depend on the tiling (checked once per
    # order): all edges at once, and in checkpointed chunks of 2 edges (block 0's R has 2 * 11 values per edge)
    assert torch.autograd.gradgradcheck(
        lambda *a: fused_conv(a[0], a[1], rows, blocks, a[2:2 + n], a[2 + n:], chunk=chunk), (h, W, *xs, *bts),
        fast_mode=parallel or values is not None)
    assert torch.autograd.gradgradcheck(
        lambda *a: fused_conv(a[0], a[1], rows, blocks, a[2:2 + n], a[2 + n:], chunk=chunk,
                              x_index=torch.tensor([3, 0, 3, 1, 4, 4, 0, 3, 1])), (h, W, *nodes_for_gg, *bts),
        fast_mode=True)
    for chunk_values, fast in (((0, False), (44, True)) if not parallel and values is None else ()):
        monkeypatch.setattr(fused, "FUSED_DOUBLE_BACKWARD", False)
        monkeypatch.setattr(fused, "DOUBLE_BACKWARD_CHUNK_VALUES", chunk_values)
        assert torch.autograd.gradgradcheck(
            lambda *a: fused_conv(a[0], a[1], rows, blocks, a[2:2 + n], a[2 + n:], chunk=chunk), (h, W, *xs, *bts),
            fast_mode=fast)
        assert torch.autograd.gradgradcheck(  # node-level inputs: their gradients summed over the chunks
            lambda *a: fused_conv(a[0], a[1], rows, blocks, a[2:2 + n], a[2 + n:], chunk=chunk,
                                  x_index=torch.tensor([3, 0, 3, 1, 4, 4, 0, 3, 1])), (h, W, *nodes_for_gg, *bts),
            fast_mode=True)
    # node-level inputs read through an index (repeated and unused nodes): the kernel gathers and scatters back
    x_index = torch.tensor([3, 0, 3, 1, 4, 4, 0, 3, 1])
    nodes = [rnd(6, 2, 1), rnd(6, 3, 3)]
    assert torch.autograd.gradcheck(lambda *a: fused_conv(a[0], a[1], rows, blocks, a[2:2 + n], a[2 + n:], chunk=chunk,
                                                          x_index=x_index), (h, W, *nodes, *bts))
    with torch.no_grad():  # and equals the edge-level call on the gathered rows
        ref = fused_conv(h, W, rows, blocks, [v[x_index] for v in nodes], bts, chunk=chunk)
        out = fused_conv(h, W, rows, blocks, nodes, bts, chunk=chunk, x_index=x_index)
    assert all(torch.equal(a, b) for a, b in zip(ref, out))


@pytest.mark.parametrize("order", KERNEL_ORDERS)
def test_fused_kernel_second_derivatives_are_differentiable(order, monkeypatch):
    """The fused second derivatives are fused calls again: the gradients of a gradient (the kernel's third
    derivatives) pass gradgradcheck too, and the second derivatives equal the reference's."""
    from se3t.nn import fused
    from se3t.nn.fused import BlockSpec, PartSpec, fused_conv
    set_kernel_order(monkeypatch, order)
    monkeypatch.setattr(fused, "GROUP_EDGES", 2)
    E, g = 5, torch.Generator().manual_seed(3)
    rnd = lambda *s: torch.randn(*s, dtype=torch.float64, generator=g).requires_grad_(True)  # noqa: E731
    blocks = [BlockSpec(0, 2, 3, 11, (PartSpec(0, 0, 0, 1, 2), PartSpec(1, 1, 2, 3, 3))),
              BlockSpec(22, 3, 1, 3, (PartSpec(1, 2, 0, 1, 3),))]
    rows = torch.randperm(31, generator=g)
    inputs = (rnd(E, 4), rnd(31, 4), rnd(E, 2, 1), rnd(E, 3, 3), rnd(E, 3, 1), rnd(E, 9, 3), rnd(E, 1, 3))
    cotangents = [torch.randn(E, 3, 2, dtype=torch.float64, generator=g),
                  torch.randn(E, 1, 3, dtype=torch.float64, generator=g)]

    def gradient(*a):  # the kernel's gradients for fixed output gradients, as a function of its inputs
        outs = fused_conv(a[0], a[1], rows, blocks, a[2:4], a[4:], chunk=2)
        return torch.autograd.grad(outs, a, cotangents, create_graph=True)

    assert torch.autograd.gradgradcheck(gradient, inputs, fast_mode=True)
    weights = [torch.randn(t.shape, dtype=torch.float64, generator=g) for t in inputs]
    second = []
    for fused_double in (True, False):
        monkeypatch.setattr(fused, "FUSED_DOUBLE_BACKWARD", fused_double)
        first = gradient(*inputs)
        second.append(torch.autograd.grad(sum((f * w).sum() for f, w in zip(first, weights)), inputs))
    for a, b in zip(*second):
        assert a.abs().max() > 0 and torch.allclose(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("mask", [(1, 1, 0, 1, 1, 0, 1), (1, 0, 1, 1, 0, 1, 1), (0, 1, 1, 0, 1, 1, 0),
                                  (1, 1, 1, 1, 0, 0, 0), (1, 1, 0, 0, 1, 1, 1)])
def test_fused_second_derivatives_with_some_inputs_constant(mask, monkeypatch):
    """Second derivatives when only some inputs require grad (``mask``: h, W, two features, three bases): groups
    with no direction, and the joined features-and-bases call with some of either constant (zero directions)."""
    from se3t.nn import fused
    from se3t.nn.fused import BlockSpec, PartSpec, fused_conv
    monkeypatch.setattr(fused, "GROUP_EDGES", 2)
    E, g = 5, torch.Generator().manual_seed(3)
    shapes = [(E, 4), (31, 4), (E, 2, 1), (E, 3, 3), (E, 3, 1), (E, 9, 3), (E, 1, 3)]
    inputs = [torch.randn(*shape, dtype=torch.float64, generator=g).requires_grad_(bool(m))
              for shape, m in zip(shapes, mask)]
    blocks = [BlockSpec(0, 2, 3, 11, (PartSpec(0, 0, 0, 1, 2), PartSpec(1, 1, 2, 3, 3))),
              BlockSpec(22, 3, 1, 3, (PartSpec(1, 2, 0, 1, 3),))]
    rows = torch.randperm(31, generator=g)

    def fn(*variables):
        given = iter(variables)
        full = [next(given) if t.requires_grad else t for t in inputs]
        return fused_conv(full[0], full[1], rows, blocks, full[2:4], full[4:], chunk=2)

    assert torch.autograd.gradgradcheck(fn, [t for t in inputs if t.requires_grad])


@pytest.mark.parametrize("order", KERNEL_ORDERS)
@pytest.mark.parametrize("parallel", [False, True], ids=["calling-thread", "worker-threads"])
def test_fused_kernel_from_harmonics_gradcheck(parallel, order, monkeypatch):
    """Bases made per edge group from harmonics (``sh @ M_j``): gradcheck of every input including ``sh``, and
    the same outputs as the kernel given those bases materialised; one-row blocks in both orders."""
    from se3t.nn import fused
    from se3t.nn.fused import BlockSpec, PartSpec, fused_conv
    set_kernel_order(monkeypatch, order)
    monkeypatch.setattr(fused, "PARALLEL_RANGES", parallel)
    monkeypatch.setattr(fused, "GROUP_EDGES", 2)
    monkeypatch.setattr(fused, "PARALLEL_MIN_VALUES", 0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    E = 9
    g = torch.Generator().manual_seed(1)
    rnd = lambda *s: torch.randn(*s, dtype=torch.float64, generator=g).requires_grad_(True)  # noqa: E731
    h, xs, sh = rnd(E, 4), [rnd(E, 2, 1), rnd(E, 3, 3)], rnd(E, 9)
    # block 0: d_out=1 (K=3) from d_in 0 (F=1, L=1) and d_in 1 (F=3, L=3): basis columns 3 + 27 from 9 harmonics
    # block 1: d_out=0 (K=1) from d_in 1 (F=1, L=3): 3 columns from the first 4 harmonics only
    projections = [torch.randn(9, 30, dtype=torch.float64, generator=g),
                   torch.randn(4, 3, dtype=torch.float64, generator=g)]
    blocks = [BlockSpec(0, 2, 3, 11, (PartSpec(0, 0, 0, 1, 2), PartSpec(1, 1, 2, 3, 3))),
              BlockSpec(22, 3, 1, 3, (PartSpec(1, 2, 0, 1, 3),))]
    W = rnd(22 + 9, 4)
    rows = torch.randperm(W.shape[0], generator=g)
    for x_index, inputs in ((None, xs), (torch.tensor([3, 0, 3, 1, 4, 4, 0, 3, 1]), [rnd(6, 2, 1), rnd(6, 3, 3)])):
        fn = (lambda h, W, sh, *x: fused_conv(h, W, rows, blocks, x, projections, chunk=1, x_index=x_index, sh=sh))
        assert torch.autograd.gradcheck(fn, (h, W, sh, *inputs))
        assert torch.autograd.gradgradcheck(fn, (h, W, sh, *inputs), fast_mode=parallel)  # fused
        for chunk_values in ((0, 66) if not parallel else ()):  # the reference, as in the test above (chunks of 3)
            monkeypatch.setattr(fused, "FUSED_DOUBLE_BACKWARD", False)
            monkeypatch.setattr(fused, "DOUBLE_BACKWARD_CHUNK_VALUES", chunk_values)
            assert torch.autograd.gradgradcheck(fn, (h, W, sh, *inputs), fast_mode=chunk_values > 0)
        monkeypatch.setattr(fused, "FUSED_DOUBLE_BACKWARD", True)
    with torch.no_grad():
        b0, b1 = sh @ projections[0], sh[:, :4] @ projections[1]
        bts = [b0[:, :3].reshape(E, 3, 1), b0[:, 3:].reshape(E, 9, 3), b1.reshape(E, 1, 3)]
        ref = fused_conv(h, W, rows, blocks, xs, bts, chunk=1)
        out = fused_conv(h, W, rows, blocks, xs, projections, chunk=1, sh=sh)
    assert all(torch.allclose(a, b, atol=1e-12, rtol=0) for a, b in zip(ref, out))
    with pytest.raises(ValueError, match="one projection"):
        fused_conv(h, W, rows, blocks, xs, projections[:1], sh=sh)


def test_conv_full_from_harmonics_equals_from_blocks():
    """The FULL conv on a basis held as harmonics (bases made per edge group, never stored) and on the same basis
    as materialised blocks: same outputs and gradients (parameters, features, positions); the harmonics basis
    stays unmaterialised through forward and backward."""
    layer = ConvSE3(FIBER_IN, Fiber({0: 3, 1: 2, 2: 2}), FIBER_EDGE.restrict([0]), self_interaction=True,
                    use_layer_norm=True, fuse_level="FULL").double()
    layer.chunk_size = 3
    pos, ei, x, e = _edge_inputs(torch.float64, num_nodes=12)
    e = {0: e[0]}
    pos.requires_grad_(True)
    xs = {d: v.clone().requires_grad_(True) for d, v in x.items()}
    res = []
    for materialise in (False, True):
        rel = pos[ei[1]] - pos[ei[0]]
        radial_in = torch.cat([e[0].squeeze(-1), safe_norm(rel)[0]], -1)
        basis = get_basis(rel, 2)
        if materialise:
            basis = Basis.from_pairs(dict(basis))
        out = layer(xs, e, radial_in, ei, basis)
        loss = sum((o.sin() * (d + 1)).sum() for d, o in out.items())
        res.append([*out.values(), *torch.autograd.grad(loss, [pos, *xs.values(), *layer.parameters()])])
        if not materialise:
            assert basis.nbytes() == ei.shape[1] * 25 * 8  # only the harmonics (float64) were ever held
    for a, b in zip(*res):
        assert torch.allclose(a, b, atol=1e-11, rtol=0)
    with pytest.raises(ValueError, match="max_degree=1"):
        layer(xs, e, radial_in, ei, get_basis(rel, 1))


def _conv_on_worker_threads(monkeypatch, level, order):
    """A small conv whose fused kernel runs on two worker threads in many units of 2-edge groups."""
    from se3t.nn import fused
    set_kernel_order(monkeypatch, order)
    monkeypatch.setattr(fused, "GROUP_EDGES", 2)
    monkeypatch.setattr(fused, "UNITS_PER_THREAD", 3)
    monkeypatch.setattr(fused, "MIN_UNIT_GROUPS", 1)
    monkeypatch.setattr(fused, "PARALLEL_MIN_VALUES", 0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    layer = ConvSE3(FIBER_IN, Fiber({0: 3, 1: 2, 2: 2}), FIBER_EDGE, self_interaction=True, fuse_level=level)
    layer.chunk_size = 1
    return layer


@pytest.mark.parametrize("order", KERNEL_ORDERS)
@pytest.mark.parametrize("level", [FuseLevel.FULL, FuseLevel.EDGE_FRAME], ids=lambda v: v.name)
def test_fused_kernel_on_worker_threads_is_bitwise_reproducible(level, order, monkeypatch):
    """Worker threads take edge units dynamically (whichever is free): outputs and every gradient must still be
    bitwise the same from run to run (per-unit partial grad_W summed in unit order), in float32 where summation
    order would show."""
    layer = _conv_on_worker_threads(monkeypatch, level, order)
    pos, ei, x, e = _edge_inputs(torch.float32, num_nodes=14)
    pos.requires_grad_(level == FuseLevel.FULL)  # EDGE_FRAME leaves position gradients to FULL
    fn = _conv_fn(layer, ei, 2)
    runs = []
    for _ in range(4):
        out = fn(x, pos, e)
        loss = sum((o.sin() * (d + 1)).sum() for d, o in out.items())
        wrt = ([pos] if pos.requires_grad else []) + list(layer.parameters())
        runs.append([*out.values(), *torch.autograd.grad(loss, wrt)])
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], run))


@pytest.mark.parametrize("order", KERNEL_ORDERS)
@pytest.mark.parametrize("level", [FuseLevel.FULL, FuseLevel.EDGE_FRAME], ids=lambda v: v.name)
def test_fused_kernel_partial_weight_gradients_need_no_zero_fill(level, order, monkeypatch):
    """A work unit's partial weight gradient starts uninitialised, as the unit's first group writes every value:
    with those buffers full of NaN, outputs and gradients are bitwise those of a normal run; a graph without
    edges (an empty range) gives zero weight gradients."""
    from se3t.nn import fused
    layer = _conv_on_worker_threads(monkeypatch, level, order)
    pos, ei, x, e = _edge_inputs(torch.float32, num_nodes=14)
    partial_buffer, filled = fused._partial_buffer, []

    def nan_partial_buffer(shape, dtype, device, lo, hi):
        buf = partial_buffer(shape, dtype, device, lo, hi)
        if hi > lo:
            filled.append(buf.fill_(float("nan")))
        return buf

    def run(ei, x, e):
        out = _conv_fn(layer, ei, 2)(x, pos, e)
        loss = sum((o.sin() * (d + 1)).sum() for d, o in out.items())
        return [*out.values(), *torch.autograd.grad(loss, list(layer.parameters()), allow_unused=True)]

    normal = run(ei, x, e)
    monkeypatch.setattr(fused, "_partial_buffer", nan_partial_buffer)
    poisoned = run(ei, x, e)
    assert len(filled) > 2 and all(torch.equal(a, b) for a, b in zip(normal, poisoned) if a is not None)
    no_edges = torch.zeros(2, 0, dtype=torch.long)
    grads = run(no_edges, x, {d: v[:0] for d, v in e.items()})[len(normal) - len(list(layer.parameters())):]
    radial_weights = [g for g, (name, _) in zip(grads, layer.named_parameters()) if "radial" in name]
    assert radial_weights and all(g is None or not g.any() for g in radial_weights)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("level", [FuseLevel.FULL, FuseLevel.EDGE_FRAME], ids=lambda v: v.name)
def test_fused_kernel_blockwise_equals_one_hand_off(level, threads, monkeypatch):
    """``blockwise`` (backward: one output-degree block at a time, for low memory) runs the same per-block work in
    the same order per edge as the default single hand-off of all blocks: bitwise the same outputs and gradients,
    on the calling thread and on worker threads (these blocks fit one tile either way; large blocks get smaller
    blockwise CPU tiles, test_blockwise_kernel_cuts_smaller_cpu_tiles); a low-memory conv or model turns it on."""
    from se3t.nn import fused
    monkeypatch.setattr(fused, "GROUP_EDGES", 2)
    monkeypatch.setattr(fused, "MIN_UNIT_GROUPS", 1)
    monkeypatch.setattr(fused, "PARALLEL_MIN_VALUES", 0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    layer = ConvSE3(FIBER_IN, Fiber({0: 3, 1: 2, 2: 2}), FIBER_EDGE, self_interaction=True, fuse_level=level)
    assert not layer.blockwise_kernel
    pos, ei, x, e = _edge_inputs(torch.float32, num_nodes=14)
    pos.requires_grad_(level == FuseLevel.FULL)
    x = {d: v.detach().requires_grad_() for d, v in x.items()}
    fn = _conv_fn(layer, ei, 2)
    hand_offs = []
    run_ranges = fused._run_ranges
    monkeypatch.setattr(fused, "_run_ranges", lambda *a: (hand_offs.append(1), run_ranges(*a)))
    runs, calls = [], []
    for blockwise in (False, True):
        layer.blockwise_kernel = blockwise
        hand_offs.clear()
        out = fn(x, pos, e)
        loss = sum((o.sin() * (d + 1)).sum() for d, o in out.items())
        wrt = ([pos] if pos.requires_grad else []) + list(x.values()) + list(layer.parameters())
        runs.append([*out.values(), *torch.autograd.grad(loss, wrt)])
        calls.append(len(hand_offs))
    assert len(runs[0]) > 6 and all(torch.equal(a, b) for a, b in zip(*runs))
    assert calls[1] > calls[0] > 0, calls  # in backward, one hand-off per kernel pass against one per block
    forward_calls = []
    for blockwise in (False, True):  # forward hands all blocks off at once either way
        layer.blockwise_kernel = blockwise
        hand_offs.clear()
        with torch.no_grad():
            fn(x, pos, e)
        forward_calls.append(len(hand_offs))
    assert forward_calls[0] == forward_calls[1] > 0, forward_calls
    assert ConvSE3(FIBER_IN, Fiber({0: 3}), FIBER_EDGE, low_memory=True).blockwise_kernel
    model = SE3Transformer(num_layers=1, fiber_in=Fiber({0: 3}), fiber_hidden=Fiber({0: 4, 1: 4}),
                           fiber_out=Fiber({0: 2}), num_heads=2, channels_div=2, low_memory=True)
    convs = [m for m in model.modules() if isinstance(m, ConvSE3)]
    assert convs and all(c.blockwise_kernel for c in convs)


@pytest.mark.parametrize("order", KERNEL_ORDERS)
@pytest.mark.parametrize("level", [FuseLevel.FULL, FuseLevel.EDGE_FRAME], ids=lambda v: v.name)
def test_fused_kernel_in_inference_mode_on_worker_threads(level, order, monkeypatch):
    """Under torch.inference_mode the worker threads write into inference tensors: same result as no_grad."""
    from se3t.nn import fused
    set_kernel_order(monkeypatch, order)
    monkeypatch.setattr(fused, "GROUP_EDGES", 2)
    monkeypatch.setattr(fused, "PARALLEL_MIN_VALUES", 0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    layer = ConvSE3(FIBER_IN, Fiber({0: 3, 1: 2}), FIBER_EDGE, self_interaction=True, fuse_level=level).double()
    layer.chunk_size = 1
    pos, ei, x, e = _edge_inputs(torch.float64, num_nodes=14)
    fn = _conv_fn(layer, ei, 2)
    with torch.no_grad():
        ref = fn(x, pos, e)
    with torch.inference_mode():
        out = fn(x, pos, e)
    for d in ref:
        assert torch.equal(out[d], ref[d])


def _counted_calls(monkeypatch, module, name: str) -> list:
    """Wrap ``module.name`` so that each call appends to the returned list (clear it to count afresh)."""
    calls, real = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("order", KERNEL_ORDERS)
@pytest.mark.parametrize("level", [FuseLevel.FULL, FuseLevel.EDGE_FRAME], ids=lambda v: v.name)
def test_cached_kernel_weights_are_laid_out_once_until_the_weights_change(level, order, monkeypatch):
    """Inside ``cached_kernel_weights`` a conv lays out its kernel weights once: later no-grad and inference calls
    reuse them, bitwise equal to laying them out; an in-place change or new storage lays them out afresh; leaving
    the block frees them."""
    import copy

    from se3t import cached_kernel_weights
    from se3t.nn import fused
    set_kernel_order(monkeypatch, order)
    made = _counted_calls(monkeypatch, fused, "_block_weights")
    layer = ConvSE3(FIBER_IN, Fiber({0: 3, 1: 2}), FIBER_EDGE, self_interaction=True, fuse_level=level).double()
    pos, ei, x, e = _edge_inputs(torch.float64, num_nodes=12)
    fn = _conv_fn(layer, ei, 2)
    with torch.no_grad():
        ref = fn(x, pos, e)
    per_call = len(made)
    assert per_call > 0
    with cached_kernel_weights():
        with torch.no_grad():
            first = fn(x, pos, e)
        with torch.inference_mode():
            second = fn(x, pos, e)
        assert len(made) == 2 * per_call  # the second call laid out nothing
        assert len(fused._weight_layouts) > 0
        for d in ref:
            assert torch.equal(first[d], ref[d]) and torch.equal(second[d], ref[d])
        # an in-place change (as an optimizer step or load_state_dict makes) bumps the version: laid out afresh
        fresh = copy.deepcopy(layer)
        with torch.no_grad():
            for p, q in zip(layer.parameters(), fresh.parameters()):
                p.mul_(1.5)
                q.mul_(1.5)
            changed, expected = fn(x, pos, e), _conv_fn(fresh, ei, 2)(x, pos, e)
        for d in ref:
            assert torch.equal(changed[d], expected[d]) and not torch.equal(changed[d], ref[d])
        # new storage behind the parameter (param.data = ...): laid out afresh too
        for p, q in zip(layer.parameters(), fresh.parameters()):
            p.data = p.data * 0.5
            q.data = q.data * 0.5
        with torch.no_grad():
            changed, expected = fn(x, pos, e), _conv_fn(fresh, ei, 2)(x, pos, e)
        for d in ref:
            assert torch.equal(changed[d], expected[d])
    assert len(fused._weight_layouts) == 0


def test_cached_kernel_weights_keep_each_layout_kind_calls_ask_for(monkeypatch):
    """Calls on few edges read their weights' rows, larger ones contiguous and outer-order layouts
    (``LAYOUT_COPY_MIN_EDGES``): inside ``cached_kernel_weights`` each kind is kept under its own key, and each call
    equals the same call outside it bitwise, whichever kind was kept first."""
    from se3t import cached_kernel_weights
    from se3t.nn import fused
    monkeypatch.setattr(fused, "ONE_ROW_OUTER_MIN_RATIO", 0)
    layer = ConvSE3(FIBER_IN, Fiber({0: 3, 1: 2}), FIBER_EDGE, fuse_level=FuseLevel.EDGE_FRAME).double()
    pos, ei, x, e = _edge_inputs(torch.float64, num_nodes=12)
    fn = _conv_fn(layer, ei, 2)
    few, many = ei.shape[1] + 1, 0  # thresholds that make this graph's calls "few" or "many" edges
    ref = {}
    with torch.no_grad():
        for bound in (few, many):
            monkeypatch.setattr(fused, "LAYOUT_COPY_MIN_EDGES", bound)
            ref[bound] = fn(x, pos, e)
        with cached_kernel_weights(layer):
            for bound in (few, many, few, many):
                monkeypatch.setattr(fused, "LAYOUT_COPY_MIN_EDGES", bound)
                out = fn(x, pos, e)
                assert all(torch.equal(out[d], ref[bound][d]) for d in out)
            (_, kept), = fused._weight_layouts.values()
            assert {key[1] for key in kept} == {"rows", True, False}
            assert all(not kept[key].is_contiguous() for key in kept if key[1] == "rows")


def test_cached_kernel_weights_only_for_the_modules_given():
    """``cached_kernel_weights(a)`` keeps layouts of ``a``'s convs only; leaving a nested block keeps what an
    enclosing one covers; leaving the last frees everything."""
    from se3t import cached_kernel_weights
    from se3t.nn import fused
    a, b = (ConvSE3(FIBER_IN, Fiber({0: 3, 1: 2}), FIBER_EDGE, fuse_level=FuseLevel.EDGE_FRAME).double()
            for _ in range(2))
    pos, ei, x, e = _edge_inputs(torch.float64, num_nodes=12)
    kept = lambda m: sum(p in fused._weight_layouts for p in m.parameters())  # noqa: E731
    with torch.no_grad():
        with cached_kernel_weights(a):
            _conv_fn(a, ei, 2)(x, pos, e)
            _conv_fn(b, ei, 2)(x, pos, e)
            assert kept(a) == 1 and kept(b) == 0
            with cached_kernel_weights(b):
                _conv_fn(b, ei, 2)(x, pos, e)
                assert kept(a) == 1 and kept(b) == 1
            assert kept(a) == 1 and kept(b) == 0  # b's went with its block
            with cached_kernel_weights():        # every conv
                _conv_fn(b, ei, 2)(x, pos, e)
                assert kept(b) == 1
            assert kept(b) == 0
        assert len(fused._weight_layouts) == 0 and not fused._cache_scopes


def test_cached_kernel_weights_serve_forces_and_training_exactly(monkeypatch):
    """Forces (gradients with respect to positions, the weights unchanged) reuse the kept layouts and equal those
    made without them bitwise; a training step inside the block gives the same weight gradients, and after the
    weights' update the next call lays them out afresh."""
    import copy

    from se3t import cached_kernel_weights
    from se3t.nn import fused
    made = _counted_calls(monkeypatch, fused, "_block_weights")
    layer = ConvSE3(FIBER_IN, Fiber({0: 3, 1: 2}), FIBER_EDGE, fuse_level=FuseLevel.EDGE_FRAME).double()
    pos, ei, x, e = _edge_inputs(torch.float64, num_nodes=12)

    def loss(m, p):
        out = _conv_fn(m, ei, 2)(x, p, e)
        return sum((v * torch.linspace(-1, 1, v.numel(), dtype=v.dtype).view(v.shape)).sum() for v in out.values())

    def forces(m):
        p = pos.clone().requires_grad_(True)
        return torch.autograd.grad(loss(m, p), p)[0]

    def weight_grads(m):
        m.zero_grad(set_to_none=True)
        loss(m, pos).backward()
        return [q.grad.clone() for q in m.parameters()]

    ref_forces, ref_grads = forces(layer), weight_grads(layer)
    with cached_kernel_weights(layer):
        made.clear()
        first = forces(layer)
        laid_out = len(made)
        made.clear()
        second = forces(layer)
        assert laid_out > 0 and len(made) == 0  # the layouts were kept, and the backward read them too
        assert torch.equal(first, ref_forces) and torch.equal(second, ref_forces)
        grads = weight_grads(layer)
        for a, b in zip(grads, ref_grads):
            assert torch.equal(a, b)
        fresh = copy.deepcopy(layer)
        with torch.no_grad():  # an optimizer's update, in place: bumps the version counters
            for q, r, g in zip(layer.parameters(), fresh.parameters(), grads):
                q.sub_(0.1 * g)
                r.sub_(0.1 * g)
        assert torch.equal(forces(layer), forces(fresh))
    assert len(fused._weight_layouts) == 0


@pytest.mark.parametrize("order", KERNEL_ORDERS)
@pytest.mark.parametrize("level", [FuseLevel.FULL, FuseLevel.EDGE_FRAME], ids=lambda v: v.name)
def test_small_calls_keep_their_layouts_for_their_backward(level, order, monkeypatch):
    """A call on few edges (``KEEP_LAYOUTS_MAX_EDGES``) lays its weights out once, in forward, and its backward
    reads them: forces and a training step's gradients bitwise equal to laying them out again; none kept after
    the backward; a blockwise (low-memory) kernel and a call on more edges lay them out in both."""
    from se3t.nn import fused
    set_kernel_order(monkeypatch, order)
    made = _counted_calls(monkeypatch, fused, "_block_weights")
    layer = ConvSE3(FIBER_IN, Fiber({0: 3, 1: 2}), FIBER_EDGE, fuse_level=level).double()
    pos, ei, x, e = _edge_inputs(torch.float64, num_nodes=12)
    fn = _conv_fn(layer, ei, 2)

    def step():
        p = pos.clone().requires_grad_(True)
        out = fn(x, p, e)
        loss = sum((v * torch.linspace(-1, 1, v.numel(), dtype=v.dtype).view(v.shape)).sum() for v in out.values())
        return torch.autograd.grad(loss, [p, *layer.parameters()])

    def counted(keep_edges, blockwise=False):
        monkeypatch.setattr(fused, "KEEP_LAYOUTS_MAX_EDGES", keep_edges)
        layer.blockwise_kernel = blockwise
        made.clear()
        grads = step()
        return grads, len(made)

    (ref, both), (kept, once) = counted(0), counted(ei.shape[1])
    assert once > 0 and both == 2 * once
    assert all(torch.equal(a, b) for a, b in zip(ref, kept))
    assert counted(ei.shape[1] - 1)[1] == both and counted(ei.shape[1], blockwise=True)[1] == both
    layer.blockwise_kernel = False
    monkeypatch.setattr(fused, "KEEP_LAYOUTS_MAX_EDGES", ei.shape[1])
    loss = sum(v.sum() for v in fn(x, pos, e).values())
    made.clear()
    torch.autograd.grad(loss, list(layer.parameters()), retain_graph=True)
    assert len(made) == 0
    torch.autograd.grad(loss, list(layer.parameters()))  # the first backward let them go: laid out again
    assert len(made) == once
    with torch.no_grad():  # no graph: nothing to keep
        made.clear()
        fn(x, pos, e)
        assert len(made) == once


@pytest.mark.parametrize("order", KERNEL_ORDERS)
@pytest.mark.parametrize("level", [FuseLevel.FULL, FuseLevel.EDGE_FRAME], ids=lambda v: v.name)
def test_fused_backward_skips_the_weight_gradient_autograd_will_not_use(level, order, monkeypatch):
    """Forces alone (``autograd.grad`` for positions, ``backward(inputs=...)``) make no weight gradient in the fused
    kernel, and equal those of the kernel that makes it; a full backward, or ``autograd.grad`` asking for the
    weights, still makes it, and equally."""
    from se3t.nn import fused
    set_kernel_order(monkeypatch, order)
    made = _counted_calls(monkeypatch, fused, "_partial_buffer")
    layer = ConvSE3(FIBER_IN, Fiber({0: 3, 1: 2}), FIBER_EDGE, self_interaction=True, fuse_level=level).double()
    pos, ei, x, e = _edge_inputs(torch.float64, num_nodes=12)
    x = {d: v.requires_grad_(True) for d, v in x.items()}

    def loss(p):
        out = _conv_fn(layer, ei, 2)(x, p, e)
        return sum((v * torch.linspace(-1, 1, v.numel(), dtype=v.dtype).view(v.shape)).sum() for v in out.values())

    def run(how, skip):
        monkeypatch.setattr(fused, "SKIP_UNUSED_WEIGHT_GRADIENT", skip)
        made.clear()
        layer.zero_grad(set_to_none=True)
        p = pos.clone().requires_grad_(True)
        weights = list(layer.parameters())
        if how == "forces":
            got = list(torch.autograd.grad(loss(p), [p, *x.values()]))
        elif how == "backward-inputs":
            loss(p).backward(inputs=[p])
            got = [p.grad]
        elif how == "grad-weights":
            got = list(torch.autograd.grad(loss(p), [p, *weights]))
        else:
            loss(p).backward()
            got = [p.grad] + [w.grad for w in weights]
        return got, len(made)

    for how in ("forces", "backward-inputs", "grad-weights", "backward"):
        (got, n_skip), (ref, n_all) = run(how, True), run(how, False)
        assert n_all > 0
        assert n_skip == (0 if how in ("forces", "backward-inputs") else n_all)
        for a, b in zip(got, ref):
            assert torch.equal(a, b)


def _fused_layer_in_child(queue) -> None:
    torch.set_num_threads(1)  # as DataLoader workers do: OpenMP itself does not survive a fork
    # The parent's patch (get_num_threads -> 2) is inherited, so that the kernel uses its worker pool here too;
    # the kernel's restore of that pretended count must not give OpenMP two threads in a forked process (its
    # next parallel region, e.g. a GEMM on this thread, would hang in any code).
    set_num_threads = torch.set_num_threads
    torch.set_num_threads = lambda n: set_num_threads(1)
    layer, ei, x, pos, e = _FORK_CASE
    queue.put({d: v.tolist() for d, v in _conv_fn(layer, ei, 2)(x, pos, e).items()})


_FORK_CASE = None


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_fused_kernel_works_in_a_forked_child_after_the_parent_used_worker_threads(monkeypatch):
    """A fork after the worker pool started must not hang the child (it gets a fresh pool)."""
    import multiprocessing as mp
    from se3t.nn import fused
    global _FORK_CASE
    monkeypatch.setattr(fused, "GROUP_EDGES", 2)
    monkeypatch.setattr(fused, "PARALLEL_MIN_VALUES", 0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    layer = ConvSE3(FIBER_IN, Fiber({0: 2, 1: 2}), FIBER_EDGE).double()
    layer.chunk_size = 1
    pos, ei, x, e = _edge_inputs(torch.float64, num_nodes=14)
    ref = _conv_fn(layer, ei, 2)(x, pos, e)        # the parent's pool now has live threads
    assert fused._pool is not None
    _FORK_CASE = (layer, ei, x, pos, e)
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_fused_layer_in_child, args=(queue,))
    child.start()
    try:
        out = queue.get(timeout=60)
    finally:
        child.join(timeout=10)
        if child.is_alive():
            child.kill()
    for d in ref:
        assert torch.allclose(torch.tensor(out[d], dtype=torch.float64), ref[d], atol=1e-12)


@pytest.mark.parametrize("values", [None, 8], ids=["default-tiles", "one-channel-tiles"])
@pytest.mark.parametrize("order", KERNEL_ORDERS)
@pytest.mark.parametrize("level", [FuseLevel.FULL, FuseLevel.EDGE_FRAME], ids=lambda v: v.name)
def test_fused_kernel_under_bf16_autocast_close_to_fp32(level, order, values, monkeypatch):
    """bf16 autocast: outputs and every parameter's gradient (accumulated in float32 per tile) within bf16
    rounding of float32's, with the default tiles and with one output channel per tile."""
    from se3t.nn import fused
    set_kernel_order(monkeypatch, order)
    if values is not None:
        monkeypatch.setattr(fused, "CHUNK_VALUES", values)
    layer = ConvSE3(FIBER_IN, Fiber({0: 4, 1: 4}), FIBER_EDGE, use_layer_norm=True, fuse_level=level)
    pos, ei, x, e = _edge_inputs(torch.float32, num_nodes=14)
    fn = _conv_fn(layer, ei, 2)
    res = []
    for bf16 in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = fn(x, pos, e)
            loss = sum(o.float().pow(2).sum() for o in out.values())
        res.append((out, torch.autograd.grad(loss, list(layer.parameters()))))
    (ref, ref_grads), (out, grads) = res
    for d in ref:
        assert out[d].dtype == torch.bfloat16
        err = (out[d].float() - ref[d]).abs().max() / ref[d].abs().max()
        assert err < 5e-2
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.float32 and torch.isfinite(g).all()
        assert (g - r).abs().max() <= 5e-2 * r.abs().max()


def test_attention_edge_dot_gradients_and_memory():
    """The attention logits' dot product sum_d <k_d[e], q_d[dst[e]]> over two degrees: first and second order
    gradchecks, the plain formula's values, and only the given keys (here strided views, as the conv's outputs
    are) and node-level queries kept for backward: no copies, no edge-level gather."""
    from se3t.nn.attention import _EdgeDot
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, dtype=torch.float64, generator=g, requires_grad=True)  # noqa: E731
    kv0, kv1 = rnd(9, 1, 8), rnd(9, 3, 8)  # component-major conv outputs [E, 2d+1, C]; keys are channels 4..7
    k0, k1 = (kv[:, :, 4:].transpose(1, 2).unflatten(1, (2, 2)) for kv in (kv0, kv1))  # [E, H=2, 2, 2d+1] views
    q0, q1 = rnd(5, 2, 2, 1), rnd(5, 2, 2, 3)
    dst = torch.tensor([0, 4, 4, 1, 0, 2, 4, 1, 0])  # node 3 receives nothing
    fn = lambda *a: _EdgeDot.apply(dst, *a) ** 2  # noqa: E731  (non-linear: second order is not trivial)
    assert torch.autograd.gradcheck(fn, (k0, k1, q0, q1)) and torch.autograd.gradgradcheck(fn, (k0, k1, q0, q1))
    plain = (k0 * q0[dst]).sum((-2, -1)) + (k1 * q1[dst]).sum((-2, -1))
    assert torch.allclose(_EdgeDot.apply(dst, k0, k1, q0, q1), plain, atol=1e-14, rtol=0)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        _EdgeDot.apply(dst, k0, k1, q0, q1)
    assert [t.data_ptr() for t in saved] == [t.data_ptr() for t in (dst, k0, k1, q0, q1)]
    assert {t.untyped_storage().data_ptr() for t in saved[1:3]} == {kv0.untyped_storage().data_ptr(),
                                                                    kv1.untyped_storage().data_ptr()}


def test_attention_channel_split_gradients_and_views():
    """The conv output's split into values and keys: views of the output (no copy), first and second order
    gradchecks with both parts used or only one (the other's gradient is then zero), and one gradient tensor in
    backward instead of a zero-filled one per part."""
    from se3t.nn.attention import _SplitChannels
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 5, dtype=torch.float64, generator=g).transpose(1, 2).requires_grad_(True)  # [6, 5, 3]
    a, b = _SplitChannels.apply(x, 2)
    assert torch.equal(a, x[:, :2]) and torch.equal(b, x[:, 2:])
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    for use in ("both", "first", "second"):
        def fn(x, use=use):
            a, b = _SplitChannels.apply(x, 2)
            return {"both": (a.sin() * 2).sum() + (b ** 3).sum(), "first": a.sin().sum(), "second": (b ** 3).sum()}[use]
        assert torch.autograd.gradcheck(fn, (x,)) and torch.autograd.gradgradcheck(fn, (x,))
    grad, = torch.autograd.grad(_SplitChannels.apply(x, 2)[1].sum(), x)
    assert torch.equal(grad[:, :2], torch.zeros(6, 2, 3, dtype=torch.float64))
    assert torch.equal(grad[:, 2:], torch.ones(6, 3, 3, dtype=torch.float64))
    with torch.profiler.profile(profile_memory=True) as prof:
        a, b = _SplitChannels.apply(x, 2)
        torch.autograd.grad((a * 2).sum() + (b * 3).sum(), x)
    allocations = [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
                   and e.nbytes() >= x.numel() * 8]
    assert len(allocations) == 1  # one x-sized tensor: the concatenated gradient


def test_attention_logits_are_summed_over_degrees_in_float32():
    """bf16 keys/queries (autocast): the logits are the float32 sum over every degree, rounded to bf16 once."""
    from se3t.nn.attention import _edge_logits
    g = torch.Generator().manual_seed(0)
    dst = torch.randint(0, 6, (40,), generator=g)
    keys = [torch.randn(40, 4, 8, 2 * d + 1, generator=g).bfloat16() for d in range(4)]
    queries = [torch.randn(6, 4, 8, 2 * d + 1, generator=g).bfloat16() for d in range(4)]
    out = _edge_logits(dst, keys, queries)
    exact = sum((k * q[dst]).float().sum((-2, -1)) for k, q in zip(keys, queries))  # the same bf16 products
    assert out.dtype == torch.bfloat16
    assert ((out.float() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-6).all()


@pytest.mark.parametrize("L", [1, 3])
def test_channel_mix_gradients_memory_and_autocast(L):
    """W @ x per node (LinearSE3, the self-interaction, the attention projection): gradcheck and gradgradcheck,
    torch.matmul's values, x itself (not a transposed copy) kept for backward, and a bf16 autocast backward; degree 0
    (``L = 1``) runs as one GEMM over the nodes."""
    from se3t.nn.linear import channel_mix
    g = torch.Generator().manual_seed(0)
    W = torch.randn(3, 8, dtype=torch.float64, generator=g, requires_grad=True)
    x = torch.randn(5, 8, L, dtype=torch.float64, generator=g, requires_grad=True)
    fn = lambda W, x: channel_mix(W[:, 2:], x[:, :6]).sin()  # noqa: E731  (weight column view, as the projection)
    assert torch.autograd.gradcheck(fn, (W, x)) and torch.autograd.gradgradcheck(fn, (W, x))
    torch.testing.assert_close(channel_mix(W, x), torch.matmul(W, x), rtol=1e-14, atol=1e-14)
    assert channel_mix(W, x).is_contiguous()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        channel_mix(W, x)
    assert [t.data_ptr() for t in saved] == [W.data_ptr(), x.data_ptr()]
    Wf, xf = W.detach().float().requires_grad_(True), x.detach().float().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = channel_mix(Wf, xf)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert Wf.grad.dtype == torch.float32 and xf.grad.dtype == torch.float32
    assert torch.allclose(xf.grad, W.detach().float().sum(0)[None, :, None].expand_as(xf), rtol=1e-2)


@pytest.mark.parametrize("L", [1, 5, 7])
@pytest.mark.parametrize("needs", ["W", "x", "both"])
def test_channel_mix_rows_path_equals_matmul(L, needs):
    """The CPU path (one GEMM over the ``N*L`` rows) against ``torch.matmul`` and its autograd in float64: values
    without grad (inference), gradients for each combination of inputs that need them, non-contiguous inputs (a
    channel slice), an empty node set, and a clear error for mismatched shapes."""
    from se3t.nn.linear import channel_mix
    g = torch.Generator().manual_seed(1)
    W0 = torch.randn(4, 9, dtype=torch.float64, generator=g)
    x0 = torch.randn(11, 9, L, dtype=torch.float64, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(channel_mix(W0, x0), torch.matmul(W0, x0), rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(channel_mix(W0[:, 3:], x0[:, 3:]), torch.matmul(W0[:, 3:], x0[:, 3:]),
                                   rtol=1e-14, atol=1e-14)
    grad_out = torch.randn(11, 4, L, dtype=torch.float64, generator=g)
    results = []
    for mix in (channel_mix, torch.matmul):
        W = W0.clone().requires_grad_(needs in ("W", "both"))
        x = x0.clone().requires_grad_(needs in ("x", "both"))
        out = mix(W, x)
        out.backward(grad_out)
        results.append((out.detach(), W.grad, x.grad))
    for ours, ref in zip(*results):
        if ref is None:
            assert ours is None
        else:
            torch.testing.assert_close(ours, ref, rtol=1e-13, atol=1e-13)
    for bad_W, bad_x in ((W0, x0[:, :8]), (W0[None], x0), (W0, x0[0])):
        with pytest.raises(ValueError, match="channel_mix needs W"):
            channel_mix(bad_W, bad_x)
    x_empty = torch.zeros(0, 9, L, dtype=torch.float64, requires_grad=True)
    out = channel_mix(W0.clone().requires_grad_(), x_empty)
    assert out.shape == (0, 4, L)
    out.sum().backward()
    assert x_empty.grad.shape == (0, 9, L)


@pytest.mark.parametrize("level", [FuseLevel.FULL, FuseLevel.EDGE_FRAME], ids=lambda v: v.name)
def test_one_row_outer_order_is_chosen_for_wide_blocks_and_equals_r_order(level, monkeypatch):
    """With the default threshold the outer order runs exactly for one-row blocks with ``C_out >= 2 H`` (here a
    conv with 8 hidden radial features and 17 degree-0 outputs: FULL's degree-0 block, EDGE_FRAME's order 0), and
    gives the R order's outputs and gradients (float64)."""
    from se3t.nn import fused
    chosen = []
    use_outer = fused._use_outer
    monkeypatch.setattr(fused, "_use_outer", lambda b, H, E: chosen.append((b.K, b.c_out, H, use_outer(b, H, E)))
                        or use_outer(b, H, E))
    monkeypatch.setattr(fused, "LAYOUT_COPY_MIN_EDGES", 0)  # (on few edges no block takes the outer order)
    layer = ConvSE3(FIBER_IN, Fiber({0: 17, 1: 2}), FIBER_EDGE, self_interaction=True, fuse_level=level,
                    radial_hidden=8).double()
    pos, ei, x, e = _edge_inputs(torch.float64, num_nodes=14)
    pos.requires_grad_(level == FuseLevel.FULL)
    xs = {d: v.clone().requires_grad_(True) for d, v in x.items()}
    fn = _conv_fn(layer, ei, 2)
    res = []
    for outer in (True, False):
        monkeypatch.setattr(fused, "ONE_ROW_OUTER", outer)
        chosen.clear()
        out = fn(xs, pos, e)
        loss = sum((o.sin() * (d + 1)).sum() for d, o in out.items())
        wrt = ([pos] if pos.requires_grad else []) + [*xs.values(), *layer.parameters()]
        res.append([*out.values(), *torch.autograd.grad(loss, wrt)])
        if outer:
            used = [c for c in chosen if c[3]]
            assert used and all(K == 1 and c_out >= 2 * H for K, c_out, H, _ in used)
            assert all(not (K == 1 and c_out >= 2 * H) for K, c_out, H, u in chosen if not u)
    for a, b in zip(*res):
        assert torch.allclose(a, b, atol=1e-11, rtol=0)


def test_kernel_tiling_keeps_a_tile_of_r_within_the_budget():
    """The R order's tiling on CPU: groups of GROUP_EDGES edges, output channels cut into even tiles so a tile of
    R (``group * tile * K_in`` values) fits the budget; a block wider than the budget for one edge and channel
    still gets one; accelerators take whole rows of R for as many edges as their budget holds."""
    from se3t.nn import fused
    from se3t.nn.fused import BlockSpec, _tiling
    cpu, gpu = torch.device("cpu"), torch.device("cuda")  # only the device type is read: no GPU needed
    wide = BlockSpec(0, 96, 2, 192, ())  # the paper model's edge-frame order 1: 96 channels from 192 inputs
    group, tile = _tiling(None, wide, 3744, cpu)
    assert group == fused.GROUP_EDGES and group * tile * 192 <= fused.CHUNK_VALUES and 1 < -(-96 // tile) < 96
    assert -(-96 // tile) * tile - 96 < -(-96 // tile)  # even tiles: the last is short by less than one per tile
    assert _tiling(7, wide, 3744, cpu)[0] == 7 and _tiling(None, wide, 50, cpu)[0] == 50
    huge = BlockSpec(0, 3, 1, fused.CHUNK_VALUES * 2, ())
    assert _tiling(None, huge, 100, cpu) == (1, 1)
    # 2-byte dtypes: their own budget and larger groups, cut so every intra-op thread still gets two groups
    # (2 threads here: 3,744 edges allow 936 per group, so the full 512; 1,200 edges only 300)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        group, tile = _tiling(None, wide, 3744, cpu, torch.bfloat16)
        assert group == fused.GROUP_EDGES_16BIT == 512 and group > fused.GROUP_EDGES
        assert group * tile * 192 <= fused.CHUNK_VALUES_16BIT and 1 < -(-96 // tile) < 96
        assert _tiling(None, wide, 3744, cpu, torch.float64) == _tiling(None, wide, 3744, cpu)
        assert _tiling(None, wide, 1200, cpu, torch.float16)[0] == 300
        assert fused._outer_step(None, BlockSpec(0, 1, 128, 32, ()), 32, 1200, cpu, torch.bfloat16) == 300
        assert _tiling(None, wide, 400, cpu, torch.bfloat16)[0] == fused.GROUP_EDGES  # never below fp32's group
    finally:
        torch.set_num_threads(threads)
    group, tile = _tiling(None, wide, 10 ** 6, gpu)
    assert tile == 96 and group == fused.CHUNK_VALUES_ACCELERATOR // (96 * 192)


@pytest.mark.parametrize("kind", ["attention", "conv", "conv-reference-parity"])
def test_layers_on_a_block_of_destination_nodes_give_those_rows(kind):
    """``dst_feats``: a layer run on a block of destination nodes with all their incoming edges (sources from all
    nodes) gives the block's rows of the whole graph's output, with the same gradients (summed over blocks)."""
    from se3t.graph import destination_blocks
    fout = Fiber({0: 4, 1: 4, 2: 4})
    if kind == "attention":
        layer = AttentionBlockSE3(FIBER_IN, fout, FIBER_EDGE, num_heads=2, use_layer_norm=True).double()
    else:
        layer = ConvSE3(FIBER_IN, fout, FIBER_EDGE, self_interaction=True,
                        reference_parity=kind == "conv-reference-parity").double()
    pos, ei, x, e = _edge_inputs(torch.float64, num_nodes=14)
    ei = ei[:, torch.randperm(ei.shape[1])]
    rel = pos[ei[1]] - pos[ei[0]]
    radial_in = torch.cat([e[0].squeeze(-1), safe_norm(rel)[0]], -1)
    basis = get_basis(rel, 2)
    params = list(layer.parameters())
    full = layer(x, e, radial_in, ei, basis)
    weights = {d: torch.randn_like(o) for d, o in full.items()}
    grads = torch.autograd.grad(sum((o * weights[d]).sum() for d, o in full.items()), params)
    blocks = destination_blocks(ei, 14, 3)
    assert len(blocks) == 3
    block_grads = [torch.zeros_like(p) for p in params]
    for b in blocks:
        sub = ei[:, b.edges] - torch.tensor([[0], [b.start]])
        out = layer(x, {d: t[b.edges] for d, t in e.items()}, radial_in[b.edges], sub, basis.select(b.edges),
                    dst_feats={d: t[b.start:b.stop] for d, t in x.items()})
        for d in full:
            assert torch.allclose(out[d], full[d][b.start:b.stop], atol=1e-12, rtol=0)
        loss = sum((o * weights[d][b.start:b.stop]).sum() for d, o in out.items())
        for acc, g in zip(block_grads, torch.autograd.grad(loss, params)):
            acc += g
    for g, bg in zip(grads, block_grads):
        assert torch.allclose(g, bg, atol=1e-11, rtol=0)


def test_radial_mlp_recompute_hidden_keeps_only_its_input():
    """With ``recompute_hidden`` (set by a low-memory model) the MLP's hidden features are bitwise the same, with
    the same gradients, and backward keeps none of its [E, hidden] activations (they are recomputed there)."""
    from se3t.nn.radial import RadialMLP
    torch.manual_seed(0)
    mlp = RadialMLP(5, 12, hidden=16, use_layer_norm=True).double()
    x = torch.randn(40, 5, dtype=torch.float64, requires_grad=True)
    results, kept = [], []
    for recompute in (False, True):
        mlp.recompute_hidden = recompute
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = mlp.hidden_features(x)
        kept.append(sum(1 for t in saved if t.shape == (40, 16)))
        results.append([out, *torch.autograd.grad(out.sin().sum(), [x, *mlp.net[:-1].parameters()])])
    assert all(torch.equal(a, b) for a, b in zip(*results))
    assert kept[0] >= 3 and kept[1] == 0, kept
    model = SE3Transformer(num_layers=1, fiber_in=Fiber({0: 3}), fiber_hidden=Fiber({0: 4, 1: 4}),
                           fiber_out=Fiber({0: 2}), num_heads=2, channels_div=2, low_memory=True)
    mlps = [m for m in model.modules() if isinstance(m, RadialMLP)]
    assert mlps and all(m.recompute_hidden for m in mlps)


def test_blockwise_kernel_cuts_smaller_cpu_tiles():
    from se3t.nn import fused
    from se3t.nn.fused import BlockSpec, _tiling
    block = BlockSpec(0, 96, 2, 192, ())
    cpu = torch.device("cpu")
    (g0, t0), (g1, t1) = (_tiling(None, block, 3738, cpu, torch.float32, blockwise) for blockwise in (False, True))
    assert g0 == g1 == fused.GROUP_EDGES
    assert g0 * t0 * 192 <= fused.CHUNK_VALUES and g1 * t1 * 192 <= fused.CHUNK_VALUES // 2 < g0 * t0 * 192
