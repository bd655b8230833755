"""The Triton kernels of the fused conv (``se3t.nn.triton_outer``) against their PyTorch reference paths.

On a CUDA machine they run compiled; without one, in Triton's interpreter (``TRITON_INTERPRET=1``, numpy on the
CPU; bf16 is not supported there, so 2-byte checks use fp16). Skipped only where ``triton`` is not installed
(``SE3T_REQUIRE=triton`` makes that a failure; CI installs it).
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch

from se3t import ConvSE3, Fiber, FuseLevel
from se3t.basis import safe_norm

from core_helpers import random_graph

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
HAVE_TRITON = importlib.util.find_spec("triton") is not None
#: Triton's interpreter must be on before triton is first imported (its own library functions are decorated at
#: import), so on CPU these tests run in a child process started with TRITON_INTERPRET=1
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# the kernel tests need triton where they run (SE3T_REQUIRE=triton fails their skips); on CPU the parent process
# only routes them to the child, and the routing test is the one that needs triton
pytestmark = [pytest.mark.triton] if (CUDA or INTERPRETED) else []


def _require_triton():
    if not HAVE_TRITON:
        pytest.skip("triton is not installed")


@pytest.fixture(scope="module")
def triton_outer():
    _require_triton()
    if not (CUDA or INTERPRETED):
        pytest.skip("no CUDA: runs in the interpreter child process (test_triton_kernels_in_the_interpreter)")
    import se3t.nn.triton_outer as module
    return module


if not (CUDA or INTERPRETED):
    @pytest.mark.triton
    def test_triton_kernels_in_the_interpreter():
        """Without CUDA: every other test of this file, in a child process with Triton's interpreter."""
        _require_triton()
        env = dict(os.environ, TRITON_INTERPRET="1")
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                              env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
        summary = proc.stdout.strip().splitlines()[-1]
        assert " passed" in summary and "skipped" not in summary, proc.stdout[-2000:]


def _reference(h, t, w):
    return torch.einsum("eh,eki,hio->eko", h, t, w)


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("E, H, K, K_in, C_out", [(37, 5, 2, 40, 24), (70, 32, 1, 64, 96), (9, 3, 3, 11, 2),
                                                  (0, 4, 2, 16, 16), (21, 3, 2, 20, 200)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_outer_kernels_match_einsum(triton_outer, E, H, K, K_in, C_out, dtype):
    """Forward and every gradient against float64 autograd of the same einsum; the output written into a strided
    view (a block of a wider output) leaves the other columns alone; shapes that are not multiples of the tiles
    (masking), K = 1, 2, 3 rows per edge, no edges at all, and more output channels than one tile (200 > 128)."""
    g = torch.Generator().manual_seed(E + K)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=DEVICE, dtype=dtype)  # noqa: E731
    h, t, w, gout = rnd(E, H), rnd(E, K, K_in), rnd(H, K_in, C_out), rnd(E, K, C_out)
    wide = torch.full((E, K * C_out + 5), 7.0, dtype=dtype, device=DEVICE)
    out = wide[:, 2:2 + K * C_out].view(E, K, C_out)
    if K * C_out and E:
        assert out.stride() == (K * C_out + 5, C_out, 1)
    triton_outer.outer_forward(h, t, w, out)
    hd, td, wd = (v.double().requires_grad_(True) for v in (h, t, w))
    ref = _reference(hd, td, wd)
    ref.backward(gout.double())
    grad_t = torch.full_like(t, float("nan"))
    grad_w, grad_h = triton_outer.outer_backward(h, t, w, gout, True, True, grad_t)
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    assert bool((wide[:, :2] == 7).all()) and bool((wide[:, 2 + K * C_out:] == 7).all())
    if E == 0:
        assert out.numel() == 0 and bool((grad_w == 0).all()) and grad_h.shape == (0, H)
        return
    assert _rel(out, ref) < tol
    assert grad_w.dtype == torch.float32 and _rel(grad_w, wd.grad) < tol
    assert grad_h.dtype == torch.float32 and _rel(grad_h, hd.grad) < tol
    assert _rel(grad_t, td.grad) < tol
    # each gradient alone (the others not asked for) is the same
    gt2 = torch.empty_like(t)
    assert triton_outer.outer_backward(h, t, w, gout, False, False, gt2) == (None, None)
    assert torch.equal(gt2, grad_t)
    gw2, gh2 = triton_outer.outer_backward(h, t, w, gout, True, False, None)
    assert gh2 is None and torch.equal(gw2, grad_w)


def test_outer_kernels_reject_bad_layouts(triton_outer):
    h, t, w = torch.randn(4, 3), torch.randn(4, 2, 5), torch.randn(3, 5, 6)
    with pytest.raises(ValueError, match="w must be"):
        triton_outer.outer_forward(h, t, w.transpose(1, 2), torch.empty(4, 2, 6))
    with pytest.raises(ValueError, match="t must be"):
        triton_outer.outer_forward(h, t.transpose(0, 1), w, torch.empty(4, 2, 6))
    with pytest.raises(ValueError, match="out must be"):
        triton_outer.outer_forward(h, t, w, torch.empty(4, 6, 2).transpose(1, 2))


@pytest.mark.parametrize("precision", ["fp32"] + (["bf16"] if CUDA else []))
@pytest.mark.parametrize("level", [FuseLevel.EDGE_FRAME, FuseLevel.FULL], ids=lambda v: v.name)
@pytest.mark.parametrize("variant", ["node-inputs", "edge-inputs-blockwise"])
def test_conv_with_triton_kernels_matches_pytorch_path(triton_outer, level, precision, variant, monkeypatch):
    """A ConvSE3 (degrees 0-2, every block kind: K = 1 and 2 rows, several parts, self-interaction) with its
    blocks in the Triton kernels against the PyTorch paths, outputs and gradients of inputs, parameters and (FULL)
    positions, and (FULL) parameter gradients of a loss on the forces, in float32 (strict: no TF32) and, on CUDA,
    under bf16 autocast (within bf16's rounding of either path). Scalar edge features: the kernel gathers the
    source nodes' features itself; with degree-1 edge features it takes edge-level inputs, here also one block at
    a time (``blockwise_kernel``, low memory's)."""
    from se3t import get_basis
    from se3t.nn import fused

    fin = Fiber({0: 3, 1: 2, 2: 2})
    edge_inputs = variant == "edge-inputs-blockwise"
    conv = ConvSE3(fin, Fiber({0: 3, 1: 2, 2: 2}), Fiber({0: 2, 1: 1} if edge_inputs else {0: 2}),
                   self_interaction=True, use_layer_norm=True).to(DEVICE)
    conv.fuse_level = level
    conv.blockwise_kernel = edge_inputs
    pos, ei, _ = random_graph(9, p=0.5)
    pos, ei = pos.float().to(DEVICE).requires_grad_(level == FuseLevel.FULL), ei.to(DEVICE)
    gen = torch.Generator().manual_seed(1)
    x = {d: torch.randn(9, c, 2 * d + 1, generator=gen).to(DEVICE).requires_grad_(True) for d, c in fin}
    edge = {0: torch.randn(ei.shape[1], 2, 1, generator=gen).to(DEVICE)}
    if edge_inputs:
        edge[1] = torch.randn(ei.shape[1], 1, 3, generator=gen).to(DEVICE)

    def run(mode):
        monkeypatch.setattr(fused, "TRITON", mode)
        rel = pos[ei[1]] - pos[ei[0]]
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = conv(x, edge, torch.cat([edge[0].squeeze(-1), safe_norm(rel)[0]], -1), ei, get_basis(rel, 2))
        loss = sum((o.sin() * (d + 1)).sum() for d, o in out.items())
        wrt = ([pos] if pos.requires_grad else []) + [*x.values(), *conv.parameters()]
        grads = torch.autograd.grad(loss, wrt, create_graph=pos.requires_grad)
        if pos.requires_grad:  # training on forces: second derivatives through the kernels too
            second = torch.autograd.grad(grads[0].pow(2).sum(), list(conv.parameters()), allow_unused=True)
            grads = [*grads, *(g for g in second if g is not None)]
        return [*out.values(), *grads]

    calls = {"forward": 0, "backward": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(triton_outer, "outer_forward", counted("forward", triton_outer.outer_forward))
    monkeypatch.setattr(triton_outer, "outer_backward", counted("backward", triton_outer.outer_backward))
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # strict fp32: the kernels' dot in IEEE fp32
    try:
        reference = run("never")
        assert calls == {"forward": 0, "backward": 0}  # the PyTorch paths
        fast = run("always")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert calls["forward"] >= 3  # every block ran in the kernels, in forward and backward
    if pos.requires_grad:  # with forces, per launch of the forward: the first backward, two second-derivative
        # directions (a forward and a backward each), and the forward graph's own backward
        assert 3 * calls["backward"] == 4 * calls["forward"]
    else:
        assert calls["backward"] == calls["forward"]
    for a, b in zip(reference, fast):
        assert _rel(b, a) < (1e-5 if precision == "fp32" else 3e-2)


def test_kernel_choice_setting(monkeypatch):
    """``se3t.nn.fused.TRITON``: never on CPU in "auto" (the interpreter is for tests), a clear error for an unknown
    value, and for "always" without triton."""
    from se3t.nn import fused, triton_outer as module

    h = torch.zeros(3, 2)
    for mode in ("auto", "never"):
        monkeypatch.setattr(fused, "TRITON", mode)
        assert not fused._use_triton(h)
    monkeypatch.setattr(fused, "TRITON", "sometimes")
    with pytest.raises(ValueError, match="'auto', 'never' or 'always'"):
        fused._use_triton(h)
    monkeypatch.setattr(fused, "TRITON", "always")
    monkeypatch.setattr(module, "available", lambda: False)
    with pytest.raises(RuntimeError, match="needs triton"):
        fused._use_triton(h)
