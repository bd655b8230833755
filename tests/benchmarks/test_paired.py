"""``python -m benchmarks.paired``: variants' steps interleaved in one process, ratios per round."""
from __future__ import annotations

import json

import pytest

from benchmarks.paired import Variant, interleaved_times, main, parse_variant, ratio_summary


def test_parse_variant_reads_flags_and_rejects_what_cannot_run():
    assert parse_variant("default") == Variant("default")
    assert parse_variant("low+oib+seg=3") == Variant("low+oib+seg=3", low_memory=True, segment=3,
                                                     optimizer_in_backward=True)
    assert parse_variant(" infer ") == Variant("infer", infer=True)
    assert parse_variant("infer+cache") == Variant("infer+cache", infer=True, cache=True)
    assert parse_variant("forces+wgrad") == Variant("forces+wgrad", forces=True, weight_gradient=True)
    assert parse_variant("forces+level=full") == Variant("forces+level=full", forces=True, level="FULL")
    assert parse_variant("ftrain+low") == Variant("ftrain+low", force_training=True, low_memory=True)
    assert parse_variant("forces+nokeep") == Variant("forces+nokeep", forces=True, no_kept_layouts=True)
    assert parse_variant("infer+densemaps+copies") == Variant("infer+densemaps+copies", infer=True, dense_maps=True,
                                                              layout_copies=True)
    assert parse_variant("ftrain+unchunked") == Variant("ftrain+unchunked", force_training=True, unchunked=True,
                                                        reference_double=True)
    assert parse_variant("ftrain+refdouble") == Variant("ftrain+refdouble", force_training=True,
                                                        reference_double=True)
    for bad, words in (("fast", "unknown flag 'fast'"), ("seg=2", "add 'low'"), ("low+seg=0", "positive integer"),
                       ("low+seg=x", "positive integer"), ("infer+low", "would change nothing"),
                       ("forces+oib", "would change nothing"), ("infer+forces", "choose one"),
                       ("+", "empty variant"), ("cache", "'infer' and 'forces' only"), ("wgrad", "'forces' only"),
                       ("level=fast", "names no fusion level"), ("ftrain+forces", "training step of its own"),
                       ("ftrain+oib", "training step of its own"),
                       ("forces+unchunked", "'ftrain' only"), ("infer+refdouble", "'ftrain' only")):
        with pytest.raises(ValueError, match=words):
            parse_variant(bad)


def test_interleaved_times_alternate_the_order_and_skip_the_warmup():
    calls, now = [], [0.0]

    def step(v):
        def run(r):
            calls.append((v, r))
            now[0] += 1.0 + v  # variant v takes 1 + v "seconds"
        return run

    times = interleaved_times([step(0), step(1), step(2)], rounds=3, warmup=1, clock=lambda: now[0])
    assert calls == [(2, -1), (1, -1), (0, -1),            # warm-up round -1: reversed (odd)
                     (0, 0), (1, 0), (2, 0), (2, 1), (1, 1), (0, 1), (0, 2), (1, 2), (2, 2)]
    assert times == [[1.0] * 3, [2.0] * 3, [3.0] * 3]
    with pytest.raises(ValueError, match="rounds"):
        interleaved_times([step(0)], rounds=0)


def test_ratio_summary_takes_per_round_ratios_and_a_seeded_interval():
    base = [1.0, 2.0, 4.0, 1.5]
    exact = ratio_summary([2 * b for b in base], base)
    assert exact["median"] == exact["min"] == exact["max"] == exact["interval_low"] == exact["interval_high"] == 2.0
    # a slow machine minute hits both variants of a round: per-round ratios stay put where pooled medians would not
    noisy = [1.4, 3.0, 5.2, 2.1]
    s = ratio_summary(noisy, base)
    ratios = sorted(t / b for t, b in zip(noisy, base))
    assert s["min"] == ratios[0] and s["max"] == ratios[-1]
    assert s["median"] == pytest.approx((ratios[1] + ratios[2]) / 2)
    assert ratios[0] <= s["interval_low"] <= s["median"] <= s["interval_high"] <= ratios[-1]
    assert ratio_summary(noisy, base) == s  # seeded
    with pytest.raises(ValueError, match="same non-zero number of rounds"):
        ratio_summary([1.0], [1.0, 2.0])


def test_paired_run_writes_json_and_markdown(tmp_path, capsys):
    result = main(["--model", "tiny", "--batch-size", "3", "--num-batches", "2", "--rounds", "2",
                   "--variants", "default,low+oib+seg=1,infer,infer+cache,forces,forces+wgrad,ftrain+level=full+nokeep,"
                   "infer+densemaps+copies", "--out", str(tmp_path), "--name", "t"])
    saved = json.loads((tmp_path / "t.json").read_text())
    assert [v["name"] for v in saved["variants"]] == ["default", "low+oib+seg=1", "infer", "infer+cache", "forces",
                                                      "forces+wgrad", "ftrain+level=full+nokeep",
                                                      "infer+densemaps+copies"]
    base, low, infer, cached, forces, wgrad, ftrain, reference_maps = saved["variants"]
    assert base["ratio"]["median"] == 1.0 and base["live_peak_ratio"] == 1.0
    for v in saved["variants"]:
        assert len(v["seconds"]) == 2 and all(t > 0 for t in v["seconds"]) and v["live_peak_bytes"] > 0
        assert v["ratio"]["min"] <= v["ratio"]["median"] <= v["ratio"]["max"]
    # inference keeps no activations for backward: far fewer live bytes than a training step
    assert infer["live_peak_bytes"] < base["live_peak_bytes"]
    # the kept layouts were made in the warm-up, before the profiled step: it cannot peak higher
    assert cached["live_peak_bytes"] <= infer["live_peak_bytes"] and cached["variant"]["cache"]
    from se3t.nn import fused
    assert len(fused._weight_layouts) == 0 and not fused._cache_scopes  # released when the run ended
    assert low["variant"]["segment"] == 1 and low["variant"]["optimizer_in_backward"]
    text = (tmp_path / "t.md").read_text()
    assert text == capsys.readouterr().out.rstrip("\n") + "\n"
    assert forces["variant"]["forces"] and wgrad["variant"]["weight_gradient"]
    from se3t.nn import fused as fused_module
    assert fused_module.SKIP_UNUSED_WEIGHT_GRADIENT  # restored after the 'wgrad' steps
    assert fused_module.KEEP_LAYOUTS_MAX_EDGES > 0 and ftrain["variant"]["no_kept_layouts"]
    from se3t.nn import edge_frame_conv
    assert edge_frame_conv.SPARSE_MAPS and fused_module.LAYOUT_COPY_MIN_EDGES > 0  # restored after their steps
    assert reference_maps["variant"]["dense_maps"] and reference_maps["variant"]["layout_copies"]
    # a loss on forces keeps the first backward's graph for the second: more than a plain training step
    assert ftrain["variant"]["level"] == "FULL" and ftrain["live_peak_bytes"] > base["live_peak_bytes"]
    assert text.count("\n| `") == 8 and "| `low+oib+seg=1` |" in text
    assert result["variants"][3]["name"] == "infer+cache"


def test_paired_needs_a_baseline_and_another_variant():
    with pytest.raises(SystemExit):
        main(["--model", "tiny", "--variants", "default,bogus"])
    from benchmarks.paired import paired
    with pytest.raises(ValueError, match="at least two variants"):
        paired([Variant("default")], [])


def test_peak_change_names_the_direction():
    from benchmarks.paired import _peak_change
    assert _peak_change(0.25) == "4.00x lower" and _peak_change(4.0) == "4.00x higher"
    assert _peak_change(1.0) == "1.00x higher"
