"""The command line: flags, presets, clear errors (no tracebacks), and train -> evaluate -> predict on QM9."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from se3t.__main__ import main
from se3t.runtime.args import PRESETS, parse_args
from se3t.runtime.build import ModelConfig, build_model

TINY_FLAGS = ["--num_layers", "1", "--num_degrees", "2", "--num_channels", "4", "--num_heads", "2"]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err[-3000:]
    return code, out, err


# ------------------------------------------------------------------------------------------------ parsing
def test_reference_defaults_and_aliases():
    a = parse_args(["train"])
    assert (a.batch_size, a.epochs, a.learning_rate, a.weight_decay, a.num_layers, a.num_degrees, a.num_channels,
            a.num_heads, a.channels_div, a.pooling, a.norm, a.use_layer_norm, a.ckpt_interval, a.eval_interval,
            a.optimizer, a.min_learning_rate, a.accumulate_grad_batches, a.task) == (
        240, 100, 0.002, 0.1, 7, 4, 32, 8, 2, "max", True, True, -1, 20, "adam", None, 1, "homo")
    a = parse_args(["train", "--lr", "0.01", "--no-norm", "--amp", "--low_memory", "--low_memory_blocks", "8",
                    "--low_memory_segment", "3"])
    assert a.learning_rate == 0.01 and a.norm is False and a.amp is True and a.low_memory is True
    assert a.low_memory_blocks == 8 and ModelConfig.from_args(a).low_memory_blocks == 8
    assert ModelConfig.from_args(a).low_memory_segment == 3 and build_model(ModelConfig.from_args(a)) \
        .transformer.low_memory_segment == 3
    assert a.return_freed_memory is False and parse_args(["train", "--return_freed_memory"]).return_freed_memory


def test_preset_sets_defaults_and_flags_win():
    a = parse_args(["train", "--preset", "demo"])
    assert a.num_layers == PRESETS["demo"]["num_layers"] and a.train_subset == PRESETS["demo"]["train_subset"]
    a = parse_args(["train", "--num_layers", "3", "--preset", "demo", "--epochs", "1"])
    assert a.num_layers == 3 and a.epochs == 1 and a.num_channels == PRESETS["demo"]["num_channels"]
    a = parse_args(["train", "--preset", "paper"])
    assert (a.batch_size, a.epochs, a.num_layers, a.num_channels) == (240, 100, 7, 32)


@pytest.mark.parametrize("argv", [["train", "--batch_size", "0"], ["train", "--lr", "-1"],
                                  ["train", "--pooling", "sum"], ["train", "--norm", "false"], ["frobnicate"]])
def test_bad_flags_exit_2_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage:" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ bad inputs
def test_unknown_task(capsys):
    code, _, err = run(capsys, "train", "--task", "nope")
    assert code == 2 and "unknown task 'nope'" in err and "homo" in err


@pytest.mark.parametrize("flags, message", [
    (["--precision", "fp16", "--device", "cpu"], "fp16 needs a CUDA device"),
    (["--precision", "tf32", "--device", "cpu"], "tf32 needs a CUDA device"),
    (["--amp", "--precision", "fp32", "--device", "cpu"], "pass only one of them"),
    (["--device", "tpu"], "not a device torch knows"),
    (["--device", "meta"], "only cpu and cuda"),
])
def test_precision_and_device_errors(flags, message, capsys):
    code, _, err = run(capsys, "train", *flags)
    assert code == 2 and message in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda(capsys):
    code, _, err = run(capsys, "train", "--device", "cuda")
    assert code == 2 and "no CUDA device" in err


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    (b"not a checkpoint at all", "cannot be read as a PyTorch file"),
    ("evil", "refuses to unpickle"),
    ("nvidia", "convert-nvidia"),
    ("foreign", "not an se3t checkpoint"),
])
def test_bad_checkpoints(tmp_path, capsys, content, message):
    path = tmp_path / "ckpt.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "evil":
        torch.save({"format": "se3t-checkpoint", "obj": Evil()}, path)
    elif content == "nvidia":
        torch.save({"state_dict": {"w": torch.zeros(1)}, "optimizer_state_dict": {}, "epoch": 3}, path)
    elif content == "foreign":
        torch.save({"weights": torch.zeros(2)}, path)
    for cmd in (["evaluate"], ["predict", tmp_path / "x.xyz"]):
        code, out, err = run(capsys, *cmd, "--load_ckpt_path", path)
        assert code == 2 and message in err, err
        assert "this must never run" not in out + err


def test_converted_checkpoint_of_another_model(tmp_path, capsys):
    path = tmp_path / "converted.pt"
    torch.save({"format": "se3t", "model_class": "SE3Transformer", "state_dict": {},
                "model_kwargs": {"fiber_in": {0: 5, 1: 2}, "fiber_edge": {0: 3}}}, path)
    code, _, err = run(capsys, "evaluate", "--load_ckpt_path", path)
    assert code == 2 and "QM9 needs an SE3TransformerPooled" in err


def test_truncated_checkpoint(tmp_path, capsys):
    path = tmp_path / "ckpt.pt"
    torch.save({"format": "se3t-checkpoint", "version": 1, "w": torch.randn(1000)}, path)
    path.write_bytes(path.read_bytes()[:300])
    code, _, err = run(capsys, "evaluate", "--load_ckpt_path", path)
    assert code == 2 and "truncated, corrupt" in err


def test_missing_qm9_data(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("se3t_data._qm9.resolve_source", _no_source)
    code, _, err = run(capsys, "train", *TINY_FLAGS, "--data_dir", tmp_path / "empty", "--epochs", "1", "--silent")
    assert code == 2 and "QM9 data: no QM9 source here (test)" in err


def _no_source(*args, **kwargs):
    import se3t_data

    raise se3t_data.QM9SourceError("no QM9 source here (test)")


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def trained(qm9_dir, tmp_path_factory):
    """One tiny training run on the QM9 fixture, shared by the tests below."""
    out = tmp_path_factory.mktemp("run")
    ckpt, logs = out / "model.pt", out / "logs"
    code = main([str(a) for a in ["train", *TINY_FLAGS, "--data_dir", qm9_dir, "--allow_partial_data",
                                  "--epochs", "2", "--batch_size", "16", "--num_workers", "0", "--seed", "1",
                                  "--eval_interval", "1", "--save_ckpt_path", ckpt, "--log_dir", logs,
                                  "--benchmark", "--benchmark_warmup", "2", "--silent"]])
    assert code == 0
    return ckpt, logs


@pytest.mark.rdkit
def test_train_writes_metrics_summary_and_checkpoint(trained):
    ckpt, logs = trained
    records = [json.loads(line) for line in (logs / "metrics.jsonl").read_text().splitlines()]
    kinds = {r["kind"] for r in records}
    assert {"config", "train_step", "train_epoch", "validation", "checkpoint", "benchmark", "summary"} <= kinds
    summary = json.loads((logs / "summary.json").read_text())
    assert summary["validation_mae"] > 0 and summary["unit"] == "eV" and summary["epochs"] == 2
    bench = summary["benchmark"]
    assert bench["throughput_mol_s"] > 0 and bench["latency_p50_ms"] <= bench["latency_p99_ms"]
    state = torch.load(ckpt, weights_only=True)
    assert state["progress"]["epoch"] == 2 and state["config"]["target"]["name"] == "homo"


@pytest.mark.rdkit
def test_evaluate_reports_test_mae(trained, qm9_dir, capsys):
    ckpt, _ = trained
    code, out, err = run(capsys, "evaluate", "--load_ckpt_path", ckpt, "--data_dir", qm9_dir,
                         "--allow_partial_data", "--batch_size", "8", "--num_workers", "0", "--benchmark",
                         "--benchmark_warmup", "1")
    assert code == 0
    summary = json.loads(out.split("summary: ", 1)[1])
    assert summary["split"] == "test" and summary["molecules"] > 0 and summary["mae"] > 0
    assert summary["mae_meV"] == pytest.approx(summary["mae"] * 1000)
    assert summary["benchmark"]["mode"] == "inference"


@pytest.mark.rdkit
def test_precompute_bases_and_bf16(qm9_dir, tmp_path, capsys):
    code, out, err = run(capsys, "train", *TINY_FLAGS, "--data_dir", qm9_dir, "--allow_partial_data", "--epochs", "1",
                         "--batch_size", "8", "--train_subset", "24", "--val_subset", "8", "--num_workers", "1",
                         "--precompute_bases", "--amp", "--device", "cpu", "--seed", "0", "--silent")
    assert code == 0, err
    summary = json.loads(out.split("summary: ", 1)[1])
    assert summary["precision"] == "bf16" and summary["global_steps"] == 3 and summary["validation_mae"] > 0


@pytest.mark.rdkit
def test_low_memory_with_the_optimizer_in_backward(qm9_dir, tmp_path, capsys, monkeypatch):
    """... with glibc returning freed memory when asked (--return_freed_memory, process-wide: recorded here, not
    made)."""
    from se3t.runtime import commands
    calls = []
    monkeypatch.setattr(commands, "return_freed_memory", lambda: calls.append(1) or True)
    common = ["train", *TINY_FLAGS, "--data_dir", qm9_dir, "--allow_partial_data", "--epochs", "1", "--batch_size",
              "8", "--train_subset", "24", "--val_subset", "8", "--num_workers", "0", "--seed", "0", "--silent",
              "--low_memory", "--optimizer_in_backward"]
    code, out, err = run(capsys, *common, "--log_dir", tmp_path, "--return_freed_memory")
    assert code == 0, err
    summary = json.loads(out.split("summary: ", 1)[1])
    assert summary["global_steps"] == 3 and summary["validation_mae"] > 0
    config = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert config["run"]["optimizer_in_backward"] is True
    assert config["run"]["return_freed_memory"] is True and len(calls) == 1
    code, out, err = run(capsys, *common, "--gradient_clip", "1")
    assert code == 2 and "--optimizer_in_backward cannot clip by the global gradient norm" in err
    assert len(calls) == 1  # not asked


@pytest.mark.rdkit
def test_evaluate_with_another_task_is_refused(trained, qm9_dir, capsys):
    ckpt, _ = trained
    code, _, err = run(capsys, "evaluate", "--load_ckpt_path", ckpt, "--data_dir", qm9_dir, "--task", "lumo")
    assert code == 2 and "predicts homo, not --task lumo" in err


@pytest.mark.rdkit
def test_resume_with_other_model_flags_is_refused(trained, qm9_dir, capsys):
    ckpt, _ = trained
    code, _, err = run(capsys, "train", "--num_layers", "2", "--num_degrees", "2", "--num_channels", "4",
                       "--num_heads", "2", "--data_dir", qm9_dir, "--allow_partial_data", "--load_ckpt_path", ckpt)
    assert code == 2 and "num_layers: checkpoint 1, command line 2" in err


@pytest.mark.rdkit
def test_predict_writes_csv(trained, tmp_path, capsys):
    import ase
    import ase.io

    ckpt, _ = trained
    water = ase.Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    methane = ase.Atoms("CH4", positions=[[0, 0, 0], [0.63, 0.63, 0.63], [-0.63, -0.63, 0.63],
                                          [-0.63, 0.63, -0.63], [0.63, -0.63, -0.63]])
    xyz = tmp_path / "mols.xyz"
    ase.io.write(xyz, [water, methane])
    out_csv = tmp_path / "pred.csv"
    code, _, err = run(capsys, "predict", "--load_ckpt_path", ckpt, xyz, "--output", out_csv)
    assert code == 0, err
    rows = list(csv.DictReader(out_csv.open()))
    assert [r["id"] for r in rows] == ["mols.xyz:0", "mols.xyz:1"]
    assert all(abs(float(r["homo_eV"])) < 100 for r in rows)


@pytest.mark.rdkit
@pytest.mark.parametrize("content, message", [(None, "no such file"), ("garbage\n!!\n", "mols.xyz")])
def test_predict_bad_input_file(trained, tmp_path, capsys, content, message):
    ckpt, _ = trained
    path = tmp_path / "mols.xyz"
    if content is not None:
        path.write_text(content)
    code, _, err = run(capsys, "predict", "--load_ckpt_path", ckpt, path)
    assert code == 2 and message in err


@pytest.mark.rdkit
def test_torchrun_two_cpu_processes(trained, qm9_dir, tmp_path):
    """The real multi-process path: torchrun -> env:// rendezvous -> Gloo -> one log and one checkpoint."""
    logs, ckpt = tmp_path / "logs", tmp_path / "ddp.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "se3t",
           "train", *TINY_FLAGS, "--device", "cpu", "--data_dir", str(qm9_dir), "--allow_partial_data",
           "--epochs", "1", "--batch_size", "8", "--num_workers", "0", "--seed", "3", "--train_subset", "64",
           "--val_subset", "16", "--save_ckpt_path", str(ckpt), "--log_dir", str(logs), "--silent"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((logs / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_steps"] == 4  # 64 molecules / (2 x 8)
    assert done.stdout.count("summary: ") == 1  # only rank 0 reports
    assert torch.load(ckpt, weights_only=True)["progress"]["global_step"] == 4
