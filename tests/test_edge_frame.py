"""FuseLevel.EDGE_FRAME: the kernel in each edge's frame is the TFN kernel, exactly, with every fallback."""

import inspect

import pytest
import torch
from e3nn import o3

from se3t import Basis, ConvSE3, Fiber, FuseLevel, SE3Transformer, get_basis
from se3t.basis import safe_norm
from se3t.edge_frame import _wigner, edge_frames, frame_rows, so2_coefficients
from se3t.testing import assert_equivariant

from core_helpers import KERNEL_ORDERS, random_features, random_graph, set_kernel_order

PAIRS = [(d_in, d_out) for d_in in range(5) for d_out in range(5)]


@pytest.mark.parametrize("pair", PAIRS, ids=str)
def test_kernel_on_the_polar_axis_is_the_so2_form(pair):
    """B(ŷ)_f = sum_s T[s, f] E_s with E_0 = e(0,0), E_a(m) = e(+m,+m) + e(-m,-m), E_c(m) = e(+m,-m) - e(-m,+m):
    the structure the edge-frame kernel relies on (rows m_in, columns m_out)."""
    d_in, d_out = pair
    B = get_basis(torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64), max(pair), [d_in])[pair][0]
    T = so2_coefficients(d_in, d_out)
    rebuilt = torch.zeros_like(B)
    for f in range(B.shape[1]):
        rebuilt[d_in, f, d_out] = T[0, f]
        for m in range(1, min(pair) + 1):
            a, c = T[2 * m - 1, f], T[2 * m, f]
            rebuilt[d_in + m, f, d_out + m] = rebuilt[d_in - m, f, d_out - m] = a
            rebuilt[d_in + m, f, d_out - m], rebuilt[d_in - m, f, d_out + m] = c, -c
    assert torch.allclose(rebuilt, B, atol=1e-14, rtol=0)
    assert torch.linalg.matrix_rank(T) == T.shape[0]  # an invertible reparametrisation: same function class


def test_wigner_matrices_match_e3nn_in_float64():
    alpha = torch.rand(50, dtype=torch.float64) * 6.2 - 3.1
    beta = torch.rand(50, dtype=torch.float64) * 3.1
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # e3nn's own generators are made in the default dtype
    try:
        expected = [o3.wigner_D(l, alpha, beta, torch.zeros_like(alpha)) for l in range(5)]
    finally:
        torch.set_default_dtype(previous)
    for l in range(5):
        assert torch.allclose(_wigner(l, alpha, beta), expected[l], atol=1e-13, rtol=0)


def test_frames_rotate_the_polar_kernel_into_every_edge():
    """B(r̂) = rot_in B(ŷ) rot_out^T for every pair, including edges along the poles."""
    rel = torch.randn(30, 3, dtype=torch.float64)
    rel[:4] = torch.tensor([[0, 1.0, 0], [0, -2.0, 0], [0, 0, 3.0], [1e-9, 1.0, 0]], dtype=torch.float64)
    basis = get_basis(rel, 3)
    polar = get_basis(torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64), 3)
    frames = basis.edge_frames()
    for (d_in, d_out) in basis:
        rebuilt = torch.einsum("eba,afc,edc->ebfd", frames.rot[d_in], polar[(d_in, d_out)][0], frames.rot[d_out])
        assert torch.allclose(rebuilt, basis[(d_in, d_out)], atol=1e-12, rtol=0), (d_in, d_out)


def test_frame_rows_select_the_rotated_components():
    rot = get_basis(torch.randn(5, 3, dtype=torch.float64), 2).edge_frames().rot[2]
    x = torch.randn(5, 3, 5, dtype=torch.float64)  # [E, C, 2l+1]
    xr = x @ rot                                     # features in the edge frame
    rows = frame_rows(rot, 2, 1)                     # [E, 4, 5]
    t = rows @ x.transpose(1, 2)                     # [E, (k, slot), C]
    plus, minus = xr[:, :, 3], xr[:, :, 1]
    for got, want in zip(t.unbind(1), (plus, -minus, minus, plus)):
        assert torch.allclose(got, want, atol=1e-14)
    assert torch.allclose((frame_rows(rot, 2, 0) @ x.transpose(1, 2))[:, 0], xr[:, :, 2], atol=1e-14)


def test_frames_padding_scale_and_zero_length_edges():
    rel = torch.randn(6, 3, dtype=torch.float64)
    sh = get_basis(rel, 2).harmonics
    scaled = sh * torch.tensor([1.0, 0.5, 2.0, 0.0, 1.0, 1.0], dtype=torch.float64)[:, None]
    frames = edge_frames(scaled, 2)
    assert frames is not None
    assert frames.rot[1][3].abs().max() == 0 and frames.back[2][3].abs().max() == 0  # padding: no message
    assert torch.allclose(frames.back[1][1], 0.5 * frames.rot[1][1].T)
    rel[2] = 0.0  # a zero-length edge has only Y_0: no frame, the conv takes the basis path
    assert get_basis(rel, 2).edge_frames() is None
    noisy = sh.clone()
    noisy[0, 5] += 1e-2  # not the harmonics of any direction
    assert edge_frames(noisy, 2) is None
    blocks = Basis.from_pairs({k: v for k, v in get_basis(torch.randn(4, 3, dtype=torch.float64), 1).items()})
    assert blocks.harmonics is None and blocks.edge_frames() is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_frames_of_get_basis_skip_the_rebuild_and_agree_with_it(dtype):
    """get_basis's harmonics are made from edge vectors: their frames are checked for zero-length edges only
    (no rebuild of every degree), and equal the frames of the same harmonics checked in full; their scale is one,
    so the rotations back are views of the frames (also after a selection of edges), which the scale read off the
    harmonics changes by rounding only."""
    rel = torch.randn(9, 3, dtype=dtype)
    basis = get_basis(rel, 3)
    assert basis._from_edge_vectors
    fast, full = basis.edge_frames(), edge_frames(basis.harmonics, 3)
    eps = torch.finfo(dtype).eps
    for r, b, full_r, full_b in zip(fast.rot, fast.back, full.rot, full.back):
        assert torch.equal(r, full_r) and torch.allclose(b, full_b, atol=4 * eps, rtol=0)
        assert b.data_ptr() == r.data_ptr() and torch.equal(b, r.transpose(1, 2))
    selected = basis.select(torch.tensor([2, 0]))
    assert selected._from_edge_vectors
    for r, b in zip(*selected.edge_frames()):
        assert b.data_ptr() == r.data_ptr() and torch.equal(r, fast.rot[r.shape[1] // 2][[2, 0]])
    # what users hand in is checked in full: the same numbers through from_harmonics, or mapped by apply()
    assert not Basis.from_harmonics(basis.harmonics, 3)._from_edge_vectors
    assert not basis.apply(lambda t: t * 1.0)._from_edge_vectors
    noisy = basis.harmonics.clone()
    noisy[0, 5] += 1e-2
    assert Basis.from_harmonics(noisy, 3).edge_frames() is None
    rel[4] = 0.0
    assert get_basis(rel, 3).edge_frames() is None  # a zero-length edge: no frame, on the fast check too


FIBER_IN = Fiber({0: 3, 1: 2, 2: 2, 3: 1})


def _conv_inputs(edge_fiber, num_nodes=9, dtype=torch.float64):
    pos, ei, _ = random_graph(num_nodes, dtype=dtype)
    return pos, ei, random_features(FIBER_IN, num_nodes, dtype), random_features(edge_fiber, ei.shape[1], dtype)


def _run(layer, ei, x, pos, e, max_degree):
    rel = pos[ei[1]] - pos[ei[0]]
    radial_in = torch.cat([e[0].squeeze(-1), safe_norm(rel)[0]], -1)
    return layer(x, e, radial_in, ei, get_basis(rel, max_degree))


@pytest.mark.parametrize("radial", ["conv", "output_degree", "input_degree", "pair"])
@pytest.mark.parametrize("edge_fiber", [Fiber({0: 2}), Fiber({0: 2, 2: 1})], ids=["scalar-edges", "degree2-edges"])
@pytest.mark.parametrize("pool", [True, False])
@pytest.mark.parametrize("order", KERNEL_ORDERS)
# degree 4 out of degree <= 3 inputs: orders no input reaches (a zero run); channel counts with gcd 1 (the messages
# gathered value by value) and with gcd 2 (in runs of two channels)
@pytest.mark.parametrize("fiber_out", [Fiber({0: 2, 1: 3, 2: 1, 3: 2, 4: 1}), Fiber({0: 4, 1: 2, 2: 4, 3: 2, 4: 2})],
                         ids=["runs-of-1", "runs-of-2"])
def test_edge_frame_equals_full_and_none_forward_and_backward(radial, edge_fiber, pool, order, fiber_out,
                                                              monkeypatch):
    set_kernel_order(monkeypatch, order)
    layer = ConvSE3(FIBER_IN, fiber_out, edge_fiber, pool=pool, self_interaction=True, radial=radial).double()
    pos, ei, x, e = _conv_inputs(edge_fiber)
    x = {d: v.requires_grad_() for d, v in x.items()}
    e = {d: v.requires_grad_() for d, v in e.items()}
    results = {}
    for level in (FuseLevel.NONE, FuseLevel.FULL, FuseLevel.EDGE_FRAME):
        layer.fuse_level = level
        out = _run(layer, ei, x, pos, e, 4)
        loss = sum((o * torch.randn(o.shape, generator=torch.Generator().manual_seed(d), dtype=o.dtype)).sum()
                   for d, o in out.items())
        inputs = list(x.values()) + list(e.values()) + list(layer.parameters())
        results[level] = (out, torch.autograd.grad(loss, inputs))
    ref_out, ref_grads = results[FuseLevel.NONE]
    for level in (FuseLevel.FULL, FuseLevel.EDGE_FRAME):
        out, grads = results[level]
        for d in ref_out:
            assert torch.allclose(out[d], ref_out[d], atol=1e-11, rtol=0), (level, d)
        for g, rg in zip(grads, ref_grads):
            assert torch.allclose(g, rg, atol=1e-10, rtol=0), level


def test_edge_frame_gradcheck():
    """Numerical gradients of the edge-frame conv: node features, radial inputs and the radial last layer, and of
    its gradients."""
    fiber_in = Fiber({0: 2, 1: 1, 2: 1})
    layer = ConvSE3(fiber_in, Fiber({0: 1, 1: 2, 2: 1}), Fiber({0: 1}), fuse_level="EDGE_FRAME").double()
    pos, ei, _ = random_graph(6, dtype=torch.float64)
    x = random_features(fiber_in, 6)
    e = random_features(Fiber({0: 1}), ei.shape[1])
    rel = pos[ei[1]] - pos[ei[0]]
    basis = get_basis(rel, 2)
    radial_in = torch.cat([e[0].squeeze(-1), safe_norm(rel)[0]], -1)
    name = "radial.0.net.%d.weight" % (len(layer.radial[0].net) - 1)
    assert dict(layer.named_parameters())[name] is layer.radial[0].last.weight

    def fn(x0, x1, x2, r, weight):
        out = torch.func.functional_call(layer, {name: weight}, ({0: x0, 1: x1, 2: x2}, e, r, ei, basis))
        return tuple(out[d] for d in sorted(out))

    args = [t.clone().requires_grad_() for t in (x[0], x[1], x[2], radial_in, layer.radial[0].last.weight.detach())]
    assert torch.autograd.gradcheck(fn, args, atol=1e-7)
    # second derivatives through the fused calls, the mapped weights' group included (fast mode: a random
    # projection of the second derivatives)
    assert torch.autograd.gradgradcheck(fn, args, atol=1e-7, fast_mode=True)


def _polar_graph(num_nodes=9):
    """The conv inputs with node 1 straight above node 0 (an edge along +y and one along -y: the frames' poles,
    where the angles have no derivative)."""
    pos, ei, x, e = _conv_inputs(Fiber({0: 2}), num_nodes)
    pos[1] = pos[0] + torch.tensor([0.0, 0.7, 0.0], dtype=pos.dtype)
    keep = ~(((ei[0] == 0) & (ei[1] == 1)) | ((ei[0] == 1) & (ei[1] == 0)))
    ei = torch.cat([ei[:, keep], torch.tensor([[0, 1], [1, 0]])], dim=1)
    return pos, ei, x, random_features(Fiber({0: 2}), ei.shape[1], pos.dtype)


def _count_edge_frame_calls(monkeypatch):
    calls = []
    original = ConvSE3._edge_frame_messages
    monkeypatch.setattr(ConvSE3, "_edge_frame_messages", lambda self, *a: calls.append(1) or original(self, *a))
    return calls


@pytest.mark.parametrize("order", KERNEL_ORDERS)
def test_forces_go_through_the_frames(order, monkeypatch):
    """Position gradients at EDGE_FRAME flow through the frames (the edge-frame path runs, no basis): FULL's
    forces, edges along the poles included; gradcheck, and gradgradcheck (training on forces)."""
    set_kernel_order(monkeypatch, order)
    calls = _count_edge_frame_calls(monkeypatch)
    layer = ConvSE3(FIBER_IN, Fiber({0: 2, 1: 1, 2: 1}), Fiber({0: 2})).double()
    pos, ei, x, e = _polar_graph()
    forces = {}
    for level in (FuseLevel.FULL, FuseLevel.EDGE_FRAME):
        layer.fuse_level = level
        p = pos.clone().requires_grad_()
        out = _run(layer, ei, x, p, e, 3)
        forces[level] = torch.autograd.grad(sum(o.pow(2).sum() for o in out.values()), p)[0]
    assert len(calls) == 1
    assert forces[FuseLevel.FULL][:2].abs().min() > 0
    assert torch.allclose(forces[FuseLevel.FULL], forces[FuseLevel.EDGE_FRAME], atol=1e-12, rtol=0)

    def energy(p):
        out = _run(layer, ei, x, p, e, 3)
        return sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view(o.shape)).sum() for o in out.values())

    p = pos.clone().requires_grad_()
    assert torch.autograd.gradcheck(energy, (p,)) and torch.autograd.gradgradcheck(energy, (p,))
    assert len(calls) > 3


def test_forces_through_scaled_harmonics_frames():
    """Harmonics that are not an edge vector's (``s * Y(r̂)`` with a smooth scale, zero on one edge: padding):
    the rotations back carry ``s``, and the gradient flows to both the direction and the scale."""
    layer = ConvSE3(FIBER_IN, Fiber({0: 2, 1: 1}), Fiber({0: 2}), fuse_level=FuseLevel.EDGE_FRAME).double()
    pos, ei, x, e = _polar_graph()
    max_degree = 3

    def harmonics(p):
        rel = p[ei[1]] - p[ei[0]]
        scale = torch.sigmoid(rel.norm(dim=1, keepdim=True)) * (torch.arange(rel.shape[0]) != 3)[:, None]
        return scale * o3.spherical_harmonics(list(range(2 * max_degree + 1)), rel, normalize=True,
                                              normalization="integral")

    def energy(p, level):
        layer.fuse_level = level
        rel = p[ei[1]] - p[ei[0]]
        radial_in = torch.cat([e[0].squeeze(-1), safe_norm(rel)[0]], -1)
        out = layer(x, e, radial_in, ei, Basis.from_harmonics(harmonics(p), max_degree))
        return sum(o.pow(2).sum() for o in out.values())

    p = pos.clone().requires_grad_()
    assert Basis.from_harmonics(harmonics(pos), max_degree).edge_frames() is not None
    f_full, = torch.autograd.grad(energy(p, FuseLevel.FULL), p)
    f_frame, = torch.autograd.grad(energy(p, FuseLevel.EDGE_FRAME), p)
    assert torch.allclose(f_full, f_frame, atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(lambda q: energy(q, FuseLevel.EDGE_FRAME), (p,))


def test_frames_made_without_grad_are_not_reused_for_forces():
    """A basis whose frames were first made as constants (under no_grad: validation) makes frames with gradients
    when forces are asked later, and keeps both."""
    layer = ConvSE3(FIBER_IN, Fiber({0: 2, 1: 1}), Fiber({0: 2}), fuse_level=FuseLevel.EDGE_FRAME).double()
    pos, ei, x, e = _polar_graph()
    p = pos.clone().requires_grad_()
    rel = p[ei[1]] - p[ei[0]]
    radial_in = torch.cat([e[0].squeeze(-1), safe_norm(rel)[0]], -1)
    basis = get_basis(rel, 3)
    with torch.no_grad():
        constant = basis.edge_frames()
        layer(x, e, radial_in, ei, basis)
    out = layer(x, e, radial_in, ei, basis)
    forces, = torch.autograd.grad(sum(o.pow(2).sum() for o in out.values()), p)
    ref, = torch.autograd.grad(sum(o.pow(2).sum() for o in _run(layer, ei, x, p, e, 3).values()), p)
    assert torch.equal(forces, ref)
    assert not constant.rot[1].requires_grad and basis.edge_frames().rot[1].requires_grad
    with torch.no_grad():
        assert basis.edge_frames() is constant


def test_zero_length_edges_take_the_basis_path():
    """A zero-length edge (no frame) gives FULL's outputs."""
    layer = ConvSE3(FIBER_IN, Fiber({0: 2, 1: 1}), Fiber({0: 2})).double()
    pos, ei, x, e = _conv_inputs(Fiber({0: 2}))
    pos[ei[0, 0]] = pos[ei[1, 0]]  # edge 0 now has zero length
    outs = {}
    for level in (FuseLevel.FULL, FuseLevel.EDGE_FRAME):
        layer.fuse_level = level
        outs[level] = _run(layer, ei, x, pos, e, 3)
    for d in outs[FuseLevel.FULL]:
        assert torch.allclose(outs[FuseLevel.FULL][d], outs[FuseLevel.EDGE_FRAME][d], atol=1e-12, rtol=0)


@pytest.mark.parametrize("order", KERNEL_ORDERS)
def test_edge_frame_padding_edges_send_nothing(order, monkeypatch):
    """Zero harmonics (se3t_data's padding edges) give zero messages and no gradient to the padding edges'
    radial inputs, as the basis path does."""
    set_kernel_order(monkeypatch, order)
    layer = ConvSE3(FIBER_IN, Fiber({0: 2, 1: 1, 2: 2}), Fiber({0: 2}), pool=False,
                    fuse_level=FuseLevel.EDGE_FRAME).double()
    pos, ei, x, e = _conv_inputs(Fiber({0: 2}))
    rel = pos[ei[1]] - pos[ei[0]]
    sh = get_basis(rel, 3).harmonics.clone()
    sh[:3] = 0.0
    radial_in = torch.cat([e[0].squeeze(-1), safe_norm(rel)[0]], -1).requires_grad_()
    out = layer(x, e, radial_in, ei, Basis.from_harmonics(sh, 3))
    for o in out.values():
        assert o[:3].abs().max() == 0 and o[3:].abs().max() > 0
    sum((o * torch.randn_like(o)).sum() for o in out.values()).backward()
    assert radial_in.grad[:3].abs().max() == 0 and radial_in.grad[3:].abs().max() > 0


@pytest.mark.parametrize("order", KERNEL_ORDERS)
@pytest.mark.parametrize("low_memory", [False, True])
def test_edge_frame_model_equivariant(dtype, tol, low_memory, order, monkeypatch):
    set_kernel_order(monkeypatch, order)
    model = SE3Transformer(num_layers=2, fiber_in=Fiber({0: 3, 1: 1}), fiber_hidden=Fiber.create(4, 4),
                           fiber_out=Fiber({0: 2, 1: 1, 2: 1}), num_heads=2, channels_div=2,
                           fiber_edge=Fiber({0: 2}), fuse_level="EDGE_FRAME", low_memory=low_memory).to(dtype)
    pos, ei, _ = random_graph(11, dtype=dtype)
    x = random_features(Fiber({0: 3, 1: 1}), 11, dtype)
    e = random_features(Fiber({0: 2}), ei.shape[1], dtype)
    assert_equivariant(lambda a, p, b: model(a, ei, p, b), x, pos, e, tolerance=tol, num_rotations=3)


def test_command_line_offers_every_level_and_defaults_to_edge_frame():
    from se3t.runtime.args import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    train = sub.choices["train"]
    action = next(a for a in train._actions if a.dest == "fuse_level")
    assert {c.upper() for c in action.choices} == {m.name for m in FuseLevel}
    assert action.default == "EDGE_FRAME"
    assert inspect.signature(SE3Transformer.__init__).parameters["fuse_level"].default == FuseLevel.EDGE_FRAME


def test_a_used_edge_frame_conv_copies_and_pickles(tmp_path):
    """After calls have made its sparse maps (which cannot be copied or pickled), a conv deep-copies and saves
    whole, and the copies compute the same."""
    import copy
    layer = ConvSE3(FIBER_IN, Fiber({0: 2, 1: 3, 2: 1}), Fiber({0: 2}), fuse_level="EDGE_FRAME").double()
    pos, ei, x, e = _conv_inputs(Fiber({0: 2}))
    before = _run(layer, ei, x, pos, e, 3)
    assert layer._frame_plans[0]._block_sparse  # the calls made sparse maps (the state a copy must drop)
    torch.save(layer, tmp_path / "conv.pt")
    for twin in (copy.deepcopy(layer), torch.load(tmp_path / "conv.pt", weights_only=False)):
        after = _run(twin, ei, x, pos, e, 3)
        assert all(torch.equal(before[d], after[d]) for d in before)


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "gather"])
def test_slot_weights_map_is_linear_with_its_adjoint_and_never_stored(monkeypatch, sparse):
    """The block-by-block map and adjoint (CPU: sparse products, or the gathers and bmm that autograd and the
    reference use) against the all-at-once references."""
    from se3t.nn import edge_frame_conv
    monkeypatch.setattr(edge_frame_conv, "SPARSE_MAPS", sparse)
    layer = ConvSE3(FIBER_IN, Fiber({0: 2, 1: 3, 2: 1}), Fiber({0: 2}), fuse_level="EDGE_FRAME").double()
    plan, W = layer._frame_plans[0], layer.radial[0].last.weight.detach()
    G = torch.randn_like(W)
    made = plan._block_sparse
    assert torch.allclose((plan.apply(W) * G).sum(), (W * plan.adjoint(G)).sum(), atol=1e-10, rtol=0)
    assert torch.allclose(plan.apply(2 * W + G), 2 * plan.apply(W) + plan.apply(G), atol=1e-12)
    # the kernel's block-by-block map and adjoint against these all-at-once references (the adjoint in one piece
    # per group of pairs and in several)
    mapped, rows = plan.apply(W), plan.rows
    assert len(plan.specs) == 3
    for pieces in (1, 2, 100):
        monkeypatch.setattr(edge_frame_conv, "ADJOINT_PIECES", pieces)
        blockwise = torch.zeros_like(W)
        for spec in plan.specs:
            block_rows = rows[spec.row:spec.row + spec.c_out * spec.k_in]
            assert torch.allclose(plan.block_weights(W, spec.row), mapped[block_rows], atol=1e-14, rtol=0)
            plan.add_block_adjoint(blockwise, G[block_rows], spec.row)
        assert torch.allclose(blockwise, plan.adjoint(G), atol=1e-12, rtol=0)
    # which form ran: the sparse maps exist (one per direction) exactly when switched on
    assert sorted(adjoint for _, _, adjoint in made) == ([False, True] if sparse else [])
    if sparse:  # float32 alike, and autograd recording takes the differentiable form
        W32, G32 = W.float(), G.float()
        spec = plan.specs[1]
        block_rows = rows[spec.row:spec.row + spec.c_out * spec.k_in]
        assert torch.allclose(plan.block_weights(W32, spec.row), plan.apply(W32)[block_rows], atol=1e-6, rtol=0)
        out = torch.ones_like(W32)
        plan.add_block_adjoint(out, G32[block_rows], spec.row)
        only = torch.zeros_like(G32)
        only[block_rows] = G32[block_rows]
        assert torch.allclose(out, 1 + plan.adjoint(only), atol=1e-5, rtol=0)  # added, in place
        assert (torch.float32, W.device, False) in made
        Wg = W.clone().requires_grad_(True)
        assert plan._sparse_maps(Wg, adjoint=False) is None and plan._sparse_maps(W.half(), adjoint=False) is None
        with torch.no_grad():
            assert plan._sparse_maps(Wg, adjoint=False) is not None
        plan.block_weights(Wg, spec.row).pow(2).sum().backward()
        assert torch.allclose(Wg.grad, plan.adjoint(torch.zeros_like(W).index_copy(
            0, block_rows, 2 * mapped[block_rows])), atol=1e-12, rtol=0)
    pos, ei, x, e = _conv_inputs(Fiber({0: 2}))
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _run(layer, ei, x, pos, e, 3)
    weight = layer.radial[0].last.weight
    same_shape = [t for t in saved if t.shape == weight.shape]
    assert same_shape and all(t.data_ptr() == weight.data_ptr() for t in same_shape)
    # nor the messages: the kernel's joint output and its gather/rotation keep nothing message-sized (the largest
    # per-edge tensors kept are the radial MLP's hidden features, 32 wide, and the degree-3 frames, 49)
    wide = ConvSE3(FIBER_IN, Fiber({0: 8, 1: 8, 2: 8}), Fiber({0: 2}), fuse_level="EDGE_FRAME").double()
    E, width = ei.shape[1], sum(spec.K * spec.c_out for spec in wide._frame_plans[0].specs)
    assert width > 49
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _run(wide, ei, x, pos, e, 3)
    assert saved and not any(t.dim() >= 2 and t.shape[0] == E and t[0].numel() >= width for t in saved)


def test_frames_are_made_once_and_serve_inference_and_training():
    """Frames made under inference_mode (from normal or inference harmonics) are kept and are normal tensors: the
    same basis then runs an inference and a training forward through EDGE_FRAME."""
    layer = ConvSE3(FIBER_IN, Fiber({0: 2, 1: 1}), Fiber({0: 2}), fuse_level="EDGE_FRAME").double()
    pos, ei, x, e = _conv_inputs(Fiber({0: 2}))
    rel = pos[ei[1]] - pos[ei[0]]
    radial_in = torch.cat([e[0].squeeze(-1), safe_norm(rel)[0]], -1)
    basis = get_basis(rel, 3)
    with torch.inference_mode():
        ref = layer(x, e, radial_in, ei, basis)
        frames = basis.edge_frames()
        assert basis.edge_frames() is frames and not frames.rot[2].is_inference()
        assert not basis.frame_rows(2, 1).is_inference()
    out = layer({d: v.clone().requires_grad_() for d, v in x.items()}, e, radial_in, ei, basis)
    sum(o.sum() for o in out.values()).backward()
    for d in ref:
        assert torch.allclose(out[d], ref[d], atol=1e-12)
    with torch.inference_mode():
        inference_basis = get_basis(rel, 3)
        inference_basis.edge_frames()
    assert inference_basis.edge_frames() is not None and not inference_basis.edge_frames().back[1].is_inference()


def test_gather_rotate_makes_one_message_sized_tensor_each_way():
    """The gather and rotation of the kernel's joint output go one degree at a time: besides the kernel's output in
    forward and its gradient in backward, no tensor of the messages' size (every degree's values per edge) is
    made, so the peak holds at most one degree's temporaries beyond them (the gathered copy of all runs, and in
    backward the concatenated gradients and their inverse gather, were two more)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    layer = ConvSE3(FIBER_IN, Fiber({0: 8, 1: 8, 2: 8, 3: 8}), Fiber({0: 2}), fuse_level="EDGE_FRAME").double()
    pos, ei, x, e = _conv_inputs(Fiber({0: 2}))
    E, width = ei.shape[1], 8 * (1 + 3 + 5 + 7)
    plan = layer._frame_plans[0]
    assert not plan.needs_zero_column and sum(s.K * s.c_out for s in plan.specs) == width

    class Made(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.storages = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[0] == E and t.numel() == E * width:
                    self.storages.setdefault(t.untyped_storage().data_ptr(), str(func))
            return out

    with torch.no_grad(), Made() as forward:
        _run(layer, ei, x, pos, e, 3)
    assert len(forward.storages) == 1, forward.storages  # the kernel's output
    x = {d: v.requires_grad_() for d, v in x.items()}
    out = _run(layer, ei, x, pos, e, 3)
    loss = sum((o * o).sum() for o in out.values())
    with Made() as backward:
        loss.backward()
    assert len(backward.storages) == 1, backward.storages  # the gradient of the kernel's output


@pytest.mark.parametrize("fiber_out", [Fiber({0: 2, 1: 3, 2: 1, 3: 2, 4: 1}), Fiber({0: 8, 1: 8, 2: 8, 3: 8})],
                         ids=["zero-run", "no-zero-run"])
def test_gather_reads_every_run_so_its_gradient_needs_no_zero_fill(fiber_out):
    """_GatherRotate's backward writes its gradient buffer without zeroing it first: that needs every run of the
    kernel's output (and the zero run, where there is one) to be gathered by some output component."""
    layer = ConvSE3(FIBER_IN, fiber_out, Fiber({0: 2}), fuse_level="EDGE_FRAME")
    for plan in layer._frame_plans:
        width = sum(s.K * s.c_out for s in plan.specs)
        num_runs = width // plan.run + int(plan.needs_zero_column)
        assert sorted(set(plan.gather_runs.tolist())) == list(range(num_runs))
    assert any(plan.needs_zero_column for plan in layer._frame_plans) == (4 in fiber_out.degrees)
