"""Training loop: exact mid-epoch resume, NaN guard, accumulation equals a bigger batch."""

from __future__ import annotations

import io
import sys

import pytest
import torch

from runtime_helpers import TINY, SyntheticMolecules, collate, target_of
from se3t.runtime.errors import UserError
from se3t.runtime.optim import StepInBackward, build_optimizer, fused_adamw_supported
from se3t.runtime import (DistInfo, Precision, PrecisionPolicy, Trainer, TrainingDiverged, TrainOptions,
                          build_model, load_checkpoint)

FP32 = PrecisionPolicy(Precision.FP32, "cpu")


class Crash(Exception):
    pass


def make_trainer(train, val=None, on_step_end=None, **options) -> Trainer:
    torch.manual_seed(0)
    opts = dict(epochs=2, batch_size=16, eval_interval=1, learning_rate=3e-3, weight_decay=0.01, seed=7,
                show_progress=False)
    opts.update(options)
    return Trainer(build_model(TINY), train, val, collate, target=target_of(train), options=TrainOptions(**opts),
                   policy=FP32, dist=DistInfo(), config={"model": TINY.to_dict()}, on_step_end=on_step_end)


def params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.module.state_dict().items()}


@pytest.mark.parametrize("crash_at, ckpt_steps, in_backward", [(5, 3, False), (7, 4, False), (5, 3, True)])
def test_resume_mid_epoch_equals_uninterrupted_run(tmp_path, crash_at, ckpt_steps, in_backward):
    """Mid-epoch and at an epoch's last step; also with the optimizer stepped in backward (same state)."""
    train, val = SyntheticMolecules(60), SyntheticMolecules(16, seed=1)  # 4 steps per epoch, last one short
    full = make_trainer(train, val, epochs=3, optimizer_in_backward=in_backward)
    full.fit()

    ckpt = tmp_path / "run.pt"

    def crash(tr):
        if tr.progress.global_step == crash_at:
            raise Crash

    first = make_trainer(train, val, epochs=3, save_ckpt_path=str(ckpt), ckpt_steps=ckpt_steps, on_step_end=crash,
                         optimizer_in_backward=in_backward)
    with pytest.raises(Crash):
        first.fit()
    state = load_checkpoint(ckpt)
    assert state["progress"]["global_step"] == ckpt_steps

    torch.manual_seed(123)  # the resumed process starts from other RNG states and another initialisation
    resumed = make_trainer(train, val, epochs=3, save_ckpt_path=str(ckpt), optimizer_in_backward=in_backward)
    resumed.resume(state, str(ckpt))
    summary = resumed.fit()

    assert summary["global_steps"] == full.progress.global_step == 12  # no step repeated, none skipped
    assert resumed.loss_history == full.loss_history[ckpt_steps:]
    a, b = params(full), params(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert load_checkpoint(ckpt)["progress"] == {"epoch": 3, "step_in_epoch": 0, "global_step": 12}


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    train = SyntheticMolecules(64, nan_at=37)
    ckpt = tmp_path / "run.pt"
    trainer = make_trainer(train, save_ckpt_path=str(ckpt), ckpt_steps=1)
    with pytest.raises(TrainingDiverged) as info:
        trainer.fit()
    message = str(info.value)
    assert "NaN/inf" in message and str(ckpt) in message and "left untouched" in message
    state = load_checkpoint(ckpt)
    assert state["progress"]["global_step"] == trainer.progress.global_step >= 0
    for k, v in state["model"].items():
        assert torch.isfinite(v).all(), k
    # the refused update was not applied: the live weights equal the checkpoint's
    for k, v in trainer.module.state_dict().items():
        assert torch.equal(v, state["model"][k]), k


def test_nan_without_checkpoint_says_so():
    trainer = make_trainer(SyntheticMolecules(32, nan_at=0))
    with pytest.raises(TrainingDiverged, match="no checkpoint had been written"):
        trainer.fit()


def test_accumulation_equals_larger_batch():
    """Two micro-batches of 8 accumulate to the gradient of one batch of 16 (and the same loss curve)."""
    train = SyntheticMolecules(40)
    grads = {}

    def grab(name):
        def hook(tr):
            if tr.progress.global_step == 1:
                grads[name] = {k: p.grad.clone() for k, p in tr.module.named_parameters() if p.grad is not None}
        return hook

    big = make_trainer(train, batch_size=16, epochs=1, on_step_end=grab("big"))
    big.fit()
    acc = make_trainer(train, batch_size=8, accumulate_grad_batches=2, epochs=1, on_step_end=grab("acc"))
    acc.fit()
    assert len(big.loss_history) == len(acc.loss_history) == 3
    torch.testing.assert_close(torch.tensor(acc.loss_history), torch.tensor(big.loss_history), rtol=1e-5, atol=1e-6)
    assert grads["big"].keys() == grads["acc"].keys() and grads["big"]
    for k in grads["big"]:
        torch.testing.assert_close(grads["acc"][k], grads["big"][k], rtol=1e-4, atol=1e-6)
    for k, v in params(big).items():
        torch.testing.assert_close(params(acc)[k], v, rtol=1e-4, atol=1e-5)


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("tty, show", [(True, True), (True, False), (False, True)])
def test_progress_bar_only_on_a_terminal(monkeypatch, tty, show):
    pytest.importorskip("tqdm")
    stream = FakeTerminal() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    make_trainer(SyntheticMolecules(32), epochs=1, show_progress=show).fit()
    text = stream.getvalue()
    assert ("mol_s=" in text and "loss=" in text and "epoch 1/1" in text) == (tty and show), text


@pytest.mark.parametrize("optimizer", ["adam", "sgd", "lamb"])
def test_optimizers_and_gradient_clip(optimizer):
    norms = []

    def grad_norm(tr):
        norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in tr.module.parameters()
                                                           if p.grad is not None])).item())

    trainer = make_trainer(SyntheticMolecules(32), epochs=2, optimizer=optimizer, gradient_clip=0.01,
                           on_step_end=grad_norm)
    before = params(trainer)
    trainer.fit()
    assert len(norms) == 4 and max(norms) <= 0.01 * (1 + 1e-4)
    assert any(not torch.equal(before[k], v) for k, v in params(trainer).items())
    # cosine decay per epoch down to lr / 10
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(3e-4)


def test_adamw_uses_the_fused_kernel_and_agrees_with_the_loop():
    """The trainer's AdamW is the fused one where it runs (one pass per tensor); its steps equal the per-tensor
    loop's to rounding (float64, 5 steps with weight decay)."""
    torch.manual_seed(0)
    start = [torch.randn(7, 5, dtype=torch.float64), torch.randn(3, dtype=torch.float64)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(5)]
    runs = []
    for fused in (True, False):
        ps = [p.clone().requires_grad_() for p in start]
        opt = (build_optimizer("adam", ps, lr=1e-2, weight_decay=0.1, momentum=0.9) if fused else
               torch.optim.AdamW(ps, lr=1e-2, betas=(0.9, 0.999), weight_decay=0.1, foreach=False))
        assert bool(opt.defaults.get("fused")) == fused
        for g in grads:
            for p, gp in zip(ps, g):
                p.grad = gp.clone()
            opt.step()
        runs.append([p.detach() for p in ps])
    for a, b in zip(*runs):
        assert not torch.equal(a, start[0] if a.shape == start[0].shape else start[1])
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert fused_adamw_supported(start) and not fused_adamw_supported([])
    assert not fused_adamw_supported([torch.zeros(3, dtype=torch.long)])
    assert not fused_adamw_supported([torch.zeros(3, device="meta")])


@pytest.mark.parametrize("optimizer", ["adam", "sgd", "lamb"])
def test_step_in_backward_equals_the_step_after_backward(optimizer):
    """Each parameter stepped by its own hook during backward gets exactly the update of one step after backward
    (float64, 4 steps with weight decay), and no gradient outlives the backward."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
    frozen = torch.nn.Parameter(torch.ones(3, dtype=torch.float64), requires_grad=False)
    runs = []
    for in_backward in (False, True):
        model = torch.nn.Sequential(*[torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)]).double()
        model.load_state_dict(net.state_dict())
        opt = build_optimizer(optimizer, [*model.parameters(), frozen], lr=1e-2, weight_decay=0.1, momentum=0.9)
        hooks = StepInBackward(opt) if in_backward else None
        gen = torch.Generator().manual_seed(1)
        for _ in range(4):
            x = torch.randn(11, 5, dtype=torch.float64, generator=gen)
            (model(x) * frozen).square().sum().backward()
            if hooks is None:
                opt.step()
                opt.zero_grad(set_to_none=True)
            else:
                assert all(p.grad is None for p in model.parameters())
        assert hooks is None or not hooks.take_nonfinite()
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b, start in zip(*runs, net.parameters()):
        assert not torch.equal(a, start)
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_step_in_backward_holds_one_gradient_at_a_time():
    """A chain of layers: when each parameter's gradient is complete, no other parameter holds one (stepping after
    backward would hold all of them at its end)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(6, 6, bias=False) for _ in range(5)])
    params = list(model.parameters())
    held = []
    for p in params:  # registered first: runs before the step's hook
        p.register_post_accumulate_grad_hook(lambda _: held.append(sum(q.grad is not None for q in params)))
    StepInBackward(torch.optim.AdamW(params, lr=1e-3))
    model(torch.randn(3, 6)).sum().backward()
    assert held == [1] * len(params) and all(p.grad is None for p in params)


def test_step_in_backward_with_low_memory_blocks(monkeypatch):
    """Checkpointed layers recomputed in three node blocks use each parameter several times: its step still comes
    once, after all of its gradient (float64, two AdamW steps equal those after backward)."""
    import dataclasses

    import se3t.model

    monkeypatch.setattr(se3t.model, "LOW_MEMORY_MIN_BLOCK_EDGES", 1)
    splits = []
    real = se3t.model.destination_blocks
    monkeypatch.setattr(se3t.model, "destination_blocks", lambda ei, n, k: splits.append(k) or real(ei, n, k))
    config = dataclasses.replace(TINY, num_layers=2, low_memory=True, low_memory_blocks=3)
    batch = collate([SyntheticMolecules(6)[i] for i in range(6)])
    inputs = {k: ({d: t.double() for d, t in v.items()} if isinstance(v, dict) else
                  v.double() if v.is_floating_point() else v) if isinstance(v, (dict, torch.Tensor)) else v
              for k, v in batch.model_inputs().items()}
    runs = []
    for in_backward in (False, True):
        torch.manual_seed(0)
        model = build_model(config).double()
        opt = build_optimizer("adam", model.parameters(), lr=1e-2, weight_decay=0.1, momentum=0.9)
        hooks = StepInBackward(opt) if in_backward else None
        for _ in range(2):
            model(**inputs).square().sum().backward()
            if hooks is None:
                opt.step()
                opt.zero_grad(set_to_none=True)
        runs.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    assert splits == [3] * 4  # every step in three blocks
    for k in runs[0]:
        torch.testing.assert_close(runs[1][k], runs[0][k], rtol=1e-12, atol=1e-12)


def test_step_in_backward_flags_nonfinite_gradients_and_unhooks():
    p = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.SGD([p], lr=0.1)
    hooks = StepInBackward(opt)
    (p * torch.tensor([1.0, float("nan"), 1.0, 1.0])).sum().backward()
    assert hooks.take_nonfinite() and not hooks.take_nonfinite()  # reported once
    assert p.grad is None and torch.isnan(p[1])
    hooks.remove()
    p.data.fill_(1.0)
    p.sum().backward()
    assert p.grad is not None and torch.equal(p.detach(), torch.ones(4))  # no longer stepped in backward
    with pytest.raises(ValueError, match="no parameter that requires grad"):
        StepInBackward(torch.optim.SGD([torch.nn.Parameter(torch.ones(2), requires_grad=False)], lr=0.1))


def test_optimizer_in_backward_trains_as_the_step_after_backward():
    train = SyntheticMolecules(40)
    plain = make_trainer(train, epochs=2)
    plain.fit()
    fused = make_trainer(train, epochs=2, optimizer_in_backward=True)
    fused.fit()
    assert len(fused.loss_history) == len(plain.loss_history) == 6
    torch.testing.assert_close(torch.tensor(fused.loss_history), torch.tensor(plain.loss_history), rtol=1e-5,
                               atol=1e-6)
    for k, v in params(plain).items():
        torch.testing.assert_close(params(fused)[k], v, rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in fused.module.parameters())


@pytest.mark.parametrize("options, message", [
    (dict(accumulate_grad_batches=2), "needs --accumulate_grad_batches 1"),
    (dict(gradient_clip=1.0), "cannot clip by the global gradient norm"),
])
def test_optimizer_in_backward_refuses_what_needs_all_gradients(options, message):
    with pytest.raises(UserError, match=f"--optimizer_in_backward {message}"):
        make_trainer(SyntheticMolecules(8), optimizer_in_backward=True, **options)


def test_optimizer_in_backward_refuses_a_nan_loss_before_applying_it(tmp_path):
    ckpt = tmp_path / "run.pt"
    trainer = make_trainer(SyntheticMolecules(64, nan_at=37), save_ckpt_path=str(ckpt), ckpt_steps=1,
                           optimizer_in_backward=True)
    with pytest.raises(TrainingDiverged, match="the loss became NaN/inf .* the update was not applied"):
        trainer.fit()
    state = load_checkpoint(ckpt)
    for k, v in trainer.module.state_dict().items():
        assert torch.equal(v, state["model"][k]), k


def test_cuda_graphs_option_is_checked():
    train = SyntheticMolecules(8)
    with pytest.raises(UserError, match="--cuda_graphs needs a CUDA device"):
        Trainer(build_model(TINY), train, None, collate, target=target_of(train), options=TrainOptions(epochs=1),
                policy=FP32, dist=DistInfo(), config={}, cuda_graphs=True)


def test_graphed_loss_is_the_eager_loss_without_host_syncs():
    """The function --cuda_graphs captures (inputs_abs_error) computes the eager loss, and once warm it reads no
    value on the host and makes no tensor from Python data (what capture refuses, checked on CPU)."""
    from se3t import HostSyncDetector
    from se3t._validate import deferred_checks
    from se3t.runtime.engine import inputs_abs_error, standardised_abs_error

    train = SyntheticMolecules(6)
    model, batch, target = build_model(TINY), collate([train[i] for i in range(6)]), target_of(train)
    expected = standardised_abs_error(model, batch, FP32, target)
    inputs_abs_error(model, batch.model_inputs(), batch.y, batch.graph_mask, FP32, target)  # warm
    with deferred_checks(), HostSyncDetector() as detector:
        err = inputs_abs_error(model, batch.model_inputs(), batch.y, batch.graph_mask, FP32, target)
        err.backward()
    assert detector.found == []
    torch.testing.assert_close(err, expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_training_equals_eager():
    """Two epochs of --cuda_graphs training == eager on the GPU (molecules of one size: batches of one shape,
    the last one smaller: two graphs)."""
    train = SyntheticMolecules(40, same_size=4)
    results = []
    for graphs in (False, True):
        torch.manual_seed(0)
        trainer = Trainer(build_model(TINY), train, None, collate, target=target_of(train),
                          options=TrainOptions(epochs=2, batch_size=16, learning_rate=3e-3, seed=7,
                                               show_progress=False),
                          policy=PrecisionPolicy(Precision.FP32, "cuda"), dist=DistInfo(device=torch.device("cuda")),
                          config={"model": TINY.to_dict()}, cuda_graphs=graphs)
        trainer.fit()
        results.append((trainer.loss_history, params(trainer)))
        if graphs:
            assert trainer.graphed.num_graphs == 2
    (loss_e, p_e), (loss_g, p_g) = results
    assert loss_g == pytest.approx(loss_e, rel=1e-4)
    for k in p_e:
        torch.testing.assert_close(p_g[k], p_e[k], rtol=1e-4, atol=1e-5)


def test_optimizer_in_backward_reports_a_nonfinite_gradient_as_applied():
    """A finite loss whose backward makes a NaN gradient: the per-parameter step has already applied it, and the
    trainer says so instead of claiming the update was held back."""
    trainer = make_trainer(SyntheticMolecules(32), optimizer_in_backward=True)
    first = next(p for p in trainer.module.parameters() if p.requires_grad)
    first.register_hook(lambda g: g * float("nan"))  # before accumulation: the step's hook sees a NaN gradient
    with pytest.raises(TrainingDiverged, match="the gradient became NaN/inf .* the update was applied"):
        trainer.fit()
    assert torch.isnan(first).any()
