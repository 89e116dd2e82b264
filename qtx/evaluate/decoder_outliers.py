"""Outlier statistics of causal decoders: massive activations and attention sinks.

Computed inside the jitted eval step of the full-precision model, per layer ``i`` and over
the validation sequences, real tokens only (padding, left or right, never counts):

* the residual stream, the layer output ``layer_i/residual_ffn`` ``x`` (B, T, D): per
  sequence ``m_b = max_{t, d} |x_btd|`` and where it sits, the token position ``t`` (among
  the sequence's real tokens, i.e. the model's position id) and the channel ``d``. Reported:
  the largest ``m_b`` with its position and channel; the median over sequences of ``m_b``
  (the "massive activation" statistic, Sun et al. 2024); and the position and channel that
  hold ``m_b`` most often, with their shares of the sequences;
* attention, the probabilities ``p`` (B, H, T, S) of the ``softmax`` point: over the real
  queries ``t`` except the sequence's first real token ``f_b`` (with left padding not index
  0), the mass on the first real token ``p[b, h, t, f_b]`` and on the query's largest-mass
  key ``max_s p[b, h, t, s]``, each averaged over queries per head, and per head the key
  position (relative to ``f_b``) that most often is the largest-mass key. The first token
  is left out as a query: its only visible key is itself, so under the softmax its mass on
  the first token is 1 by construction and says nothing about the head.

How: :func:`with_decoder_statistics` wraps a model so that its ``apply`` reduces these
statistics where the tensors are made (a Flax method interceptor on the ``residual_ffn`` and
``softmax`` points) and sows only the reductions, per batch (B,) values per layer and (H,) /
(H, S) sums, into the :data:`COLLECTION` collection: no (B, H, T, S) array leaves the
device, and scanned layers (``config.model.scan_layers``) stack small values only. The
``attention`` collection is made mutable so that attention runs the einsum path (the
probabilities exist); its sown probabilities are dropped inside the step.
:class:`DecoderOutlierAccumulator` sums the batches on the host (float64).
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict

from qtx.nn import ATTENTION
from qtx.quant import QuantPoint

COLLECTION = "decoder_outliers"
RESIDUAL_POINT = "residual_ffn"  # the layer output (pre-LN decoders: after the FFN residual)
PROBS_POINT = "softmax"  # the attention probabilities of any normaliser


def residual_statistics(x, token_mask=None) -> dict:
    """``x`` (B, T, D), ``token_mask`` (B, T) bool or None (all real) -> per sequence (B,):
    ``seq_max`` ``max |x|`` over the real tokens (0 without any), ``seq_position`` (the
    position id of its token: real tokens before it) and ``seq_channel``; ``seq_tokens`` the
    number of real tokens."""
    b, t, d = x.shape
    m = jnp.ones((b, t), bool) if token_mask is None else jnp.asarray(token_mask, bool)
    a = jnp.where(m[..., None], jnp.abs(x.astype(jnp.float32)), -1.0).reshape(b, t * d)
    idx = jnp.argmax(a, axis=1)
    token, channel = idx // d, idx % d
    position = jnp.take_along_axis(jnp.cumsum(m, axis=1) - 1, token[:, None], axis=1)[:, 0]
    return {
        "seq_max": jnp.maximum(jnp.max(a, axis=1), 0.0),
        "seq_position": position.astype(jnp.int32),
        "seq_channel": channel.astype(jnp.int32),
        "seq_tokens": m.sum(axis=1).astype(jnp.int32),
    }


def attention_statistics(probs, pairs=None) -> dict:
    """``probs`` (B, H, T, S) of a self-attention (T = S), ``pairs`` (B, 1, T, S) bool of real
    (query, key) pairs or None (all real) -> sums over the queries ``t`` that are real and
    not their sequence's first real token: ``first_mass_sum`` (H,) of ``probs[b, h, t, f_b]``,
    ``top_mass_sum`` (H,) of ``max_s probs[b, h, t, s]`` (real keys), ``top_key_count``
    (H, S) how often each key position (relative to ``f_b``) holds that max, and
    ``queries`` () their number."""
    b, h, t, s = probs.shape
    p = probs.astype(jnp.float32)
    if pairs is None:
        real_q, real_k = jnp.ones((b, t), bool), jnp.ones((b, s), bool)
    else:
        pairs = jnp.broadcast_to(jnp.asarray(pairs, bool), (b, 1, t, s))[:, 0]
        real_q, real_k = pairs.any(axis=2), pairs.any(axis=1)
    first = jnp.argmax(real_k, axis=1)  # (B,) first real key
    key_pos = jnp.cumsum(real_k, axis=1) - 1  # (B, S) position ids of the keys
    w = (real_q & (jnp.cumsum(real_q, axis=1) > 1)).astype(jnp.float32)[:, None, :]  # (B,1,T)
    on_first = jnp.take_along_axis(p, first[:, None, None, None], axis=3)[..., 0]  # (B, H, T)
    masked = jnp.where(real_k[:, None, None, :], p, -1.0)
    top, top_key = jnp.max(masked, axis=3), jnp.argmax(masked, axis=3)  # (B, H, T)
    rel = jnp.take_along_axis(key_pos[:, None, :], top_key.reshape(b, 1, h * t), axis=2)
    rel = jnp.clip(rel.reshape(b, h, t), 0, s - 1)
    counts = jnp.einsum("bht,bhts->hs", jnp.broadcast_to(w, (b, h, t)), nn.one_hot(rel, s))
    return {
        "first_mass_sum": jnp.sum(on_first * w, axis=(0, 2)),
        "top_mass_sum": jnp.sum(top * w, axis=(0, 2)),
        "top_key_count": counts,
        "queries": jnp.sum(w),
    }


def _mask_arg(args, kwargs):
    return kwargs.get("mask", args[1] if len(args) > 1 else None)


def _interceptor(next_fun, args, kwargs, context):
    """Sows the statistics of the ``residual_ffn`` and ``softmax`` points' inputs."""
    module = context.module
    if (
        context.method_name == "__call__"
        and isinstance(module, QuantPoint)
        and module.name in (RESIDUAL_POINT, PROBS_POINT)
        and not module.is_initializing()
        and module.is_mutable_collection(COLLECTION)
    ):
        x, mask = args[0], _mask_arg(args, kwargs)
        stats = None
        if module.name == RESIDUAL_POINT and getattr(x, "ndim", 0) == 3:
            stats = residual_statistics(x, mask)
        elif module.name == PROBS_POINT and getattr(x, "ndim", 0) == 4:
            stats = attention_statistics(x, mask)
        for key, value in (stats or {}).items():
            module.sow(COLLECTION, key, value)
    return next_fun(*args, **kwargs)


class DecoderStatisticsModel:
    """``model`` whose ``apply`` also returns the :data:`COLLECTION` collection (when
    ``mutable`` is a list) and whose every other attribute is the model's."""

    def __init__(self, model):
        self.model = model

    def apply(self, variables, *args, mutable=False, **kwargs):
        if mutable is False or mutable is True:
            return self.model.apply(variables, *args, mutable=mutable, **kwargs)
        asked = list(mutable)
        extra = [c for c in (COLLECTION, ATTENTION) if c not in asked]
        with nn.intercept_methods(_interceptor):
            out, coll = self.model.apply(variables, *args, mutable=asked + extra, **kwargs)
        coll = dict(coll)
        if ATTENTION not in asked:
            coll.pop(ATTENTION, None)
        coll[COLLECTION] = coll.get(COLLECTION, {})
        return out, coll

    def __getattr__(self, name):
        if name == "model":  # not set yet (copy, unpickling)
            raise AttributeError(name)
        return getattr(self.model, name)


def with_decoder_statistics(model) -> DecoderStatisticsModel:
    """``model`` (a Flax module or ``ScannedModel``) whose ``apply(..., mutable=[...])``
    also returns the decoder statistics (see the module docstring)."""
    return DecoderStatisticsModel(model)


def _mode(values: np.ndarray) -> tuple[int, float]:
    """The most frequent value of an int array (the smallest on ties) and its share."""
    if values.size == 0:
        return -1, float("nan")
    uniq, counts = np.unique(values, return_counts=True)
    i = int(np.argmax(counts))
    return int(uniq[i]), float(counts[i] / values.size)


class DecoderOutlierAccumulator:
    """Combines the per-batch :data:`COLLECTION` trees on the host (float64)."""

    def __init__(self):
        self.residual: dict[int, dict[str, list]] = {}
        self.attention: dict[int, dict[str, np.ndarray]] = {}

    def update(self, tree, weights=None) -> None:
        """``tree``: ``{layer_i: {residual_ffn: {...}, attn: {softmax: {...}}}}`` of sown
        1-tuples; ``weights`` (B,) marks real rows (padding rows of the last batch)."""
        layers: dict[int, dict[str, np.ndarray]] = {}
        for path, leaf in flatten_dict(dict(tree)).items():
            m = re.fullmatch(r"layer_(\d+)", str(path[0]))
            if m is None:
                continue
            value = np.asarray(leaf[0] if isinstance(leaf, tuple) else leaf)
            layers.setdefault(int(m.group(1)), {})[path[-1]] = value
        for layer, v in layers.items():
            if "seq_max" in v:
                keep = v["seq_tokens"] > 0
                if weights is not None:
                    keep &= np.asarray(weights).reshape(-1) > 0
                entry = self.residual.setdefault(layer, {"max": [], "position": [], "channel": []})
                entry["max"].append(v["seq_max"][keep].astype(np.float64))
                entry["position"].append(v["seq_position"][keep])
                entry["channel"].append(v["seq_channel"][keep])
            if "queries" in v:
                sums = {k: v[k].astype(np.float64) for k in ATTENTION_SUMS}
                entry = self.attention.get(layer)
                if entry is None or entry["top_key_count"].shape != sums["top_key_count"].shape:
                    self.attention[layer] = _merge_counts(entry, sums)
                else:
                    self.attention[layer] = {k: entry[k] + sums[k] for k in ATTENTION_SUMS}

    def summary(self) -> dict:
        """``{"per_layer": [...], "max_activation", "max_activation_layer",
        "max_activation_position", "max_activation_channel", "massive_activation",
        "massive_activation_layer", "first_token_mass", "top_key_mass", "sequences",
        "queries"}`` (see the module docstring); ``{}`` before any batch."""
        layers = sorted(set(self.residual) | set(self.attention))
        if not layers:
            return {}
        per_layer = [self._layer(i) for i in layers]
        with_max = [r for r in per_layer if np.isfinite(r.get("max_activation", np.nan))]
        top = max(with_max, key=lambda r: r["max_activation"], default=None)
        massive = max(with_max, key=lambda r: r["median_sequence_max"], default=None)
        heads = [r["first_token_mass_per_head"] for r in per_layer if "first_token_mass" in r]
        tops = [r["top_key_mass_per_head"] for r in per_layer if "top_key_mass" in r]
        nan = float("nan")
        return {
            "max_activation": top["max_activation"] if top else nan,
            "max_activation_layer": top["layer"] if top else -1,
            "max_activation_position": top["max_position"] if top else -1,
            "max_activation_channel": top["max_channel"] if top else -1,
            "massive_activation": massive["median_sequence_max"] if massive else nan,
            "massive_activation_layer": massive["layer"] if massive else -1,
            "first_token_mass": float(np.mean(heads)) if heads else nan,
            "top_key_mass": float(np.mean(tops)) if tops else nan,
            "sequences": int(max((r.get("sequences", 0) for r in per_layer), default=0)),
            "queries": int(max((r.get("queries", 0) for r in per_layer), default=0)),
            "per_layer": per_layer,
        }

    def _layer(self, i: int) -> dict:
        out: dict = {"layer": i}
        res = self.residual.get(i)
        if res is not None:
            mx = np.concatenate(res["max"])
            pos, ch = np.concatenate(res["position"]), np.concatenate(res["channel"])
            out["sequences"] = int(mx.size)
            if mx.size:
                j = int(np.argmax(mx))
                top_pos, pos_share = _mode(pos)
                top_ch, ch_share = _mode(ch)
                out.update(
                    max_activation=float(mx[j]),
                    max_position=int(pos[j]),
                    max_channel=int(ch[j]),
                    median_sequence_max=float(np.median(mx)),
                    top_position=top_pos,
                    top_position_share=pos_share,
                    top_channel=top_ch,
                    top_channel_share=ch_share,
                )
        att = self.attention.get(i)
        if att is not None:
            n = float(att["queries"])
            out["queries"] = int(round(n))
            if n > 0:
                first = att["first_mass_sum"] / n
                topm = att["top_mass_sum"] / n
                counts = att["top_key_count"]
                out.update(
                    first_token_mass=float(first.mean()),
                    top_key_mass=float(topm.mean()),
                    first_token_mass_per_head=[float(x) for x in first],
                    top_key_mass_per_head=[float(x) for x in topm],
                    top_key_position_per_head=[int(x) for x in np.argmax(counts, axis=1)],
                    top_key_position_share_per_head=[
                        float(x) for x in counts.max(axis=1) / np.maximum(counts.sum(axis=1), 1)
                    ],
                )
        return out


ATTENTION_SUMS = ("first_mass_sum", "top_mass_sum", "top_key_count", "queries")


def _merge_counts(old: dict | None, new: dict) -> dict:
    """Sums of two batches whose key axes differ (another sequence length): the shorter
    ``top_key_count`` is padded with zeros."""
    if old is None:
        return new
    s = max(old["top_key_count"].shape[1], new["top_key_count"].shape[1])

    def pad(c):
        return np.pad(c, ((0, 0), (0, s - c.shape[1])))

    merged = {k: old[k] + new[k] for k in ATTENTION_SUMS if k != "top_key_count"}
    merged["top_key_count"] = pad(old["top_key_count"]) + pad(new["top_key_count"])
    return merged
