"""The ``peers`` suite (se3t against lucidrains' se3-transformer-pytorch): the dense conversion is exact, the output
files are complete and well-formed, and a peer cell that fails is recorded rather than dropped. Nothing is timed."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from benchmarks import peers
from benchmarks.cli import main
from benchmarks.data import synthetic_molecule_batches
from benchmarks.runner import STATUSES
from benchmarks.suite import CELL_KEYS, SCHEMA

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HAS_PEER = importlib.util.find_spec("se3_transformer_pytorch") is not None


def needs_peer(test):
    """Skips without the peer package, except where ``SE3T_REQUIRE`` promises it (``peers``: then it fails)."""
    skip = pytest.mark.skipif(not HAS_PEER, reason="se3-transformer-pytorch is not installed (extra 'peers')")
    return pytest.mark.peers(skip(test))


TINY = ["peers", "--quick", "--no-isolate", "--threads", "1", "--data", "synthetic", "--num-batches", "1",
        "--repeats", "2", "--warmup", "1", "--peer-depth", "1"]


@pytest.fixture
def _restore_threads():
    threads = torch.get_num_threads()  # --threads sets them in this process (--no-isolate)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def _one_thread(_restore_threads):
    torch.set_num_threads(1)  # tiny ops: threads only add waits (and stall on a busy machine)


def _table_rows(md: str) -> list:
    return [line for line in md.splitlines() if line.startswith("| se3t ") or line.startswith(f"| {peers.PEER_MODEL} ")]


# ---------------------------------------------------------------------------------------------- to_dense
def test_to_dense_reproduces_the_padded_batch_exactly():
    batches, _, _ = synthetic_molecule_batches(5, 1, seed=3)
    b = batches[0]
    # a bond without a type (all-zero edge features) stays an edge with token 0
    b["edge_feats"] = b["edge_feats"].clone()
    b["edge_feats"][0] = 0
    d = peers.to_dense(b)
    g, n_real, e_real = b["num_real_graphs"], b["num_real_nodes"], b["num_real_edges"]
    gi = b["graph_index"][:n_real]
    sizes = torch.bincount(gi, minlength=g)
    assert sizes.min() < sizes.max()  # molecules of different sizes: the dense batch has padding slots
    assert d["feats"].shape == (g, int(sizes.max()), b["node_feats"].shape[1])
    assert d["coors"].shape == (g, int(sizes.max()), 3) and d["mask"].shape == (g, int(sizes.max()))
    assert d["adj_mat"].shape == d["edges"].shape == (g, int(sizes.max()), int(sizes.max()))
    assert d["adj_mat"].dtype == torch.bool and d["edges"].dtype == torch.long and d["mask"].dtype == torch.bool

    # node i of molecule m sits in slot (its rank within m): atoms and coordinates bit for bit, the rest padding
    slot_of = {}
    for m in range(g):
        nodes = (gi == m).nonzero().flatten().tolist()
        for s, i in enumerate(nodes):
            slot_of[i] = (m, s)
            assert torch.equal(d["feats"][m, s], b["node_feats"][i])
            assert torch.equal(d["coors"][m, s], b["pos"][i])
        assert d["mask"][m, :len(nodes)].all() and not d["mask"][m, len(nodes):].any()
    pad = ~d["mask"]
    assert not d["feats"][pad].any()
    # padding coordinates: far from every atom and from each other (lucidrains ranks bonded neighbours at distance 0)
    real_pos = b["pos"][:n_real]
    assert torch.cdist(d["coors"][pad], real_pos).min() > 10
    assert all(torch.pdist(d["coors"][m][pad[m]]).min() > 1 for m in range(g) if pad[m].sum() > 1)
    assert not d["adj_mat"][pad].any() and not d["adj_mat"].transpose(1, 2)[pad].any()

    # every real edge src -> dst is adj[m, dst, src] with its bond type + 1; nothing else
    adj = torch.zeros_like(d["adj_mat"])
    tokens = torch.zeros_like(d["edges"])
    for e in range(e_real):
        src, dst = b["edge_index"][:, e].tolist()
        (m, s_src), (m_dst, s_dst) = slot_of[src], slot_of[dst]
        assert m == m_dst
        adj[m, s_dst, s_src] = True
        ef = b["edge_feats"][e]
        tokens[m, s_dst, s_src] = int(ef.argmax()) + 1 if ef.any() else 0
    assert torch.equal(d["adj_mat"], adj) and torch.equal(d["edges"], tokens)
    assert int(d["adj_mat"].sum()) == e_real  # no edge merged or lost, no padding edge (they join padding nodes)
    assert int((d["edges"] > 0).sum()) == e_real - 1
    assert torch.equal(d["y"], b["y"][:g])
    assert d["max_neighbours"] == int(adj.sum(-1).max())
    assert (d["num_real_graphs"], d["num_real_nodes"], d["num_real_edges"]) == (g, n_real, e_real)


@needs_peer
def test_peer_config_matches_the_docstring():
    """The settings the module docstring promises, read off the peer's own modules (not only its arguments)."""
    from se3_transformer_pytorch.se3_transformer_pytorch import AttentionSE3, FeedForwardBlockSE3

    depth = 2
    se3t_cfg, cfg = peers.se3t_config(depth), peers.peer_config(depth, 4)
    assert se3t_cfg["num_layers"] == depth + 1 and cfg["depth"] == depth
    model = peers._PeerModel(cfg)
    attn = [m for m in model.modules() if isinstance(m, AttentionSE3)]
    assert len(attn) == depth and sum(isinstance(m, FeedForwardBlockSE3) for m in model.modules()) == depth
    for a in attn:  # 8 heads x 2 = 16 key/value channels per degree = se3t's 32 channels / channels_div 2
        assert a.heads == se3t_cfg["num_heads"] == 8
        hidden = {int(k): w.shape[1] for k, w in a.to_q.weights.items()}
        assert hidden == {d: se3t_cfg["num_channels"] // se3t_cfg["channels_div"] for d in range(4)}
    assert dict(model.net.conv_in.fiber_out.structure) == {d: 32 for d in range(se3t_cfg["num_degrees"])}
    assert dict(model.net.conv_out.fiber_out.structure) == se3t_cfg["fiber_out"] == {0: 32}
    assert model.net.edge_emb.num_embeddings == 5 and model.net.edge_emb.embedding_dim == se3t_cfg["fiber_edge"][0]


@needs_peer
def test_peer_attends_exactly_the_bonded_neighbours(_one_thread):
    batches, _, _ = synthetic_molecule_batches(3, 1, seed=1)
    d = peers.to_dense(batches[0])
    torch.manual_seed(0)
    model = peers._PeerModel(peers.peer_config(1, d["max_neighbours"]))
    seen = {}

    def keep_edge_info(module, args):  # conv_in(features, edge_info, ...): the neighbourhood every layer uses
        seen["edge_info"] = args[1]

    model.net.conv_in.register_forward_pre_hook(keep_edge_info)
    with torch.no_grad():
        out = model(**{k: d[k] for k in ("feats", "coors", "mask", "adj_mat", "edges")})
    assert out.shape == (3,) and torch.isfinite(out).all()
    idx, valid, edges = seen["edge_info"]
    found = torch.zeros_like(d["adj_mat"])
    mol = torch.arange(idx.shape[0])[:, None, None].expand_as(idx)
    node = torch.arange(idx.shape[1])[None, :, None].expand_as(idx)
    found[mol[valid], node[valid], idx[valid]] = True
    assert torch.equal(found, d["adj_mat"])
    assert edges.shape[-1] == 4  # embedded bond tokens reach the radial MLPs


# ---------------------------------------------------------------------------------------------- the suite
@pytest.fixture(scope="module")
def peers_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("peers")
    threads = torch.get_num_threads()
    try:
        assert main([*TINY, "--batch-sizes", "1,2", "--out", str(out), "--name", "peers"]) == 0
    finally:
        torch.set_num_threads(threads)
    return out, json.loads((out / "peers.json").read_text())


def test_peers_suite_writes_complete_outputs(peers_run):
    out, result = peers_run
    assert result["schema"] == SCHEMA and result["suite"] == "peers"
    for key in ("created", "command", "machine", "versions", "settings", "cells", "outputs"):
        assert key in result, key
    assert result["settings"]["se3t_config"] == json.loads(json.dumps(peers.se3t_config(1)))
    assert result["settings"]["peer_depth"] == 1 and result["settings"]["batch_sizes"] == [1, 2]
    cells = result["cells"]
    # per batch size and mode: se3t, then the peer
    assert [(c["model"], c["batch_size"], c["mode"]) for c in cells] == [
        (model, bs, mode) for bs in (1, 2) for mode in ("train", "infer") for model in ("se3t", peers.PEER_MODEL)]
    for c in cells:
        assert all(k in c for k in CELL_KEYS) and c["status"] in STATUSES and c["suite"] == "peers"
        if c["model"] == peers.PEER_MODEL and not HAS_PEER:
            assert c["status"] == "unsupported" and "not installed" in c["reason"]
            continue
        assert c["status"] == "ok", c.get("reason")
        lat = c["latency_s"]
        assert 0 < lat["min"] <= lat["median"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert lat["n"] == c["repeats_run"] == 2
        assert c["throughput"]["unit"] == "mol/s" and c["throughput"]["value"] > 0
        assert c["items_per_step"] == c["batch_size"] and c["nodes_per_step"] > c["batch_size"]
        assert c["memory"]["peak_bytes"] > 0 and c["memory"]["growth_bytes"] >= 0
        assert c["num_parameters"] > 0
    md = (out / "peers.md").read_text()
    assert md.startswith("# se3t benchmarks: `peers` suite")
    assert len(_table_rows(md)) == sum(c["status"] != "unsupported" for c in cells)
    assert all(" ok | " in row for row in _table_rows(md))
    assert sorted(result["outputs"]["plots"]) == ["peers-memory.png", "peers-throughput.png"]
    for name in result["outputs"]["plots"]:
        path = out / name
        assert path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


@needs_peer
def test_peers_suite_measures_lucidrains(peers_run):
    _, result = peers_run
    peer = [c for c in result["cells"] if c["model"] == peers.PEER_MODEL]
    assert len(peer) == 4 and all(c["status"] == "ok" for c in peer), [c.get("reason") for c in peer]
    assert all(c["throughput"]["value"] > 0 and c["latency_s"]["median"] > 0 for c in peer)
    se3t_params = {c["batch_size"]: c["num_parameters"] for c in result["cells"] if c["model"] == "se3t"}
    for c in peer:
        assert c["peer_config"] == peers.peer_config(1, c["peer_config"]["max_sparse_neighbors"])
        assert c["num_parameters"] > se3t_params[c["batch_size"]]  # lucidrains' per-pair radial MLPs and FFNs
    assert result["versions"]["se3_transformer_pytorch"]


def test_failed_peer_cell_is_recorded_not_dropped(tmp_path, monkeypatch, _restore_threads):
    """An out-of-memory peer cell (here raised on purpose) keeps its row, status and reason; the outputs stay
    complete. (Isolated cells get the same treatment from the runner for kills, limits and time-outs.)"""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "se3_transformer_pytorch" else real(name, *a))

    def out_of_memory(**kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 123 bytes")

    monkeypatch.setattr(peers, "lucidrains_cell", out_of_memory)
    assert main([*TINY, "--batch-sizes", "2", "--modes", "infer", "--no-plots", "--out", str(tmp_path),
                 "--name", "fail"]) == 0
    result = json.loads((tmp_path / "fail.json").read_text())
    assert [(c["model"], c["status"]) for c in result["cells"]] == [("se3t", "ok"), (peers.PEER_MODEL, "oom")]
    assert "can't allocate memory" in result["cells"][1]["reason"]
    rows = _table_rows((tmp_path / "fail.md").read_text())
    assert len(rows) == 2 and "oom (note 1)" in rows[1]
