"""Decoder outlier metrics (qtx.evaluate.decoder_outliers): the jitted per-batch reductions
against NumPy on the model's own layer outputs and attention probabilities (left padding
included), their figure, and eval.json of a tiny OPT run."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_cli import parse
from tiny_runs import ONE_LAYER_OPT

from qtx.evaluate import figures
from qtx.evaluate.decoder_outliers import (
    COLLECTION,
    DecoderOutlierAccumulator,
    with_decoder_statistics,
)
from qtx.models import build, dummy_inputs, model_config
from qtx.nn import ATTENTION

FAMILIES = ["opt-tiny", "llama-tiny"]


def batches(vocab, seed=0):
    """Two batches (B=3, T=12): left padding, a one-token sequence, and an unpadded row."""
    rng = np.random.default_rng(seed)
    out = []
    for pads in ((4, 0, 11), (2, 7, 0)):
        ids = rng.integers(3, vocab, (3, 12))
        mask = np.ones((3, 12), np.int32)
        for row, p in enumerate(pads):
            mask[row, :p] = 0
            ids[row, :p] = 1  # pad id
        out.append((jnp.asarray(ids), jnp.asarray(mask)))
    return out


def reference(layer_outputs, probs, masks):
    """NumPy per-layer statistics of layer outputs [(B, T, D)] and probabilities
    [(B, H, T, S)] per batch, lists over batches."""
    seq_max, seq_pos, seq_ch = [], [], []
    first_sum = top_sum = counts = 0.0
    queries = 0
    for x, p, m in zip(layer_outputs, probs, masks, strict=True):
        x, p, m = np.asarray(x, np.float64), np.asarray(p, np.float64), np.asarray(m, bool)
        for b in range(x.shape[0]):
            real = np.flatnonzero(m[b])
            a = np.abs(x[b, real])  # (n, D), real tokens in order
            t, d = np.unravel_index(np.argmax(a), a.shape)
            seq_max.append(a.max())
            seq_pos.append(t)  # index among the real tokens = position id
            seq_ch.append(d)
            f = real[0]
            for t in real[1:]:  # every real query but the first real token
                row = p[b, :, t, real]  # (n keys, H) after fancy indexing
                first_sum = first_sum + p[b, :, t, f]
                top_sum = top_sum + row.max(axis=0)
                c = np.zeros((p.shape[1], p.shape[3]))
                c[np.arange(p.shape[1]), np.argmax(row, axis=0)] = 1  # relative key position
                counts = counts + c
                queries += 1
    seq_max = np.asarray(seq_max)
    j = int(np.argmax(seq_max))
    return {
        "max_activation": seq_max[j],
        "max_position": seq_pos[j],
        "max_channel": seq_ch[j],
        "median_sequence_max": np.median(seq_max),
        "first_token_mass_per_head": first_sum / queries,
        "top_key_mass_per_head": top_sum / queries,
        "top_key_position_per_head": np.argmax(counts, axis=1),
        "queries": queries,
        "sequences": len(seq_max),
    }


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("scan", [False, True])
def test_decoder_statistics_match_numpy(name, scan):
    cfg = model_config(name, scan_layers=scan)
    model = build(cfg)
    variables = model.init(jax.random.key(0), **dummy_inputs(cfg))
    # larger weights: distinct maxima and peaked attention
    variables = jax.tree.map(lambda a: a * 4.0 if a.ndim == 2 else a, variables)
    step = jax.jit(
        lambda v, ids, m: with_decoder_statistics(model).apply(v, ids, m, mutable=["intermediates"])
    )
    own = jax.jit(
        lambda v, ids, m: model.apply(
            v,
            ids,
            m,
            output_hidden_states=True,
            mutable=[ATTENTION, "intermediates"],
            capture_intermediates=lambda mdl, method: (
                mdl.name == "residual_ffn" and method == "__call__"
            ),
        )
    )
    acc = DecoderOutlierAccumulator()
    outs = {i: [] for i in range(cfg.num_layers)}
    probs = {i: [] for i in range(cfg.num_layers)}
    masks = []
    for ids, mask in batches(cfg.vocab_size):
        _, coll = step(variables, ids, mask)
        assert ATTENTION not in coll  # no probabilities leave the step
        acc.update(jax.device_get(coll[COLLECTION]))
        out, got = own(variables, ids, mask)
        inter = got["intermediates"]
        for i in range(cfg.num_layers):
            x = np.asarray(inter[f"layer_{i}"]["residual_ffn"]["__call__"][0])
            if i + 1 < cfg.num_layers:  # the layer output is the next hidden state
                np.testing.assert_allclose(x, out["hidden_states"][i + 1], rtol=1e-6)
            outs[i].append(x)
            probs[i].append(np.asarray(got[ATTENTION][f"layer_{i}"]["attn"]["probs"][0]))
        masks.append(mask)
    summary = acc.summary()
    assert [r["layer"] for r in summary["per_layer"]] == list(range(cfg.num_layers))
    for i, row in enumerate(summary["per_layer"]):
        want = reference(outs[i], probs[i], masks)
        assert row["queries"] == want["queries"] == 7 + 11 + 9 + 4 + 11
        assert row["sequences"] == want["sequences"] == 6
        for key in ("max_activation", "median_sequence_max"):
            assert row[key] == pytest.approx(want[key], rel=1e-5), key
        for key in ("max_position", "max_channel"):
            assert row[key] == want[key], key
        for key in ("first_token_mass_per_head", "top_key_mass_per_head"):
            np.testing.assert_allclose(row[key], want[key], rtol=1e-4, atol=1e-6)
        assert row["top_key_position_per_head"] == list(want["top_key_position_per_head"])
    per_head = [row["first_token_mass_per_head"] for row in summary["per_layer"]]
    assert summary["first_token_mass"] == pytest.approx(np.mean(per_head), rel=1e-9)
    top = max(summary["per_layer"], key=lambda r: r["max_activation"])
    assert summary["max_activation"] == top["max_activation"]
    assert summary["max_activation_layer"] == top["layer"]


def test_padding_rows_of_the_last_batch_are_left_out():
    """``weights`` 0 (a padding row) and rows without real tokens add no sequence."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5, 4)), jnp.float32)
    from qtx.evaluate.decoder_outliers import residual_statistics

    mask = jnp.asarray([[1] * 5, [0] * 5, [1] * 5])
    stats = residual_statistics(x, mask)
    tree = {"layer_0": {"residual_ffn": {k: (v,) for k, v in stats.items()}}}
    acc = DecoderOutlierAccumulator()
    acc.update(tree, weights=np.asarray([1.0, 1.0, 0.0]))
    row = acc.summary()["per_layer"][0]
    assert row["sequences"] == 1
    assert row["max_activation"] == pytest.approx(float(jnp.abs(x[0]).max()))


def summary_of(maxima, masses):
    rows = [
        {
            "layer": i,
            "max_activation": m,
            "median_sequence_max": m / 2,
            "first_token_mass": f,
            "top_key_mass": min(1.0, f + 0.1),
        }
        for i, (m, f) in enumerate(zip(maxima, masses, strict=True))
    ]
    top = int(np.argmax(maxima))
    return {
        "per_layer": rows,
        "max_activation": maxima[top],
        "max_activation_layer": top,
        "max_activation_position": 0,
        "max_activation_channel": 7,
        "first_token_mass": float(np.mean(masses)),
    }


@pytest.mark.parametrize("maxima", [[3.0, 4.0, 5.5], [2.0, 40.0, 900.0]])
def test_decoder_figure_titles_and_limits(tmp_path, maxima):
    path = tmp_path / "decoder_outliers.png"
    summary = summary_of(maxima, [0.2, 0.6, 0.9])
    fig = figures.plot_decoder_outliers(
        summary, str(path), workdir="runs/llama_tiny/", step=30, family="llama"
    )
    assert path.stat().st_size > 1000
    title = fig._suptitle.get_text()
    assert "llama_tiny" in title and "step 30" in title and "(llama)" in title
    act, mass = fig.axes[:2]
    for ax in (act, mass):
        ys = np.concatenate([line.get_ydata() for line in ax.get_lines()]).astype(float)
        lo, hi = ax.get_ylim()
        assert lo < ys.min() and ys.max() < hi
    # log only where the values span a factor of 10 (medians are half the maxima)
    assert act.get_yscale() == ("log" if maxima[-1] / (maxima[0] / 2) >= 10 else "linear")
    assert mass.get_yscale() == "linear"
    assert act.get_title().startswith(f"max |x| = {max(maxima):.4g} (layer 2")


@pytest.mark.slow
def test_eval_json_of_a_tiny_opt_run_has_decoder_outliers(tmp_path, capsys):
    from qtx.run.evaluate import evaluate
    from qtx.run.train import train

    config = parse(
        "configs/opt125m_gated.py:tiny",
        *ONE_LAYER_OPT,
        "--config.eval.max_batches=2",
        "--config.eval.calib_batches=1",
        "--config.eval.calib_batch_size=8",
        "--config.eval.setups=('w4a16',)",
    )
    train(config, str(tmp_path), devices=jax.devices()[:1])
    results = evaluate(config, str(tmp_path))
    saved = json.loads((tmp_path / "eval.json").read_text())
    dec = saved["fp"]["decoder_outliers"]
    assert dec == json.loads(json.dumps(results["fp"]["decoder_outliers"]))
    assert len(dec["per_layer"]) == 1 and dec["sequences"] == 16  # 2 batches of 8
    assert dec["max_activation"] > 0 and 0 < dec["first_token_mass"] <= 1
    assert dec["max_activation"] == dec["per_layer"][0]["max_activation"]
    assert (tmp_path / "decoder_outliers.png").stat().st_size > 1000
    assert "decoder_outliers.png" in os.path.basename(results["figures"][1])
    out = capsys.readouterr().out
    assert "FP decoder outliers: max |x|" in out
    assert saved["quantized"]["w4a16"]["points"]["unused_rules"] == []
