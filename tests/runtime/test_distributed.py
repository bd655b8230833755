"""Data parallel on CPU (Gloo, 2 processes) equals one process with the doubled batch."""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from runtime_helpers import TINY, SyntheticMolecules, collate, target_of
from se3t.runtime import (Precision, PrecisionPolicy, Trainer, TrainOptions, build_model, init_distributed)
from se3t.runtime.distributed import shutdown_distributed

# SGD, not Adam: Adam's first steps are ~lr * sign(grad), which turns float rounding in near-zero gradient
# entries into lr-sized differences; SGD keeps the comparison about the gradients.
# 38 molecules, batch 8 per process x 2 processes, 2 micro-steps per optimizer step: steps of 32 and 6
# molecules; the short tail is split 3/3 over the processes.
N, BATCH, ACCUMULATE, EPOCHS = 38, 8, 2, 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(world: int, batch: int, out: str | None, rank: int = 0) -> dict:
    dist = init_distributed("cpu")
    assert dist.world_size == world and dist.rank == rank
    train = SyntheticMolecules(N)
    torch.manual_seed(0)
    model = build_model(TINY)
    record = {"grads": None, "allreduce_calls": []}
    calls = [0]

    def first_step_grads(tr):
        record["allreduce_calls"].append(calls[0])
        if tr.progress.global_step == 1:
            record["grads"] = {k: p.grad.clone() for k, p in tr.module.named_parameters() if p.grad is not None}

    trainer = Trainer(model, train, None, collate, target=target_of(train),
                      options=TrainOptions(epochs=EPOCHS, batch_size=batch, accumulate_grad_batches=ACCUMULATE,
                                           optimizer="sgd", learning_rate=0.05, weight_decay=0.01, seed=3,
                                           show_progress=False),
                      policy=PrecisionPolicy(Precision.FP32, "cpu"), dist=dist, config={},
                      on_step_end=first_step_grads)
    if world > 1:
        def counting_hook(state, bucket):
            calls[0] += 1
            return allreduce_hook(state, bucket)
        trainer.model.register_comm_hook(None, counting_hook)
    trainer.fit()
    record["loss"] = trainer.loss_history
    record["params"] = {k: v.clone() for k, v in trainer.module.state_dict().items()}
    if out is not None:
        torch.save(record, out)
    del trainer  # DDP's reducer goes while the group is alive (see shutdown_distributed)
    shutdown_distributed(synchronize=True)
    return record


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    _run(world, BATCH, os.path.join(tmp, f"rank{rank}.pt"), rank)


def test_two_processes_equal_one_with_doubled_batch(tmp_path, monkeypatch):
    processes = mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 300  # ~5 s here: a hang fails the test instead of stalling the run
    while not processes.join(timeout=5):
        if time.monotonic() > deadline:
            for p in processes.processes:
                p.kill()
            pytest.fail("the two DDP processes did not finish within 300 s")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    single = _run(1, 2 * BATCH, None)

    steps = EPOCHS * 2
    assert len(single["loss"]) == steps
    for rec in ranks:
        # the loss curve and the first step's gradients equal the single process's
        torch.testing.assert_close(torch.tensor(rec["loss"]), torch.tensor(single["loss"]), rtol=1e-5, atol=1e-6)
        assert rec["grads"].keys() == single["grads"].keys()
        for k, g in single["grads"].items():
            torch.testing.assert_close(rec["grads"][k], g, rtol=1e-4, atol=1e-6)
        for k, p in single["params"].items():
            torch.testing.assert_close(rec["params"][k], p, rtol=1e-4, atol=1e-5)
        # gradients were all-reduced once per optimizer step (one bucket), not once per micro-step
        calls = rec["allreduce_calls"]
        assert calls == [i + 1 for i in range(steps)], calls
    for k in ranks[0]["params"]:  # the replicas stayed identical
        assert torch.equal(ranks[0]["params"][k], ranks[1]["params"][k])
