"""Command-line parsers for ``se3t train | evaluate | predict``.

Flag names, meanings and defaults follow NVIDIA's reference (``runtime/arguments.py``) so its scripts carry over;
booleans are ``--flag/--no-flag`` pairs (``argparse.BooleanOptionalAction``), never ``type=bool``.
"""

from __future__ import annotations

import argparse
from typing import Any, Sequence

__all__ = ["PRESETS", "build_parser", "parse_args"]

BOOL = argparse.BooleanOptionalAction

# Presets set defaults; flags given on the command line still win.
PRESETS: dict[str, dict[str, Any]] = {
    # The reference recipe (SPEC section 6, 1 GPU); equal to the plain defaults, spelled out for clarity.
    "paper": dict(task="homo", batch_size=240, epochs=100, learning_rate=0.002, min_learning_rate=None,
                  weight_decay=0.1, optimizer="adam", num_layers=7, num_degrees=4, num_channels=32, num_heads=8,
                  channels_div=2, pooling="max", norm=True, use_layer_norm=True, eval_interval=20,
                  train_subset=None, val_subset=None),
    # A small model on a QM9 subset: a meaningful homo validation MAE in a few minutes on 2 CPU cores.
    "demo": dict(task="homo", batch_size=32, epochs=4, learning_rate=0.003, min_learning_rate=None,
                 weight_decay=0.01, optimizer="adam", num_layers=2, num_degrees=2, num_channels=16, num_heads=4,
                 channels_div=2, pooling="max", norm=True, use_layer_norm=True, eval_interval=1,
                 train_subset=4000, val_subset=1000, num_workers=0),
}


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _nonneg_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _add_runtime_options(p: argparse.ArgumentParser, batch_size: int) -> None:
    g = p.add_argument_group("execution")
    g.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    g.add_argument("--precision", choices=["fp32", "tf32", "fp16", "bf16"], default=None,
                   help="numeric precision (default: tf32 on CUDA, fp32 on CPU)")
    g.add_argument("--amp", action=BOOL, default=False,
                   help="automatic mixed precision: fp16 (+ gradient scaling) on CUDA, bf16 on CPU")
    g.add_argument("--batch_size", type=_positive_int, default=batch_size, help="molecules per batch (per process)")
    g.add_argument("--num_workers", type=_nonneg_int, default=8, help="data-loading worker processes")
    levels = ["NONE", "PARTIAL", "FULL", "EDGE_FRAME"]  # se3t.FuseLevel's names (this module imports no torch)
    g.add_argument("--fuse_level", choices=levels + [name.lower() for name in levels], default="EDGE_FRAME",
                   help="how the convolutions group their contractions (never changes the outputs)")
    g.add_argument("--compile", action=BOOL, default=False, help="torch.compile the model")
    g.add_argument("--benchmark", action=BOOL, default=False,
                   help="measure throughput (mol/s) and latency percentiles after warm-up")
    g.add_argument("--benchmark_warmup", type=_nonneg_int, default=10,
                   help="steps left out of the --benchmark figures")
    g.add_argument("--log_dir", default=None, help="directory for metrics.jsonl, summary.json (and TensorBoard)")
    g.add_argument("--silent", action=BOOL, default=False, help="no progress bar and no messages but warnings")


def _add_data_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data_dir", default=None, help="QM9 cache directory (default: se3t_data's own)")
    g.add_argument("--split_seed", type=int, default=0, help="seed of the random train/val/test split")
    g.add_argument("--allow_partial_data", action=BOOL, default=False,
                   help="accept a QM9 source with fewer than the 130,831 molecules (small test sets)")


def _add_train(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train on QM9", description="Train an SE(3)-Transformer on a QM9 target.")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="paper: the reference recipe; demo: a small model on a subset, minutes on a CPU")
    _add_data_options(p)
    p.add_argument("--task", default="homo", help="QM9 target (homo, lumo, gap, mu, alpha, U0, ...; default homo)")
    p.add_argument("--train_subset", type=_positive_int, default=None, help="train on the first N of the split")
    p.add_argument("--val_subset", type=_positive_int, default=None, help="validate on the first N of the split")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=_positive_int, default=100)
    g.add_argument("--learning_rate", "--lr", dest="learning_rate", type=_positive_float, default=0.002)
    g.add_argument("--min_learning_rate", "--min_lr", dest="min_learning_rate", type=_positive_float, default=None,
                   help="cosine-annealed to this per epoch (default: learning_rate / 10)")
    g.add_argument("--weight_decay", type=float, default=0.1)
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (adam/lamb: beta1)")
    g.add_argument("--optimizer", choices=["adam", "sgd", "lamb"], default="adam", help="adam means AdamW")
    g.add_argument("--gradient_clip", type=_positive_float, default=None, help="clip the gradient norm to this")
    g.add_argument("--accumulate_grad_batches", type=_positive_int, default=1)
    g.add_argument("--optimizer_in_backward", action=BOOL, default=False,
                   help="step each parameter as soon as its gradient is complete and free that gradient (less "
                        "memory; one process, no accumulation, no --gradient_clip, no fp16 --amp)")
    g.add_argument("--return_freed_memory", action=BOOL, default=False,
                   help="give freed tensors back to the system (glibc malloc, se3t.runtime.return_freed_memory): a "
                        "resident set closer to the live tensors, for page faults on every large tensor (paper model, "
                        "2-core Zen 4: 3-6%% more step time, ~10%% with --low_memory)")
    g.add_argument("--cuda_graphs", action=BOOL, default=False,
                   help="replay each step's forward, loss and backward as a CUDA graph, one per padded batch shape "
                        "(CUDA, one process, no accumulation, no --low_memory); the optimizer steps eagerly")
    g.add_argument("--seed", type=int, default=None, help="seed of initialisation and data order (default: random)")

    g = p.add_argument_group("model")
    g.add_argument("--precompute_bases", action=BOOL, default=False,
                   help="compute the edge bases in the data workers instead of in the forward")
    g.add_argument("--num_layers", type=_positive_int, default=7)
    g.add_argument("--num_degrees", type=_positive_int, default=4)
    g.add_argument("--num_channels", type=_positive_int, default=32)
    g.add_argument("--num_heads", type=_positive_int, default=8)
    g.add_argument("--channels_div", type=_positive_int, default=2)
    g.add_argument("--pooling", choices=["max", "avg"], default="max")
    g.add_argument("--norm", action=BOOL, default=True, help="NormSE3 after each attention block")
    g.add_argument("--use_layer_norm", action=BOOL, default=True, help="LayerNorm in the radial MLPs")
    g.add_argument("--low_memory", action=BOOL, default=False, help="recompute activations in backward")
    g.add_argument("--low_memory_blocks", type=_positive_int, default=3,
                   help="with --low_memory: recompute each layer in this many blocks of destination nodes")
    g.add_argument("--low_memory_segment", type=_positive_int, default=2,
                   help="with --low_memory: keep the input of one layer in this many through the step (the others' "
                        "are recomputed once in backward; 1: every layer's input, no extra forward)")

    g = p.add_argument_group("checkpoints and evaluation")
    g.add_argument("--save_ckpt_path", default=None, help="checkpoint file written during training")
    g.add_argument("--load_ckpt_path", default=None, help="resume from this checkpoint")
    g.add_argument("--ckpt_interval", type=int, default=-1, help="save every N epochs (-1: only at the end)")
    g.add_argument("--ckpt_steps", type=_nonneg_int, default=0,
                   help="also save every N optimizer steps, mid-epoch (0: off)")
    g.add_argument("--eval_interval", type=int, default=20, help="validate every N epochs (and at the end)")
    _add_runtime_options(p, batch_size=240)
    return p


def _add_evaluate(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("evaluate", help="MAE of a checkpoint on the QM9 test split",
                       description="Mean absolute error of a trained checkpoint on a QM9 split.")
    p.add_argument("--load_ckpt_path", required=True, help="checkpoint to evaluate")
    _add_data_options(p)
    p.set_defaults(split_seed=None)
    p.add_argument("--split", choices=["train", "val", "test"], default="test")
    p.add_argument("--task", default=None,
                   help="QM9 target (default: the checkpoint's; homo for converted reference checkpoints)")
    p.add_argument("--subset", type=_positive_int, default=None, help="evaluate on the first N of the split")
    _add_runtime_options(p, batch_size=240)
    return p


def _add_predict(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("predict", help="predict the target for your own molecules",
                       description="Predict a trained checkpoint's target for molecules in any file ase reads.")
    p.add_argument("files", nargs="+", help="molecule files (xyz, sdf, ... anything ase.io.read reads)")
    p.add_argument("--load_ckpt_path", required=True, help="checkpoint to predict with")
    p.add_argument("--output", "-o", default="-", help="CSV file to write (default: stdout)")
    _add_runtime_options(p, batch_size=240)
    p.set_defaults(num_workers=0)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="se3t", description="SE(3)-Transformer: training and inference on QM9.")
    sub = parser.add_subparsers(dest="command", metavar="{train,evaluate,predict,convert-nvidia}")
    sub.required = True
    _add_train(sub)
    _add_evaluate(sub)
    _add_predict(sub)
    sub.add_parser("convert-nvidia", help="convert a checkpoint of NVIDIA's reference implementation",
                   add_help=False)
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse, applying ``--preset`` defaults first so that explicit flags override them."""
    argv = list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "preset", None):
        train_parser = parser._subparsers._group_actions[0].choices["train"]  # noqa: SLF001
        train_parser.set_defaults(**PRESETS[args.preset])
        args = parser.parse_args(argv)
    return args
