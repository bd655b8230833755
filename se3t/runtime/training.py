"""The training loop: accumulation, DDP without needless all-reduces, exact mid-epoch resume, NaN guard.

Progress is counted in optimizer steps. A checkpoint records where the *next* step starts
(``epoch``, ``step_in_epoch``, ``global_step``); the data order of an epoch depends on ``(seed, epoch)`` only
(:class:`~se3t.runtime.data.EpochPlan`), so a resumed run skips the steps already done and continues exactly
where the checkpoint left it: the same molecules, the same optimizer/scheduler/scaler/RNG states.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .build import TargetInfo
from .checkpoint import capture_rng_state, load_model_state, restore_rng_state, save_checkpoint, unwrap_model
from .data import EpochPlan
from .distributed import DistInfo, all_reduce_sum, sync_context
from .engine import StepTimer, _loader, evaluate_mae, inputs_abs_error, standardised_abs_error
from .errors import TrainingDiverged, UserError
from .metrics import MetricsLogger, log, progress
from .optim import StepInBackward, build_optimizer, build_scheduler
from .precision import PrecisionPolicy

__all__ = ["TrainOptions", "Progress", "Trainer"]


@dataclass(frozen=True)
class TrainOptions:
    epochs: int = 100
    batch_size: int = 240
    accumulate_grad_batches: int = 1
    learning_rate: float = 0.002
    min_learning_rate: float | None = None
    weight_decay: float = 0.1
    momentum: float = 0.9
    optimizer: str = "adam"
    gradient_clip: float | None = None
    optimizer_in_backward: bool = False
    seed: int = 0
    eval_interval: int = 20
    ckpt_interval: int = -1
    ckpt_steps: int = 0
    save_ckpt_path: str | None = None
    num_workers: int = 0
    benchmark: bool = False
    benchmark_warmup: int = 10
    show_progress: bool = True


@dataclass
class Progress:
    epoch: int = 0          # epoch the next step belongs to
    step_in_epoch: int = 0  # optimizer steps of that epoch already done
    global_step: int = 0    # optimizer steps done in total

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step}


@dataclass
class _EpochStats:
    loss_sum: float = 0.0
    molecules: int = 0
    start: float = field(default_factory=time.perf_counter)


class Trainer:
    """Trains ``model`` (plain, DDP-wrapped here when the process group has several ranks).

    ``on_step_end(trainer)`` is called after every optimizer step (tests use it to stop a run mid-epoch).
    """

    def __init__(self, model: torch.nn.Module, train_set, val_set, collate: Callable, *, target: TargetInfo,
                 options: TrainOptions, policy: PrecisionPolicy, dist: DistInfo, config: dict[str, Any],
                 metrics: MetricsLogger | None = None, compile_model: bool = False, cuda_graphs: bool = False,
                 on_step_end: Callable[["Trainer"], None] | None = None):
        self.options, self.policy, self.dist, self.target = options, policy, dist, target
        self.train_set, self.val_set, self.collate = train_set, val_set, collate
        self.config = config
        self.metrics = metrics or MetricsLogger(None)
        self.on_step_end = on_step_end
        model = model.to(dist.device)
        self.module = model
        if dist.distributed:
            ids = [dist.device.index] if dist.device.type == "cuda" else None
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if compile_model:
            model = torch.compile(model)
        self.model = model
        self.optimizer = build_optimizer(options.optimizer, self.module.parameters(), options.learning_rate,
                                         options.weight_decay, options.momentum)
        self.scheduler = build_scheduler(self.optimizer, options.epochs, options.learning_rate,
                                         options.min_learning_rate)
        self.scaler = policy.make_scaler()
        self.progress = Progress()
        self.last_checkpoint: dict[str, Any] | None = None  # progress of the last checkpoint written or loaded
        self.loss_history: list[float] = []  # global training loss of every optimizer step of this process's run
        self.timer = StepTimer(dist.device, options.benchmark_warmup) if options.benchmark else None
        if len(train_set) < dist.world_size:
            raise UserError(f"the training set has {len(train_set)} molecules, fewer than the {dist.world_size} "
                            "processes")
        self.graphed = self._graphed_step() if cuda_graphs else None
        self.step_in_backward = self._step_in_backward() if options.optimizer_in_backward else None

    def _step_in_backward(self) -> StepInBackward:
        """``--optimizer_in_backward``: refuses what needs all gradients before any update."""
        o = self.options
        problem = ("runs one process (DDP all-reduces the gradients after they are complete)"
                   if self.dist.distributed else
                   "needs --accumulate_grad_batches 1 (each micro-batch's backward would step)"
                   if o.accumulate_grad_batches != 1 else
                   "cannot clip by the global gradient norm (--gradient_clip)" if o.gradient_clip is not None else
                   "cannot scale fp16 losses (the scaler checks all gradients first); use bf16 or fp32"
                   if self.scaler is not None else
                   "and --cuda_graphs are separate modes" if self.graphed is not None else None)
        if problem:
            raise UserError(f"--optimizer_in_backward {problem}")
        return StepInBackward(self.optimizer)

    def _graphed_step(self):
        """Forward, loss and backward of a step as a CUDA graph per padded batch shape (``--cuda_graphs``); the
        optimizer, clipping, the NaN guard and the scaler's step stay eager."""
        o, dist = self.options, self.dist
        problem = ("needs a CUDA device, got " + str(dist.device) if dist.device.type != "cuda" else
                   "runs one process (DDP's gradient all-reduce is not captured)" if dist.distributed else
                   "needs --accumulate_grad_batches 1 (a replay writes the gradients, it does not add)"
                   if o.accumulate_grad_batches != 1 else
                   "and --compile are separate modes" if self.model is not self.module else
                   "cannot capture --low_memory (its blocks are sized on the host)"
                   if getattr(getattr(self.module, "transformer", self.module), "low_memory", False) else None)
        if problem:
            raise UserError(f"--cuda_graphs {problem}")
        from ..cuda_graphs import CUDAGraphStep  # noqa: PLC0415

        def forward_backward(inputs: dict, y: torch.Tensor, graph_mask: torch.Tensor) -> torch.Tensor:
            err = inputs_abs_error(self.model, inputs, y, graph_mask, self.policy, self.target)
            # one process, no accumulation: the step's molecules are the batch's real graphs
            scaled = err / graph_mask.sum().clamp_min(1)
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            return err.detach()

        return CUDAGraphStep(forward_backward, params=list(self.module.parameters()), max_graphs=64)

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "model": unwrap_model(self.module).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": capture_rng_state(),
            "progress": self.progress.to_dict(),
        }

    def save(self) -> None:
        """Write the checkpoint (rank 0; the others wait for nothing: states are identical across ranks)."""
        path = self.options.save_ckpt_path
        if path is None:
            return
        if self.dist.is_main:
            save_checkpoint(path, self.state_dict())
        self.last_checkpoint = {"path": str(path), **self.progress.to_dict()}
        self.metrics.write("checkpoint", step=self.progress.global_step, path=str(path), **self.progress.to_dict())

    def resume(self, state: dict[str, Any], source: str) -> None:
        """Continue from a :meth:`state_dict` checkpoint: model, optimizer, scheduler, scaler, RNG, position."""
        load_model_state(self.module, state["model"], source)
        for key in ("optimizer", "scheduler", "progress", "rng"):
            if key not in state:
                raise UserError(f"{source} holds no {key!r} state, so training cannot resume from it "
                                "(a weights-only checkpoint can be evaluated, not resumed)")
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (ValueError, KeyError) as e:
            raise UserError(f"the optimizer state in {source} does not fit this run (another --optimizer?): "
                            f"{e}") from None
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        restore_rng_state(state["rng"])
        self.progress = Progress(**state["progress"])
        self.last_checkpoint = {"path": source, **self.progress.to_dict()}

    # ---------------------------------------------------------------- training
    def plan(self, epoch: int) -> EpochPlan:
        o = self.options
        return EpochPlan(len(self.train_set), o.batch_size, epoch=epoch, seed=o.seed, rank=self.dist.rank,
                         world_size=self.dist.world_size, accumulate=o.accumulate_grad_batches)

    def _diverged(self, where: str, applied: bool = False) -> TrainingDiverged:
        last = self.last_checkpoint
        if last is None:
            kept = "no checkpoint had been written yet (use --save_ckpt_path with --ckpt_steps to keep some)"
        else:
            kept = (f"the last good checkpoint, {last['path']} (epoch {last['epoch']}, step {last['step_in_epoch']} "
                    f"of it, global step {last['global_step']}), was left untouched")
        return TrainingDiverged(
            f"training diverged: the {where} became NaN/inf at epoch {self.progress.epoch}, step "
            f"{self.progress.step_in_epoch} (global step {self.progress.global_step}); the update was "
            f"{'applied (--optimizer_in_backward steps during backward)' if applied else 'not applied'} and {kept}. "
            "Try a lower --learning_rate, --gradient_clip, or fp32 precision.")

    def _optimizer_step(self, loss_sum: torch.Tensor, step_molecules: int) -> float:
        """All-reduce the step's loss (one scalar), refuse NaN/inf, clip, step. Returns the global mean loss."""
        stats = all_reduce_sum(loss_sum.detach().double().reshape(1).clone())
        loss = float(stats.item()) / step_molecules
        if not math.isfinite(loss):
            raise self._diverged("loss", applied=self.step_in_backward is not None)
        if self.step_in_backward is not None:  # every parameter was stepped in backward
            if self.step_in_backward.take_nonfinite():
                raise self._diverged("gradient", applied=True)
            return loss
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.options.gradient_clip is not None or self.scaler is None:
            max_norm = self.options.gradient_clip if self.options.gradient_clip is not None else math.inf
            norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm)
            if self.scaler is None and not torch.isfinite(norm):
                raise self._diverged("gradient")
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips steps with inf gradients and lowers the scale
            self.scaler.update()
        else:
            self.optimizer.step()
        return loss

    def _eager_forward_backward(self, batch, mb) -> torch.Tensor:
        """Forward, loss and backward of one micro-batch; returns its summed error (before scaling)."""
        with sync_context(self.model, mb.last_of_step):
            err = standardised_abs_error(self.model, batch, self.policy, self.target)
            # DDP averages gradients over ranks; scaling by world/step_molecules makes the result the
            # gradient of (sum of errors over the whole step) / (molecules of the whole step).
            scaled = err * (self.dist.world_size / mb.step_molecules)
            if self.step_in_backward is not None and not bool(torch.isfinite(err)):
                raise self._diverged("loss")  # before the backward that would apply it
            if self.scaler is not None:
                scaled = self.scaler.scale(scaled)
            scaled.backward()
        return err

    def train_epoch(self, plan: EpochPlan) -> _EpochStats:
        o, dist = self.options, self.dist
        stats = _EpochStats()
        start = self.progress.step_in_epoch
        micro = list(plan.micro_batches(start))
        loader = _loader(self.train_set, [m.indices for m in micro], self.collate, o.num_workers, dist.device)
        bar = progress(len(plan), initial=start, enabled=o.show_progress and dist.is_main,
                       desc=f"epoch {self.progress.epoch + 1}/{o.epochs}")
        self.model.train()
        loss_sum = torch.zeros((), device=dist.device)
        t_step = time.perf_counter()
        if self.timer is not None:
            self.timer.restart()  # steps are timed end to end, data loading included (as the reference does)
        for mb, batch in zip(micro, loader):
            batch = batch.to(dist.device)
            if self.graphed is not None:  # replays leave this batch's gradients in p.grad
                err = self.graphed(batch.model_inputs(), batch.y, batch.graph_mask)
            else:
                err = self._eager_forward_backward(batch, mb)
            loss_sum = loss_sum + err.detach()
            if not mb.last_of_step:
                continue
            loss = self._optimizer_step(loss_sum, mb.step_molecules)
            if self.timer is not None:
                self.timer.mark(mb.step_molecules)
            loss_sum = torch.zeros((), device=dist.device)
            self.progress.step_in_epoch += 1
            self.progress.global_step += 1
            self.loss_history.append(loss)
            stats.loss_sum += loss * mb.step_molecules
            stats.molecules += mb.step_molecules
            now = time.perf_counter()
            rate = mb.step_molecules / max(now - t_step, 1e-9)
            t_step = now
            bar.set_postfix(loss=f"{loss:.4f}", mol_s=f"{rate:.0f}", refresh=False)
            bar.update(1)
            self.metrics.write("train_step", step=self.progress.global_step, epoch=self.progress.epoch,
                               loss=loss, lr=self.optimizer.param_groups[0]["lr"], molecules=mb.step_molecules)
            if o.ckpt_steps and self.progress.global_step % o.ckpt_steps == 0:
                self.save()
            if self.on_step_end is not None:
                self.on_step_end(self)
            self.optimizer.zero_grad(set_to_none=True)
        bar.refresh()  # draw the final loss / rate even when the epoch was shorter than tqdm's refresh interval
        bar.close()
        return stats

    def validate(self) -> float | None:
        if self.val_set is None or len(self.val_set) == 0:
            return None
        mae, n = evaluate_mae(self.model, self.val_set, self.collate, batch_size=self.options.batch_size,
                              policy=self.policy, dist=self.dist, target=self.target,
                              num_workers=self.options.num_workers)
        self.metrics.write("validation", step=self.progress.global_step, epoch=self.progress.epoch,
                           mae=mae, unit=self.target.unit, molecules=n)
        log.info(f"epoch {self.progress.epoch}: validation MAE {self.target.describe_mae(mae)} ({n} molecules)")
        return mae

    def fit(self) -> dict[str, Any]:
        o = self.options
        t0 = time.perf_counter()
        molecules = 0
        val_mae = None
        last_epoch_loss = None
        self.optimizer.zero_grad(set_to_none=True)
        while self.progress.epoch < o.epochs:
            plan = self.plan(self.progress.epoch)
            stats = self.train_epoch(plan)
            molecules += stats.molecules
            epoch_time = time.perf_counter() - stats.start
            last_epoch_loss = stats.loss_sum / max(stats.molecules, 1) if stats.molecules else last_epoch_loss
            self.metrics.write("train_epoch", step=self.progress.global_step, epoch=self.progress.epoch,
                               loss=last_epoch_loss, seconds=epoch_time,
                               throughput_mol_s=stats.molecules / max(epoch_time, 1e-9),
                               lr=self.optimizer.param_groups[0]["lr"])
            if stats.molecules:
                log.info(f"epoch {self.progress.epoch + 1}/{o.epochs}: train loss {last_epoch_loss:.4f} "
                         f"(standardised L1), {stats.molecules / epoch_time:.1f} mol/s, {epoch_time:.1f} s")
            with warnings.catch_warnings():  # after a resume at an epoch's end no optimizer.step() preceded it
                warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*before.*optimizer.step",
                                        category=UserWarning)
                self.scheduler.step()
            self.progress.epoch += 1
            self.progress.step_in_epoch = 0
            finished = self.progress.epoch
            if (o.eval_interval > 0 and finished % o.eval_interval == 0) or finished == o.epochs:
                val_mae = self.validate()
            if (o.ckpt_interval > 0 and finished % o.ckpt_interval == 0) or finished == o.epochs:
                self.save()
        wall = time.perf_counter() - t0
        summary: dict[str, Any] = {
            "task": self.target.name, "unit": self.target.unit, "epochs": o.epochs,
            "global_steps": self.progress.global_step, "train_loss": last_epoch_loss,
            "validation_mae": val_mae, "wall_seconds": wall,
            "train_throughput_mol_s": molecules / max(wall, 1e-9) if molecules else None,
            "world_size": self.dist.world_size, "precision": self.policy.precision.value,
            "checkpoint": o.save_ckpt_path,
        }
        if val_mae is not None and self.target.unit == "eV":
            summary["validation_mae_meV"] = val_mae * 1000
        if self.timer is not None:
            bench = self.timer.report("training")
            bench["world_size"] = self.dist.world_size
            self.metrics.write("benchmark", step=self.progress.global_step, **bench)
            summary["benchmark"] = bench
        return summary
