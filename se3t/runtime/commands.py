"""``se3t train | evaluate | predict``: wiring flags to data, model, trainer and reports."""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .build import ModelConfig, TargetInfo, build_model
from .checkpoint import load_checkpoint, load_model_state
from .distributed import DistInfo, init_distributed, shutdown_distributed
from .engine import StepTimer, evaluate_mae, predict_values
from .errors import UserError
from .heap import return_freed_memory
from .metrics import MetricsLogger, log, setup_console_logging
from .precision import PrecisionPolicy, resolve_precision
from .qm9 import load_qm9, make_collate, take_subset, target_info
from .training import Trainer, TrainOptions

__all__ = ["run_train", "run_evaluate", "run_predict"]


def _setup(args: argparse.Namespace) -> tuple[DistInfo, PrecisionPolicy]:
    dist = init_distributed(args.device)
    setup_console_logging(args.silent, dist.rank)
    precision = resolve_precision(args.precision, args.amp, dist.device)
    policy = PrecisionPolicy(precision, dist.device.type)
    policy.apply_global_settings()
    return dist, policy


def _broadcast_seed(seed: int | None, dist: DistInfo) -> int:
    if seed is None:
        seed = random.SystemRandom().randrange(2**31)
    if dist.distributed:
        box = [seed]
        torch.distributed.broadcast_object_list(box, src=0)
        seed = box[0]
    return seed


def _print_summary(title: str, summary: dict[str, Any], dist: DistInfo) -> None:
    if dist.is_main:
        print(f"{title}: " + json.dumps(summary, indent=None, default=str), file=sys.stdout, flush=True)


def _oom_guard(fn, *a, **kw):
    try:
        return fn(*a, **kw)
    except torch.OutOfMemoryError:
        raise UserError("the batch does not fit in device memory; lower --batch_size (use "
                        "--accumulate_grad_batches to keep the effective batch), or use --amp / --low_memory") from None


# ------------------------------------------------------------------------------------------------ train
def run_train(args: argparse.Namespace) -> int:
    dist, policy = _setup(args)
    return _then_leave_group(_train, args, dist, policy)


def _then_leave_group(fn, args: argparse.Namespace, dist: DistInfo, policy: PrecisionPolicy) -> int:
    """``fn(args, dist, policy)``, then leave the process group: with every rank after a normal end, at once after
    an error (the other ranks may never get there; see :func:`shutdown_distributed`)."""
    try:
        code = fn(args, dist, policy)
    except BaseException:
        shutdown_distributed()
        raise
    shutdown_distributed(synchronize=True)
    return code


def _train(args, dist: DistInfo, policy: PrecisionPolicy) -> int:
    # process-wide and for what is allocated from here on (se3t.runtime.heap): before the data and the model
    returns_memory = bool(args.return_freed_memory) and return_freed_memory()
    if args.return_freed_memory and not returns_memory:
        log.warning("--return_freed_memory: the C library is not glibc; freed memory stays with the allocator")
    model_config = ModelConfig.from_args(args)
    resume_state = None
    if args.load_ckpt_path:
        resume_state = load_checkpoint(args.load_ckpt_path)
        cfg = resume_state["config"]
        if "run" not in cfg:
            raise UserError(f"{args.load_ckpt_path} has no training state to resume (a converted or weights-only "
                            "checkpoint); evaluate it with `se3t evaluate` instead")
        saved = ModelConfig.from_dict(cfg["model"])
        diff = model_config.differences(saved)
        if diff:
            raise UserError(f"{args.load_ckpt_path} was trained with another model; pass the same model flags to "
                            "resume (" + "; ".join(diff) + ")")
        for key in ("task", "split_seed", "train_subset"):
            if cfg["run"].get(key) != getattr(args, key):
                raise UserError(f"{args.load_ckpt_path} was trained with --{key} {cfg['run'].get(key)}, this run "
                                f"asks {getattr(args, key)}; resume with the same data")
        seed = cfg["run"]["seed"]
    else:
        seed = _broadcast_seed(args.seed, dist)

    ds = load_qm9(args.data_dir, args.task, args.split_seed, allow_partial=args.allow_partial_data,
                  progress=dist.is_main and not args.silent, num_workers=max(1, min(args.num_workers, 4)))
    train, val, _ = ds.split()
    train = take_subset(train, args.train_subset, "--train_subset")
    val = take_subset(val, args.val_subset, "--val_subset")
    target = target_info(ds) if resume_state is None else TargetInfo.from_dict(resume_state["config"]["target"])
    collate = make_collate([train, val], args.batch_size, seed=args.split_seed,
                           basis_max_degree=args.num_degrees - 1 if args.precompute_bases else None)

    torch.manual_seed(seed)
    model = build_model(model_config, args.fuse_level)
    n_params = sum(p.numel() for p in model.parameters())
    run = {k: getattr(args, k) for k in ("task", "split_seed", "train_subset", "val_subset", "epochs", "batch_size",
                                         "learning_rate", "min_learning_rate", "weight_decay", "optimizer",
                                         "accumulate_grad_batches", "gradient_clip", "optimizer_in_backward",
                                         "preset")}
    run.update(seed=seed, world_size=dist.world_size, precision=policy.precision.value,
               return_freed_memory=returns_memory)
    config = {"model": model_config.to_dict(), "target": target.to_dict(), "run": run, "graph": "bonds"}
    metrics = MetricsLogger(args.log_dir, enabled=dist.is_main)
    metrics.write("config", **config, parameters=n_params, device=str(dist.device), train_molecules=len(train),
                  val_molecules=len(val))
    log.info(f"se3t train: {args.task} ({target.unit}), {len(train)} train / {len(val)} validation molecules, "
             f"{n_params:,} parameters, {dist.world_size} process(es) on {dist.device}, {policy.precision.value}")

    options = TrainOptions(
        epochs=args.epochs, batch_size=args.batch_size, accumulate_grad_batches=args.accumulate_grad_batches,
        learning_rate=args.learning_rate, min_learning_rate=args.min_learning_rate, weight_decay=args.weight_decay,
        momentum=args.momentum, optimizer=args.optimizer, gradient_clip=args.gradient_clip,
        optimizer_in_backward=args.optimizer_in_backward, seed=seed,
        eval_interval=args.eval_interval, ckpt_interval=args.ckpt_interval, ckpt_steps=args.ckpt_steps,
        save_ckpt_path=args.save_ckpt_path, num_workers=args.num_workers, benchmark=args.benchmark,
        benchmark_warmup=args.benchmark_warmup, show_progress=not args.silent)
    trainer = Trainer(model, train, val, collate, target=target, options=options, policy=policy, dist=dist,
                      config=config, metrics=metrics, compile_model=args.compile, cuda_graphs=args.cuda_graphs)
    if resume_state is not None:
        trainer.resume(resume_state, args.load_ckpt_path)
        p = trainer.progress
        log.info(f"resumed from {args.load_ckpt_path}: epoch {p.epoch + 1}, step {p.step_in_epoch} "
                 f"(global step {p.global_step})")
    try:
        summary = _oom_guard(trainer.fit)
        summary["parameters"] = n_params
        metrics.write_summary(summary)
    finally:
        metrics.close()
    if summary.get("validation_mae") is not None:
        log.info(f"validation MAE ({args.task}): {target.describe_mae(summary['validation_mae'])}")
    _print_summary("summary", summary, dist)
    return 0


# ------------------------------------------------------------------------------------------------ checkpoints
def _model_from_checkpoint(path: str, fuse_level: str, task: str | None):
    """(model, target or None, config) from an se3t training checkpoint or a converted NVIDIA checkpoint."""
    try:
        state = load_checkpoint(path)
    except UserError:
        converted = _load_converted(path)
        if converted is None:
            raise
        return converted
    config = ModelConfig.from_dict(state["config"]["model"])
    model = build_model(config, fuse_level)
    load_model_state(model, state["model"], path)
    return model, TargetInfo.from_dict(state["config"]["target"]), state["config"]


def _load_converted(path: str):
    """A checkpoint written by ``se3t convert-nvidia`` (format 'se3t'); None if ``path`` is not one."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    if not (isinstance(state, dict) and state.get("format") == "se3t" and "model_kwargs" in state):
        return None
    kw = state["model_kwargs"]

    def scalars(fiber) -> dict:
        return {int(k): int(v) for k, v in dict(fiber or {}).items()}

    if (state.get("model_class") != "SE3TransformerPooled" or scalars(kw.get("fiber_in")) != {0: 6}
            or scalars(kw.get("fiber_edge")) != {0: 4} or int(kw.get("output_dim", 1)) != 1):
        raise UserError(f"{path} holds a converted {state.get('model_class')} with fiber_in "
                        f"{scalars(kw.get('fiber_in'))} and fiber_edge {scalars(kw.get('fiber_edge'))}; QM9 needs an "
                        "SE3TransformerPooled with fiber_in {0: 6}, fiber_edge {0: 4} and one output")
    from se3t.compat import nvidia

    model = nvidia.build_model(state["model_class"], state["model_kwargs"])
    load_model_state(model, state["state_dict"], path)
    return model, None, {"converted": state.get("source", {})}


# ------------------------------------------------------------------------------------------------ evaluate
def run_evaluate(args: argparse.Namespace) -> int:
    dist, policy = _setup(args)
    return _then_leave_group(_evaluate, args, dist, policy)


def _evaluate(args, dist: DistInfo, policy: PrecisionPolicy) -> int:
    model, target, config = _model_from_checkpoint(args.load_ckpt_path, args.fuse_level, None)
    if target is not None and args.task not in (None, target.name):
        raise UserError(f"{args.load_ckpt_path} predicts {target.name}, not --task {args.task}")
    task = target.name if target is not None else (args.task or "homo")
    split_seed = args.split_seed if args.split_seed is not None else config.get("run", {}).get("split_seed", 0)
    ds = load_qm9(args.data_dir, task, split_seed, allow_partial=args.allow_partial_data,
                  progress=dist.is_main and not args.silent)
    if target is None:  # a converted reference checkpoint: standardise with this data's train split
        target = target_info(ds)
    part = dict(zip(("train", "val", "test"), ds.split()))[args.split]
    part = take_subset(part, args.subset, "--subset")
    model = model.to(dist.device)
    if args.compile:
        model = torch.compile(model)
    collate = make_collate(part, args.batch_size, seed=split_seed)
    timer = StepTimer(dist.device, args.benchmark_warmup) if args.benchmark else None
    t0 = time.perf_counter()
    mae, n = _oom_guard(evaluate_mae, model, part, collate, batch_size=args.batch_size, policy=policy,
                        dist=dist, target=target, num_workers=args.num_workers, timer=timer)
    summary: dict[str, Any] = {"task": task, "split": args.split, "molecules": n, "mae": mae,
                               "unit": target.unit, "wall_seconds": time.perf_counter() - t0,
                               "precision": policy.precision.value, "checkpoint": args.load_ckpt_path}
    if target.unit == "eV":
        summary["mae_meV"] = mae * 1000
    if timer is not None:
        summary["benchmark"] = timer.report("inference")
    metrics = MetricsLogger(args.log_dir, enabled=dist.is_main)
    if timer is not None:
        metrics.write("benchmark", **summary["benchmark"])
    metrics.write_summary(summary)
    metrics.close()
    log.info(f"{args.split} MAE ({task}): {target.describe_mae(mae)} over {n} molecules")
    _print_summary("summary", summary, dist)
    return 0


# ------------------------------------------------------------------------------------------------ predict
def run_predict(args: argparse.Namespace) -> int:
    dist, policy = _setup(args)
    if dist.distributed:
        raise UserError("se3t predict runs in one process; start it without torchrun")
    model, target, config = _model_from_checkpoint(args.load_ckpt_path, args.fuse_level, None)
    if target is None:
        raise UserError(f"{args.load_ckpt_path} is a converted reference checkpoint without the target's mean and "
                        "standard deviation; predict with a checkpoint written by `se3t train`")
    import se3t_data

    records, ids = [], []
    for path in args.files:
        try:
            mols = se3t_data.read(path, graph=config.get("graph", "bonds"))
        except FileNotFoundError:
            raise UserError(f"{path}: no such file") from None
        except (se3t_data.InvalidMoleculeError, ValueError, KeyError) as e:
            raise UserError(f"{path}: {e}") from None
        records.extend(mols)
        ids.extend((path, m.index) for m in mols)
    model = model.to(dist.device)
    values = _oom_guard(predict_values, model, records, se3t_data.collate, batch_size=args.batch_size,
                        policy=policy, device=dist.device, target=target)
    column = f"{target.name}_{target.unit}".replace("/", "_per_").replace(" ", "").replace("(", "").replace(")", "")
    out = sys.stdout if args.output == "-" else open(Path(args.output), "w", newline="", encoding="utf-8")
    try:
        writer = csv.writer(out)
        writer.writerow(["id", "file", "index", column])
        for (path, index), value in zip(ids, values):
            writer.writerow([f"{os.path.basename(path)}:{index}", path, index, f"{value:.6f}"])
    finally:
        if out is not sys.stdout:
            out.close()
    log.info(f"predicted {target.name} for {len(values)} molecules from {len(args.files)} file(s)"
             + ("" if args.output == "-" else f" -> {args.output}"))
    return 0
