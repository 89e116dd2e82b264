"""PNG figures: outlier statistics per layer, and the "no-op" attention mass per head.

* ``outliers.png``: mean inf norm and mean kurtosis of every tracked tensor, per layer
  (log scale), one line per tensor type (``ffn/out``, ``residual_ffn``, ...).
* ``attention_mass.png``: for each layer and head, the mean over real query tokens of the
  probability mass on special / delimiter tokens ([CLS], [SEP], '.', ',', </s>) and on the
  first token of the sequence: the heads that learned to "do nothing".
"""

from __future__ import annotations

import re

import numpy as np
from flax.traverse_util import flatten_dict


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


def plot_outliers(per_layer: dict, path: str, title: str = "") -> None:
    """``per_layer``: ``{"layer_3/ffn/out": {"inf_norm", "kurtosis"}, "final_ln/out": ...}``."""
    series: dict[str, dict[int, dict]] = {}
    blocks = sorted({block_of(n) for n in per_layer} - {None})  # (stage, layer), in order
    for name, vals in per_layer.items():
        key = block_of(name)
        layer = blocks.index(key) if key is not None else -1
        tensor = re.sub(r"^(stage_\d+/)?layer_\d+/", "", name)
        series.setdefault(tensor, {})[layer] = vals
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("inf_norm", "kurtosis"), strict=True):
        for tensor, by_layer in sorted(series.items()):
            layers = sorted(k for k in by_layer if k >= 0)
            if layers:
                ax.plot(
                    layers,
                    [max(by_layer[k][metric], 1e-3) for k in layers],
                    marker="o",
                    label=tensor,
                )
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel("mean " + metric.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title or "outlier statistics per layer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    if family == "swin":
        raise ValueError("Swin has no class or special token, so no no-op attention mass.")
    if family == "vit":
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


def plot_attention_mass(mass: np.ndarray, path: str, title: str = "") -> None:
    plt = _plt()
    fig, ax = plt.subplots(
        figsize=(max(5.0, 1.5 + 0.5 * mass.shape[1]), max(3.0, 1.0 + 0.4 * mass.shape[0]))
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
    ax.set_title(title or "no-op attention per head")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
