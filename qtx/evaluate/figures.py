"""PNG figures: outlier statistics per layer, and the "no-op" attention mass per head.

* ``outliers.png``: the inf norm (max |x| of a sequence) and the kurtosis of every tracked
  tensor, each a mean over the eval sequences, per layer (the final LayerNorm at "final"), one
  line per tensor type (``ffn/out``, ``residual_ffn``, ...); the table's max inf norm is the
  largest inf norm of the figure. A log axis only where the values span a factor of 10.
* ``attention_mass.png``: for each layer and head, the mean over real query tokens of the
  probability mass on special / delimiter tokens ([CLS], [SEP], '.', ',', </s>) and on the
  first token of the sequence: the heads that learned to "do nothing".
* ``decoder_outliers.png`` (causal decoders): per layer, the largest |x| of the residual
  stream and the attention mass on the first token and on the largest-mass key (see
  ``qtx.evaluate.decoder_outliers``).
"""

from __future__ import annotations

import math
import os
import re

import numpy as np
from flax.traverse_util import flatten_dict

from qtx.models.family import family_record


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def block_of(name: str) -> tuple[int, int] | None:
    """``(stage, layer)`` of a point name (``layer_3/...``: stage 0; Swin's
    ``stage_1/layer_0/...``), or None outside the layers."""
    m = re.match(r"(?:stage_(\d+)/)?layer_(\d+)/", name)
    return (int(m.group(1) or 0), int(m.group(2))) if m else None


def run_title(
    what: str, workdir: str | None = None, step=None, family: str = "", sep: str = ": "
) -> str:
    """``"<what>: <run> (<family>) at step <step>"``, the run named by its workdir's name (by
    default ``runs/<config>``); the parts not given are left out."""
    run = os.path.basename(os.path.normpath(workdir)) if workdir else ""
    where = " ".join(p for p in (run, f"({family})" if family else "") if p)
    if step is not None:
        where = f"{where} at step {step}" if where else f"step {step}"
    return f"{what}{sep}{where}" if where else what


def _plain(value, _pos=None) -> str:
    """A tick label in plain numbers (``0.5``, ``20``, ``1e+04``)."""
    return f"{value:g}"


def _enclosing_ticks(lo: float, hi: float, log: bool) -> list[float]:
    """Round tick values from the largest one <= ``lo`` to the smallest one >= ``hi``. Log:
    1-2-5 steps per decade over up to three decades, else the decades between the 1-2-5
    values that enclose the data; linear: a step of 1, 2, 2.5 or 5 times a power of ten."""
    from matplotlib.ticker import MaxNLocator

    slack = 1e-9 * max(abs(lo), abs(hi))  # rounding in the tick values
    if log:
        first, last = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        grid = [m * 10.0**e for e in range(first, last + 1) for m in (1.0, 2.0, 5.0)]
        bottom = max(t for t in grid if t <= lo + slack)
        top = min(t for t in grid if t >= hi - slack)
        if last - first <= 3:
            return [t for t in grid if bottom <= t <= top]
        decades = [10.0**e for e in range(first, last + 1) if bottom < 10.0**e < top]
        return [bottom, *decades, top]
    ticks = [float(t) for t in MaxNLocator(6, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi)]
    bottom = max(t for t in ticks if t <= lo + slack)
    top = min(t for t in ticks if t >= hi - slack)
    return [t for t in ticks if bottom <= t <= top]


def fit_y_axis(ax, values) -> None:
    """Shows every value of ``values`` under the top tick: a log axis when they are positive
    and span a factor of 10 or more, else a linear one; ticks in plain numbers, the limits
    just outside the enclosing round ticks."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    lo, hi = float(min(values)), float(max(values))
    log = lo > 0 and hi / lo >= 10
    if not log and hi - lo <= 1e-9 * max(abs(hi), 1.0):  # one value: a band around it
        pad = 0.05 * abs(hi) or 1.0
        lo, hi = lo - pad, hi + pad
    ticks = _enclosing_ticks(lo, hi, log)
    if log:
        ax.set_yscale("log")
        margin = (ticks[-1] / ticks[0]) ** 0.03
        ax.set_ylim(ticks[0] / margin, ticks[-1] * margin)
    else:
        margin = 0.03 * (ticks[-1] - ticks[0])
        ax.set_ylim(ticks[0] - margin, ticks[-1] + margin)
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_major_formatter(FuncFormatter(_plain))
    ax.yaxis.set_minor_formatter(NullFormatter())


# one (marker, line style) per series: 7 markers x 4 styles give 28 distinct pairs
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
LINESTYLES = ("-", "--", "-.", ":")
FINAL = "final"  # the x position of the tensors after the last layer (final_ln/out)
PANELS = {
    "inf_norm": ("inf norm: max |x| per sequence,\nmean over sequences", "max inf norm"),
    "kurtosis": ("kurtosis per sequence,\nmean over sequences", None),
}


def series_style(index: int) -> dict:
    """The (hollow) marker and line style of the ``index``-th series, distinct for 28 series;
    hollow markers of different shapes stay visible on the same point."""
    return {
        "marker": MARKERS[index % len(MARKERS)],
        "linestyle": LINESTYLES[index % len(LINESTYLES)],
        "markerfacecolor": "none",
        "markeredgewidth": 1.4,
    }


def plot_outliers(
    per_layer: dict,
    path: str,
    title: str = "",
    *,
    workdir: str | None = None,
    step=None,
    family: str = "",
):
    """Both per-tensor means of ``per_layer`` (``{"layer_3/ffn/out": {"inf_norm",
    "kurtosis"}, "final_ln/out": ...}``) against the layer, tensors after the last layer at
    "final", one series per tensor type; the inf norm panel names its largest value, the
    table's max inf norm. The title names the run of ``workdir`` and ``step``. Returns the
    (closed) figure."""
    series: dict[str, dict[int, dict]] = {}
    blocks = sorted({block_of(n) for n in per_layer} - {None})  # (stage, layer), in order
    for name, vals in per_layer.items():
        key = block_of(name)
        position = blocks.index(key) if key is not None else len(blocks)
        tensor = re.sub(r"^(stage_\d+/)?layer_\d+/", "", name)
        series.setdefault(tensor, {})[position] = vals
    has_final = any(block_of(n) is None for n in per_layer)
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for ax, metric in zip(axes, PANELS, strict=True):
        label, headline = PANELS[metric]
        values = []
        for index, (tensor, by_position) in enumerate(sorted(series.items())):
            xs = sorted(by_position)
            ys = [float(by_position[x][metric]) for x in xs]
            ax.plot(xs, ys, label=tensor, **series_style(index))
            values += [(y, tensor, x) for y, x in zip(ys, xs, strict=True) if math.isfinite(y)]
        ticks = list(range(0, len(blocks), max(1, math.ceil(len(blocks) / 12))))
        ax.set_xticks(ticks + [len(blocks)] * has_final)
        ax.set_xticklabels([str(t) for t in ticks] + [FINAL] * has_final)
        if values:
            fit_y_axis(ax, [v for v, _, _ in values])
        if headline and values:
            top, tensor, x = max(values)
            at = FINAL if x == len(blocks) else f"layer {x}"
            ax.set_title(f"{headline} = highest point = {top:.4g} ({tensor} at {at})", fontsize=9)
        ax.set_xlabel("layer")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.grid(alpha=0.12, which="minor")
    axes[0].legend(fontsize=7)
    fig.suptitle(run_title(title or "outliers per layer", workdir, step, family))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


def attention_mass(attention, batch: dict, special_ids, family: str) -> np.ndarray:
    """(L, H) mean mass on special / delimiter / first tokens from the ``attention``
    collection ``{layer_i: {attn: {probs: ((B, H, T, S),)}}}``."""
    layers = {}
    for path, leaf in flatten_dict(attention).items():
        key = block_of("/".join(path))
        if key is not None:
            layers[key] = np.asarray(leaf[0], np.float32)
    if not layers:
        raise RuntimeError("no attention probabilities were collected.")
    probs0 = layers[min(layers)]
    b, _, t, s = probs0.shape
    keys = family_record(family).noop_tokens
    if not keys:
        raise ValueError(
            f"family {family!r} has no class or special token, so no no-op attention mass."
        )
    if keys == "class":
        key_mask = np.zeros((b, s), bool)
        key_mask[:, 0] = True
        query_mask = np.ones((b, t), bool)
    else:
        ids = np.asarray(batch["input_ids"])
        key_mask = np.isin(ids, np.asarray(special_ids))
        key_mask[:, 0] = True
        query_mask = np.asarray(batch.get("attention_mask", np.ones_like(ids))).astype(bool)
    out = np.zeros((len(layers), probs0.shape[1]))
    for i, layer in enumerate(sorted(layers)):
        mass = (layers[layer] * key_mask[:, None, None, :]).sum(-1)  # (B, H, T)
        w = query_mask[:, None, :]
        out[i] = (mass * w).sum((0, 2)) / np.maximum(w.sum((0, 2)), 1)
    return out


def plot_attention_mass(
    mass: np.ndarray,
    path: str,
    title: str = "",
    *,
    workdir: str | None = None,
    step=None,
    family: str = "",
):
    """Heat map of :func:`attention_mass`'s (L, H) ``mass``, titled with the run of
    ``workdir`` and ``step``; returns the (closed) figure."""
    plt = _plt()
    fig, ax = plt.subplots(
        figsize=(max(5.0, 1.5 + 0.5 * mass.shape[1]), max(3.8, 1.4 + 0.4 * mass.shape[0]))
    )
    im = ax.imshow(mass, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(mass.shape[1]))
    ax.set_yticks(range(mass.shape[0]))
    for i in range(mass.shape[0]):
        for j in range(mass.shape[1]):
            ax.text(
                j,
                i,
                f"{mass[i, j]:.2f}",
                ha="center",
                va="center",
                fontsize=6,
                color="w" if mass[i, j] < 0.5 else "k",
            )
    fig.colorbar(im, ax=ax, label="attention mass on special / first tokens")
    what = title or "no-op attention per head"
    ax.set_title(run_title(what, workdir, step, family, sep="\n"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


def plot_decoder_outliers(
    summary: dict,
    path: str,
    title: str = "",
    *,
    workdir: str | None = None,
    step=None,
    family: str = "",
):
    """``decoder_outliers.png`` of a causal decoder's ``summary``
    (:class:`qtx.evaluate.decoder_outliers.DecoderOutlierAccumulator`): per layer, the
    largest ``|x|`` of the residual stream (max over the data, and the median over sequences
    of each sequence's max), and the attention mass on the first token and on each query's
    largest-mass key (means over queries and heads). Titled with the run of ``workdir`` and
    ``step``; returns the (closed) figure."""
    rows = summary.get("per_layer", [])
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    panels = (
        (
            axes[0],
            (
                ("max_activation", "max over sequences"),
                ("median_sequence_max", "median over sequences"),
            ),
            "largest |x| of the layer output\n(residual stream)",
        ),
        (
            axes[1],
            (("first_token_mass", "first token"), ("top_key_mass", "largest-mass key")),
            "attention mass, mean over\nqueries and heads",
        ),
    )
    for ax, series, label in panels:
        values = []
        for index, (key, name) in enumerate(series):
            pts = [(r["layer"], float(r[key])) for r in rows if key in r]
            pts = [(x, y) for x, y in pts if math.isfinite(y)]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, label=name, **series_style(index))
                values += list(ys)
        layers = [r["layer"] for r in rows]
        if layers:
            ax.set_xticks(range(0, max(layers) + 1, max(1, math.ceil(len(layers) / 12))))
        if values:
            fit_y_axis(ax, values)
            ax.legend(fontsize=7)
        ax.set_xlabel("layer")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.grid(alpha=0.12, which="minor")
    top = summary.get("max_activation")
    if top is not None and math.isfinite(top):
        axes[0].set_title(
            f"max |x| = {top:.4g} (layer {summary['max_activation_layer']}, position "
            f"{summary['max_activation_position']}, channel {summary['max_activation_channel']})",
            fontsize=9,
        )
    mass = summary.get("first_token_mass")
    if mass is not None and math.isfinite(mass):
        axes[1].set_title(f"first-token mass = {mass:.3f} (mean over layers and heads)", fontsize=9)
    fig.suptitle(run_title(title or "decoder outliers per layer", workdir, step, family))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig
