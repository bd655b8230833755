"""CUDA graph replay (se3t.cuda_graphs) and the deferred value checks it relies on (se3t._validate).

The deferred checks and CUDAGraphStep's argument errors run everywhere; capture and replay need a GPU (marker
``gpu``; SE3T_REQUIRE=gpu makes a skip fail)."""
from __future__ import annotations

import pytest
import torch

import se3t
from se3t import CUDAGraphStep, Fiber, FuseLevel, HostSyncDetector, SE3TransformerPooled
from se3t._validate import deferred_checks, raise_failed_checks, value_check_mode

from core_helpers import random_graph

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _model(level=FuseLevel.EDGE_FRAME, dtype=torch.float32, device="cpu"):
    torch.manual_seed(0)
    return SE3TransformerPooled(Fiber({0: 3}), Fiber({0: 8}), Fiber({0: 2}), num_degrees=3, num_channels=4,
                                num_layers=2, num_heads=2, fuse_level=level).to(device=device, dtype=dtype)


def _inputs(num_nodes=14, num_graphs=2, dtype=torch.float32, device="cpu", seed=0):
    """The graph depends on the sizes only (same sizes, same shapes); positions and features on ``seed``."""
    torch.manual_seed(num_nodes)
    _, edge_index, graph_index = random_graph(num_nodes, 0.4, dtype, num_graphs)
    torch.manual_seed(seed)
    pos = torch.randn(num_nodes, 3, dtype=dtype) * 1.5
    E = edge_index.shape[1]
    return {"node_feats": {0: torch.randn(num_nodes, 3, 1, dtype=dtype, device=device)},
            "edge_index": edge_index.to(device), "pos": pos.to(device),
            "edge_feats": {0: torch.randn(E, 2, 1, dtype=dtype, device=device)},
            "graph_index": graph_index.to(device), "num_graphs": num_graphs}


# Deferred checks (any device) --------------------------------------------------------------------------------------

def test_value_checks_run_now_unless_recorded():
    t = torch.zeros(3)
    assert value_check_mode(t) == "now"
    with deferred_checks() as checks:
        assert value_check_mode(t) == "defer"
    assert checks == [] and value_check_mode(t) == "now"


@pytest.mark.parametrize("level", [FuseLevel.EDGE_FRAME, FuseLevel.FULL])
def test_model_records_its_value_checks_instead_of_syncing(level):
    model, inputs = _model(level), _inputs()
    with deferred_checks() as checks:
        out = model(**inputs)
    messages = [m for _, m in checks]
    assert any("pos" in m for m in messages) and any("edge_index" in m for m in messages)
    assert any("graph_index" in m for m in messages)
    assert all(bool(ok) for ok, _ in checks)
    raise_failed_checks(checks, torch.stack([ok for ok, _ in checks]))  # all hold: no error
    torch.testing.assert_close(out, model(**inputs))  # recording changes nothing computed


def test_recorded_nan_check_fails_after_the_fact_with_the_eager_message():
    model, inputs = _model(), _inputs()
    inputs["pos"][3, 1] = float("nan")
    with pytest.raises(ValueError, match="pos contains NaN"):
        model(**inputs)
    with deferred_checks() as checks:
        model(**inputs)  # no host sync, no error yet
    flags = torch.stack([ok for ok, _ in checks])
    assert not bool(flags.all())
    with pytest.raises(ValueError, match="pos contains NaN"):
        raise_failed_checks(checks, flags)


def test_edge_frame_level_without_frame_is_reported_not_silently_wrong():
    """Eager EDGE_FRAME falls back to the basis path for a zero-length edge; a recorded run cannot branch on data,
    so the edge is reported by a failed check."""
    model, inputs = _model(), _inputs()
    src, dst = inputs["edge_index"][:, 0]
    inputs["pos"][dst] = inputs["pos"][src]  # coincident points: a zero-length edge
    reference = _model(FuseLevel.FULL)(**inputs)
    torch.testing.assert_close(model(**inputs), reference)  # eager falls back
    with deferred_checks() as checks:
        model(**inputs)
    failed = [m for ok, m in checks if not bool(ok)]
    assert len(failed) == 1 and "edge frame" in failed[0]


def test_graph_index_needs_num_graphs_when_recorded():
    model, inputs = _model(), _inputs()
    inputs["num_graphs"] = None
    with deferred_checks(), pytest.raises(ValueError, match="pass num_graphs"):
        model(**inputs)


@pytest.mark.parametrize("level", list(FuseLevel))
def test_model_step_is_free_of_host_syncs_once_warm(level):
    """What capture forbids, checked on CPU: after a warm-up call (lazily made constants), a recorded forward and
    backward read no value on the host and make no tensor from Python data, at every level. Degrees 0-3 (every
    kernel order and block of the paper model)."""
    torch.manual_seed(0)
    model = SE3TransformerPooled(Fiber({0: 3}), Fiber({0: 8}), Fiber({0: 2}), num_degrees=4, num_channels=4,
                                 num_layers=2, num_heads=2, fuse_level=level)
    inputs = _inputs()

    def step():
        model.zero_grad(set_to_none=True)
        with deferred_checks():
            model(**inputs).square().sum().backward()

    step()
    with HostSyncDetector() as detector:
        step()
    assert detector.found == []


def test_host_sync_detector_sees_what_capture_refuses():
    with HostSyncDetector() as detector:
        torch.zeros(3).sum().item()
        torch.tensor([1.0, 2.0])
        torch.arange(4)[torch.arange(4) > 1]
    assert {op for op, _ in detector.found} >= {"_local_scalar_dense", "lift_fresh", "nonzero"}


def test_cuda_graph_step_argument_errors():
    with pytest.raises(TypeError, match="callable"):
        CUDAGraphStep(3)
    with pytest.raises(ValueError, match="warmup"):
        CUDAGraphStep(lambda: None, warmup=0)
    step = CUDAGraphStep(lambda x: x)
    with pytest.raises(ValueError, match="CUDA tensors: input 0 is on cpu"):
        step(torch.zeros(2))
    class Batch:  # an object of the user's: its identity would make a new graph per batch
        pass

    with pytest.raises(TypeError, match="input 0 is a Batch .*model_inputs"):
        step(Batch())
    with pytest.raises(TypeError, match="input 1 is a object"):  # ints are plain values; the object is not
        step(1, object())
    assert step.num_graphs == 0


# Capture and replay (GPU) ------------------------------------------------------------------------------------------

@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("level, kernels", [(FuseLevel.EDGE_FRAME, "pytorch"), (FuseLevel.FULL, "pytorch"),
                                           (FuseLevel.NONE, "pytorch"), (FuseLevel.EDGE_FRAME, "triton"),
                                           (FuseLevel.FULL, "triton")])
def test_graphed_training_matches_eager(level, kernels, monkeypatch):
    """Loss, gradients and parameters after three AdamW steps over two batch shapes: replayed graphs == eager; the
    fused conv's blocks in the PyTorch paths or as Triton kernels (autotuned in the warm-up, captured after)."""
    if kernels == "triton":
        pytest.importorskip("triton")
        from se3t.nn import fused
        monkeypatch.setattr(fused, "TRITON", "always")
    batches = [_inputs(14, 2, device="cuda", seed=s) for s in (1, 2)] + [_inputs(20, 3, device="cuda", seed=3)]
    targets = [torch.randn(b["num_graphs"], device="cuda") for b in batches]
    eager, graphed_model = _model(level, device="cuda"), _model(level, device="cuda")
    opt_e = torch.optim.AdamW(eager.parameters(), lr=1e-2)
    opt_g = torch.optim.AdamW(graphed_model.parameters(), lr=1e-2)

    def loss_of(model, inputs, y):
        return (model(**inputs).reshape(-1) - y).abs().mean()

    def forward_backward(inputs, y):
        loss = loss_of(graphed_model, inputs, y)
        loss.backward()
        return loss.detach()

    step = CUDAGraphStep(forward_backward, params=list(graphed_model.parameters()))
    for inputs, y in zip(batches, targets):
        opt_e.zero_grad(set_to_none=True)
        loss_e = loss_of(eager, inputs, y)
        loss_e.backward()
        loss_g = step(inputs, y)
        torch.testing.assert_close(loss_g, loss_e.detach(), rtol=1e-4, atol=1e-5)
        for pe, pg in zip(eager.parameters(), graphed_model.parameters()):
            torch.testing.assert_close(pg.grad, pe.grad, rtol=1e-3, atol=1e-5)
        opt_e.step()
        opt_g.step()
    assert step.num_graphs == 2  # two shapes: (14 nodes, 2 graphs) twice, then (20, 3)
    for pe, pg in zip(eager.parameters(), graphed_model.parameters()):
        torch.testing.assert_close(pg, pe, rtol=1e-3, atol=1e-5)


@gpu
@pytest.mark.gpu
def test_graphed_inference_is_equivariant_and_matches_eager():
    model = _model(device="cuda").eval()

    def forward(inputs):
        with torch.inference_mode():
            return model(**inputs)

    step = CUDAGraphStep(forward)
    inputs = _inputs(device="cuda")
    torch.testing.assert_close(step(inputs).clone(), forward(inputs))
    R = se3t.testing.random_rotation(torch.Generator().manual_seed(1)).to("cuda", torch.float32)
    rotated = dict(inputs, pos=inputs["pos"] @ R.T + 1.5)  # same shapes: the same graph replays
    torch.testing.assert_close(step(rotated), forward(inputs), rtol=1e-4, atol=1e-5)
    assert step.num_graphs == 1


@gpu
@pytest.mark.gpu
def test_replay_reports_bad_values_and_graph_budget():
    model = _model(device="cuda").eval()
    step = CUDAGraphStep(lambda inputs: model(**inputs), max_graphs=1)
    inputs = _inputs(device="cuda")
    step(inputs)
    bad = dict(inputs, pos=inputs["pos"].clone())
    bad["pos"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="pos contains NaN"):
        step(bad)
    step(inputs)  # the graph still replays good inputs
    with pytest.raises(RuntimeError, match="max_graphs"):
        step(_inputs(20, 3, device="cuda"))
