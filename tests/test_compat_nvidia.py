"""Reference parity: NVIDIA's own outputs (shared fixtures) reproduced from its checkpoints."""
import json

import pytest
import torch

from se3t import FuseLevel
from se3t.compat.nvidia import (CheckpointMismatchError, E3NN_033_SIGN_FLIPS, build_model, cli_main,
                                convert_state_dict, load_nvidia, reference_radial_layout)

from core_helpers import SHARED

FIXTURES = ["P1", "P2", "P4"]


def load_fixture(name):
    path = SHARED / "fixtures" / f"nvidia_{name}.pt"
    if not path.exists():
        pytest.fail(f"reference fixture missing: {path}")
    return torch.load(path, weights_only=True)


def run(model, fx):
    inp = fx["inputs"]
    ei = torch.stack([inp["src"], inp["dst"]])
    with torch.no_grad():
        return model(inp["node_feats"], ei, inp["pos"], inp["edge_feats"], graph_index=inp["graph_index"],
                     num_graphs=inp["num_graphs"])


def rel_error(out, ref):
    if isinstance(ref, dict):
        return max(((out[k] - ref[k]).abs().max() / ref[k].abs().max()).item() for k in ref)
    return ((out.reshape(ref.shape) - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("name", FIXTURES)
@pytest.mark.parametrize("version, key", [("0.6.0", "output"), ("0.3.3", "output_e3nn_0_3_3")])
def test_reproduces_reference_outputs_at_every_fuse_level(name, version, key):
    fx = load_fixture(name)
    model = load_nvidia(fx["state_dict"], fx["config"], e3nn_version=version).double().eval()
    for level in FuseLevel:
        model.set_fuse_level(level)
        assert rel_error(run(model, fx), fx[key]) < 1e-6, (name, version, level)


def test_e3nn_versions_really_differ():
    """The sign handling is not a no-op: the two versions' outputs differ and each matches only its own."""
    fx = load_fixture("P1")
    m033 = load_nvidia(fx["state_dict"], fx["config"], e3nn_version="0.3.3").double()
    assert rel_error(run(m033, fx), fx["output"]) > 1e-2
    assert len(E3NN_033_SIGN_FLIPS) == 6


def test_layouts_detected_from_keys():
    assert reference_radial_layout(load_fixture("P1")["state_dict"], load_fixture("P1")["config"]) == \
        ["pair", "output_degree", "output_degree"]
    assert reference_radial_layout(load_fixture("P2")["state_dict"], load_fixture("P2")["config"]) == \
        ["pair", "conv", "output_degree"]


def _pairwise_checkpoint(fx):
    """Re-express the P1 checkpoint in the reference's per-pair layout (its low-memory mode), by hand from the
    reference's row order, so that the per-pair and 0->0 paths of the converter are exercised too."""
    sd = dict(fx["state_dict"])
    prefix = "graph_modules.2.to_key_value.conv_out."
    fin = [0, 1, 2]
    for d_out in (0, 1, 2):
        W = sd.pop(f"{prefix}{d_out}.radial_func.net.6.weight")
        hidden = {k.split(f"{prefix}{d_out}.")[1]: sd.pop(k) for k in list(sd) if k.startswith(f"{prefix}{d_out}.")}
        F = [2 * min(d, d_out) + 1 for d in fin]
        W = W.view(8, 8, sum(F), 32)  # [o, i, f, hidden]
        for d_in, a in zip(fin, [sum(F[:j]) for j in range(3)]):
            w = W[:, :, a:a + F[d_in]].reshape(-1, 32)
            if d_in == 0 and d_out == 0:
                w = w / (4 * torch.pi) ** 0.5  # the reference's pairwise 0->0 path has no basis factor
            base = f"graph_modules.2.to_key_value.conv.{d_in},{d_out}."
            for k, v in hidden.items():
                sd[base + k] = v.clone()
            sd[base + "radial_func.net.6.weight"] = w
    return sd


def test_pairwise_layout_and_zero_zero_factor():
    fx = load_fixture("P1")
    sd = _pairwise_checkpoint(fx)
    model = load_nvidia(sd, fx["config"], e3nn_version="0.6.0").double()
    assert reference_radial_layout(sd, fx["config"])[1] == "pair"
    assert rel_error(run(model, fx), fx["output"]) < 1e-6


def test_training_checkpoint_and_ddp_prefix(tmp_path):
    fx = load_fixture("P4")
    ckpt = {"state_dict": {f"module.{k}": v for k, v in fx["state_dict"].items()},
            "optimizer_state_dict": {"state": {}, "param_groups": []}, "epoch": 12}
    path = tmp_path / "nvidia.pth"
    torch.save(ckpt, path)
    model = load_nvidia(path, fx["config"], e3nn_version="0.6.0").double()
    assert rel_error(run(model, fx), fx["output"]) < 1e-6


def test_mismatch_errors_name_the_key():
    fx = load_fixture("P4")
    sd = dict(fx["state_dict"])
    sd["transformer.graph_modules.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError, match="unexpected key 'transformer.graph_modules.0.extra.weight'"):
        convert_state_dict(sd, fx["config"])
    sd = dict(fx["state_dict"])
    del sd["mlp.0.bias"]
    with pytest.raises(CheckpointMismatchError, match="missing key 'mlp.0.bias'"):
        convert_state_dict(sd, fx["config"])
    with pytest.raises(CheckpointMismatchError, match="shape mismatch"):
        convert_state_dict(fx["state_dict"], {**fx["config"], "num_channels": 16})
    with pytest.raises(ValueError, match="e3nn_version"):
        convert_state_dict(fx["state_dict"], fx["config"], e3nn_version="0.4.0")


def test_cli_convert(tmp_path, capsys):
    fx = load_fixture("P4")
    src = tmp_path / "model.pth"
    torch.save({"state_dict": fx["state_dict"], "epoch": 3}, src)
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({k: v for k, v in fx["config"].items()}))
    out = tmp_path / "se3t.pt"
    assert cli_main([str(src), "--config", str(cfg), "-o", str(out), "--e3nn-version", "0.6.0"]) == 0
    payload = torch.load(out, weights_only=True)
    model = build_model(payload["model_class"], payload["model_kwargs"]).double()
    model.load_state_dict(payload["state_dict"])
    assert rel_error(run(model, fx), fx["output"]) < 1e-6
    assert cli_main([str(tmp_path / "missing.pth"), "--config", str(cfg), "-o", str(out)]) == 2
    assert "not found" in capsys.readouterr().err


def test_per_input_degree_layout():
    """Re-express P2's fully fused conv (one shared radial MLP) in the reference's per-input-degree layout
    (``conv_in.{d_in}``, frequencies ordered by d_out then J): the converter must still reproduce P2's outputs."""
    fx = load_fixture("P2")
    sd = dict(fx["state_dict"])
    base = "graph_modules.2.to_key_value."
    W = sd.pop(base + "conv.radial_func.net.6.weight").view(8, 8, 19, 32)  # [o, i, f (d_out, d_in, J), hidden]
    hidden = {k[len(base + "conv."):]: sd.pop(k) for k in list(sd) if k.startswith(base + "conv.radial_func")}
    degrees = [0, 1, 2]
    offsets, f = {}, 0
    for d_out in degrees:
        for d_in in degrees:
            offsets[(d_in, d_out)] = f
            f += 2 * min(d_in, d_out) + 1
    for d_in in degrees:
        idx = [offsets[(d_in, d_out)] + j for d_out in degrees for j in range(2 * min(d_in, d_out) + 1)]
        for k, v in hidden.items():
            sd[f"{base}conv_in.{d_in}.{k}"] = v.clone()
        sd[f"{base}conv_in.{d_in}.radial_func.net.6.weight"] = W[:, :, idx].reshape(-1, 32)
    assert reference_radial_layout(sd, fx["config"])[1] == "input_degree"
    for version, key in [("0.6.0", "output"), ("0.3.3", "output_e3nn_0_3_3")]:
        model = load_nvidia(sd, fx["config"], e3nn_version=version).double()
        assert rel_error(run(model, fx), fx[key]) < 1e-6
