"""What eval.py and export.py --int8 leave behind: the int8 weights' file mode, the table's
header and row order, and the figures' titles, tick labels, limits and series styles."""

import os

import numpy as np
import pytest

from qtx import quant
from qtx.evaluate import figures
from qtx.evaluate import integer as int_models
from qtx.models import model_config
from qtx.quant.convert import IntegerReport
from qtx.run import evaluate as runner


@pytest.fixture
def umask_027():
    """A umask that differs from safetensors' 0600 and from the usual 022."""
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


def test_int8_weights_follow_the_umask_like_the_config(tmp_path, umask_027):
    variables = {"params": {"dense": {"kernel": np.ones((2, 3), np.float32)}}}
    report = IntegerReport([], {}, weights=0, weight_bytes=24, float_weight_bytes=24)
    cfg = model_config("opt-tiny")
    int_models.save(str(tmp_path), cfg, quant.QuantPlan(), variables, report)
    mode = lambda name: (tmp_path / name).stat().st_mode & 0o777  # noqa: E731
    assert mode(int_models.WEIGHTS_FILE) == 0o666 & ~umask_027 == 0o640
    assert mode(int_models.WEIGHTS_FILE) == mode(int_models.CONFIG_FILE)


def test_process_umask_reads_without_changing_it(umask_027):
    assert int_models.process_umask() == 0o027
    assert os.umask(0o027) == 0o027


def results_with_integer_models(workdir=None):
    figs = [] if workdir is None else [f"{workdir}/outliers.png", f"{workdir}/attention_mass.png"]
    return {
        "step": 200,
        "fp": {"perplexity": 51.23, "max_inf_norm": 2.41, "avg_kurtosis": 3.7, "per_layer": {}},
        "quantized": {
            "W8A8": {
                "perplexity": 52.1,
                "calibration_seconds": 1.23,
                "integer": {"perplexity": 52.11},
            },
            "W6A6": {
                "perplexity": 60.5,
                "calibration_seconds": 0.9,
                "integer": {"perplexity": 60.7},
            },
        },
        **({"figures": figs} if figs else {}),
    }


def test_table_header_names_the_workdir_step_and_written_files():
    table = runner.format_table(results_with_integer_models("runs/opt"), "perplexity", "runs/opt")
    lines = table.splitlines()
    assert lines[0] == (
        "eval of runs/opt at step 200 (eval.json, outliers.png, attention_mass.png written there)"
    )
    assert lines[1].split() == ["setup", "perplexity", "max", "inf", "norm", "avg", "kurtosis"] + [
        "calibration",
        "s",
    ]
    assert set(lines[2]) <= {"-", " "}
    assert not any(line.strip() == "step 200" for line in lines)


def test_table_header_without_figures_and_for_a_hf_checkpoint():
    results = results_with_integer_models()
    results["variation"] = {"json": "w/variation.json", "png": "w/variation.png"}
    header = runner.format_table(results, "perplexity", "w").splitlines()[0]
    assert (
        header == "eval of w at step 200 (eval.json, variation.json, variation.png written there)"
    )
    header = runner.format_table(results, "perplexity", "w", "/hf/minilm").splitlines()[0]
    assert header.startswith("eval of Hugging Face checkpoint /hf/minilm (eval.json")
    assert header.endswith("written to w)")


def test_integer_rows_sit_under_their_setups():
    table = runner.format_table(results_with_integer_models(), "perplexity")
    assert table.splitlines()[0] == "eval at step 200"
    rows = [line.split()[:3] for line in table.splitlines()[3:]]
    assert rows == [
        ["FP", "51.23", "2.41"],
        ["W8A8", "52.1", "1.2"],
        ["W8A8", "int8", "52.11"],
        ["W6A6", "60.5", "0.9"],
        ["W6A6", "int8", "60.7"],
    ]
    lines = table.splitlines()
    assert all(line == line.rstrip() for line in lines)


TENSORS = ("attn/out", "attn_ln/out", "ffn/out", "ffn_ln/out", "residual_ffn")


def per_layer(spread=1.0, layers=3, final=2.6):
    """Close, overlapping values over a narrow range (``spread`` 1: factor < 2) and the final
    LayerNorm above every layer."""
    out = {
        f"layer_{i}/{t}": {"inf_norm": 2.0 + spread * (0.1 * i + 0.05 * j), "kurtosis": 3.0 + i}
        for i in range(layers)
        for j, t in enumerate(TENSORS)
    }
    out["layer_0/ffn/out"] = dict(out["layer_0/attn/out"])  # two curves on the same point
    out["final_ln/out"] = {"inf_norm": final, "kurtosis": 3.1}
    return out


def tick_labels(ax):
    ax.figure.canvas.draw()
    major = [t.get_text() for t in ax.get_yticklabels()]
    minor = [t.get_text() for t in ax.get_yticklabels(minor=True)]
    return major, minor


def data_of(ax):
    return np.concatenate([line.get_ydata() for line in ax.get_lines()]).astype(float)


@pytest.mark.parametrize("spread", [1.0, 400.0, 1e5])  # linear, 1-2-5 log and decade log
def test_outlier_figure_titles_ticks_limits_and_styles(tmp_path, spread):
    data = per_layer(spread, final=2.6 * spread)
    path = tmp_path / "outliers.png"
    fig = figures.plot_outliers(
        data, str(path), workdir="runs/opt125m_gated_tiny/", step=200, family="opt"
    )
    assert path.stat().st_size > 1000
    title = fig._suptitle.get_text()
    assert "opt125m_gated_tiny" in title and "step 200" in title and "opt" in title
    for ax in fig.axes:
        ys = data_of(ax)
        lo, hi = ax.get_ylim()
        assert lo < ys.min() and ys.max() < hi
        major, minor = tick_labels(ax)
        labels = [t for t in major + minor if t]
        assert labels and not any("10^" in t or "times" in t or "×" in t for t in labels)
        ticks = [t for t in ax.get_yticks() if lo <= t <= hi]
        assert max(ticks) >= ys.max() * (1 - 1e-9)  # no curve above the top tick
        styles = [(line.get_marker(), line.get_linestyle()) for line in ax.get_lines()]
        assert len(styles) == len(TENSORS) + 1 == len(set(styles))
        assert [t.get_text() for t in ax.get_xticklabels()][-1] == "final"
    inf_axis, kurtosis_axis = fig.axes[:2]
    assert inf_axis.get_yscale() == ("linear" if spread == 1.0 else "log")
    assert kurtosis_axis.get_yscale() == "linear"  # 3 to 5: a factor < 10
    assert "max |x| per sequence,\nmean over sequences" in inf_axis.get_ylabel()
    # the table's max inf norm is the figure's largest inf norm (here the final LayerNorm)
    assert (
        inf_axis.get_title()
        == f"max inf norm = highest point = {2.6 * spread:.4g} (final_ln/out at final)"
    )


def test_outlier_figure_of_one_value_of_zeros_and_of_a_diverged_tensor(tmp_path):
    flat = {"layer_0/ffn/out": {"inf_norm": 5.0, "kurtosis": 0.0}}
    fig = figures.plot_outliers(flat, str(tmp_path / "o.png"))
    for ax in fig.axes:
        lo, hi = ax.get_ylim()
        assert lo < data_of(ax).min() <= data_of(ax).max() < hi
    assert fig._suptitle.get_text() == "outliers per layer"
    flat["layer_1/ffn/out"] = {"inf_norm": float("inf"), "kurtosis": float("nan")}
    fig = figures.plot_outliers(flat, str(tmp_path / "o.png"))
    assert fig.axes[0].get_title().startswith("max inf norm = highest point = 5 ")


def test_attention_mass_title_names_the_run(tmp_path):
    mass = np.random.default_rng(0).uniform(size=(2, 4))
    fig = figures.plot_attention_mass(
        mass, str(tmp_path / "a.png"), "attention on special tokens", workdir="w/vit", step=7
    )
    assert fig.axes[0].get_title() == "attention on special tokens\nvit at step 7"


def test_run_title():
    assert figures.run_title("x", "runs/bert_tiny", 3, "bert") == "x: bert_tiny (bert) at step 3"
    assert figures.run_title("x", None, 0) == "x: step 0"
    assert figures.run_title("x") == "x"
