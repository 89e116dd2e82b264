"""Outlier statistics (Quantizable Transformers §4): per-sequence kurtosis and inf norm.

Tracked points sow per-sequence values into ``intermediates`` inside the jitted eval step
(``QuantPoint`` does it for the plan's ``track`` patterns), so no second pass over the data is
needed. Here the values are averaged over all validation sequences per tracked tensor, then:

* ``max_inf_norm`` = max over the inf-norm tensors of their mean inf norm;
* ``avg_kurtosis`` = mean over the kurtosis tensors of their mean kurtosis;
* ``per_layer`` keeps every tensor's two means for plots.

For causal decoders (``Family.causal``) the accumulator also combines the massive-activation
and attention-sink statistics of :mod:`qtx.evaluate.decoder_outliers` (summary key
``decoder_outliers``).
"""

from __future__ import annotations

import re

import numpy as np
from flax.traverse_util import flatten_dict

from qtx.evaluate.decoder_outliers import DecoderOutlierAccumulator
from qtx.models.family import family_record

# The tensors of each family (``Family.kurtosis_points``, ``inf_norm_points``: regexes over
# point names) and the one the papers' headline inf norm most likely refers to
# (``Family.headline_point``, docs/methods.md §1) are in the family records.


def track_patterns(family: str) -> tuple[str, ...]:
    """Point patterns to put in ``QuantPlan.track`` for ``family``."""
    rec = family_record(family)
    return tuple(sorted(set(rec.kurtosis_points) | set(rec.inf_norm_points)))


class OutlierAccumulator:
    """Sums per-sequence statistics over batches (host side, float64)."""

    def __init__(self, family: str):
        self.family = family
        self.sums: dict[str, dict[str, float]] = {}
        self.counts: dict[str, int] = {}
        self.decoder = DecoderOutlierAccumulator() if family_record(family).causal else None

    def update_decoder(self, tree, weights=None) -> None:
        """The decoder statistics of one batch (see :mod:`qtx.evaluate.decoder_outliers`)."""
        if self.decoder is not None:
            self.decoder.update(tree, weights)

    def update(self, intermediates, weights=None) -> None:
        """``intermediates``: the sown tree; ``weights`` (B,) marks real (non-padding) rows."""
        w = None if weights is None else np.asarray(weights, np.float64).reshape(-1)
        for path, leaf in flatten_dict(intermediates).items():
            metric = path[-1]
            if metric not in ("kurtosis", "inf_norm"):
                continue
            name = "/".join(path[:-1])
            vals = np.concatenate([np.asarray(v, np.float64).reshape(-1) for v in leaf])
            ww = np.ones_like(vals) if w is None else np.tile(w, len(vals) // len(w))
            entry = self.sums.setdefault(name, {"kurtosis": 0.0, "inf_norm": 0.0})
            entry[metric] += float(np.sum(vals * ww))
            if metric == "kurtosis":
                self.counts[name] = self.counts.get(name, 0) + float(ww.sum())

    def summary(self) -> dict:
        """``{"max_inf_norm", "avg_kurtosis", "headline_inf_norm", "per_layer": {...}}`` and,
        for a decoder that saw batches, ``"decoder_outliers"``."""
        rec = family_record(self.family)
        kurt_pat, inf_pat = rec.kurtosis_points, rec.inf_norm_points
        per = {}
        for name, s in sorted(self.sums.items()):
            n = max(self.counts.get(name, 0), 1)
            per[name] = {"kurtosis": s["kurtosis"] / n, "inf_norm": s["inf_norm"] / n}

        def pick(pats, metric):
            return [v[metric] for k, v in per.items() if any(re.search(p, k) for p in pats)]

        infs, kurts = pick(inf_pat, "inf_norm"), pick(kurt_pat, "kurtosis")
        head = pick((rec.headline_point,), "inf_norm")
        out = {
            "max_inf_norm": float(max(infs)) if infs else float("nan"),
            "avg_kurtosis": float(np.mean(kurts)) if kurts else float("nan"),
            "headline_inf_norm": float(max(head)) if head else float("nan"),
            "per_layer": per,
        }
        decoder = self.decoder.summary() if self.decoder is not None else {}
        return {**out, "decoder_outliers": decoder} if decoder else out
