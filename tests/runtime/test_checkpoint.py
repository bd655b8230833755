"""Checkpoint files: atomic replacement, safe loading, RNG round trip; epoch plans; precision policies."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from runtime_helpers import TINY, SyntheticMolecules, collate, target_of
from se3t.runtime import (DistInfo, EpochPlan, Precision, PrecisionPolicy, Trainer, TrainOptions, UserError,
                          build_model, load_checkpoint, resolve_precision, save_checkpoint)
from se3t.runtime.checkpoint import capture_rng_state, restore_rng_state


def test_atomic_write_keeps_the_old_checkpoint_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"config": {"n": 1}, "model": {"w": torch.ones(3)}})

    def broken_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"config": {"n": 2}, "model": {"w": torch.zeros(3)}})
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["config"] == {"n": 1} and torch.equal(state["model"]["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]  # no temporary files left behind


def test_newer_checkpoint_version_is_refused(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"config": {}, "model": {}})
    state = torch.load(path, weights_only=True)
    state["version"] = 99
    torch.save(state, path)
    with pytest.raises(UserError, match="format version 99"):
        load_checkpoint(path)


def test_rng_states_round_trip():
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    state = capture_rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(2), np.random.seed(2), random.seed(2)
    restore_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_mismatched_weights_give_a_short_report(tmp_path):
    trainer = Trainer(build_model(TINY), SyntheticMolecules(8), None, collate, target=target_of(SyntheticMolecules(8)),
                      options=TrainOptions(epochs=1, batch_size=4, show_progress=False),
                      policy=PrecisionPolicy(Precision.FP32, "cpu"), dist=DistInfo(), config={})
    state = trainer.state_dict()
    state["model"].pop(next(iter(state["model"])))
    with pytest.raises(UserError, match="do not fit this model: parameters 1 missing"):
        trainer.resume(state, "x.pt")


@pytest.mark.parametrize("n, world, batch, accumulate", [(37, 1, 8, 1), (37, 2, 4, 2), (5, 2, 4, 1), (64, 3, 5, 2)])
def test_epoch_plan_covers_each_molecule_once(n, world, batch, accumulate):
    plans = [EpochPlan(n, batch, epoch=3, seed=5, rank=r, world_size=world, accumulate=accumulate)
             for r in range(world)]
    seen = [i for p in plans for mb in p.micro_batches() for i in mb.indices]
    assert sorted(seen) == list(range(n))  # nothing dropped here, nothing repeated
    assert all(mb.indices for p in plans for mb in p.micro_batches())  # no rank ever gets an empty batch
    steps = [[(mb.step, mb.step_molecules) for mb in p.micro_batches() if mb.last_of_step] for p in plans]
    assert all(s == steps[0] for s in steps)  # all ranks agree on steps and their molecule counts
    single = EpochPlan(n, batch * world, epoch=3, seed=5, accumulate=accumulate)
    per_rank = [list(p.micro_batches()) for p in plans]
    merged = [sorted(i for mb in group for i in mb.indices) for group in zip(*per_rank)]
    assert [sorted(mb.indices) for mb in single.micro_batches()] == merged  # K ranks x B == 1 rank x K*B
    # resuming at a step yields exactly the remaining micro-batches
    full = list(plans[0].micro_batches())
    assert list(plans[0].micro_batches(1)) == [mb for mb in full if mb.step >= 1]
    assert EpochPlan(n, batch, epoch=4, seed=5).order != EpochPlan(n, batch, epoch=3, seed=5).order


def test_precision_choices():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision(None, False, cpu) is Precision.FP32
    assert resolve_precision(None, True, cpu) is Precision.BF16
    assert resolve_precision(None, True, cuda) is Precision.FP16
    assert resolve_precision(None, False, cuda) is Precision.TF32
    assert resolve_precision("bf16", True, cpu) is Precision.BF16
    PrecisionPolicy(Precision.FP32, "cpu").apply_global_settings()
    assert torch.get_float32_matmul_precision() == "highest"


@pytest.mark.parametrize("precision", [Precision.BF16, Precision.FP16])
def test_mixed_precision_training_runs(precision):
    """bf16 autocast, and the fp16 + GradScaler path (exercised on CPU autocast here; CUDA in real runs)."""
    train = SyntheticMolecules(32)
    trainer = Trainer(build_model(TINY), train, None, collate, target=target_of(train),
                      options=TrainOptions(epochs=1, batch_size=8, show_progress=False),
                      policy=PrecisionPolicy(precision, "cpu"), dist=DistInfo(), config={})
    assert (trainer.scaler is not None) == (precision is Precision.FP16)
    trainer.fit()
    assert len(trainer.loss_history) == 4 and all(np.isfinite(trainer.loss_history))
