"""Each paper's quantization setup as a preset of rules (registered in ``qtx.quant.presets``).

Point names follow the model convention documented in ``docs/quantization_points.md``
(``embed/word/weight``, ``layer_3/attn/softmax``, ``layer_3/ffn/out``, ...).

Presets:

* ``w8a8_all`` (Quantizable Transformers): per-tensor everything. Weights symmetric on
  ``[-128, 127]`` (``current_minmax``, or ``mse`` for OPT); every activation asymmetric on
  ``[0, 255]``, running min-max with momentum 0.9 (or the 99.999 percentile); option
  ``act_scheme='symmetric'`` puts activations on ``[-128, 127]`` without a zero point.
  Gates, the LM head and the final logits stay in full precision, and so does the fc1 output
  before the activation (``ffn/hidden``): the reference fuses fc1 with the activation and
  quantizes only after it (``ffn_hidden=True`` quantizes it too). The residual stream
  (``embed/sum`` and the residual sums) is quantized at ``max(A, 8)`` bits (option
  ``residual_bits``): its range is set by the largest tokens, and below 8 bits every element
  of a smaller token rounds to the zero point, e.g. a ViT's class (and distillation) token,
  30-100x smaller than its patch tokens, which leaves the classifier its bias alone. At
  W8A8, the paper's setup, this changes nothing.
* ``os_fastertransformer`` (Outlier Suppression): W-E-A bits; weights symmetric per output
  channel, embeddings at E bits; activations asymmetric per tensor at the FasterTransformer
  positions only (embedding LN, Q/K/V, softmax, context, attention LN, GELU, FFN LN, pooler
  input, classifier input). Dense outputs, scores and logits stay in full precision, and by
  default (``head_points='reference'``, as the reference code) so do the pooler output and the
  LayerNorm output the pooler reads (the last post-LN ``ffn_ln/out``, rule name
  ``head_ln/out``); ``head_points='all'`` quantizes both.
* ``lsq``: plain LSQ at the ``qv_lsq`` points (the Quantization Variation baseline).
* ``qv_lsq`` (Quantization Variation): LSQ per module. Linear weights symmetric LSQ at W bits
  (iterative init, ``1/sqrt(Qp ||W||_1)`` gradient scale); patch embedding, embeddings and
  classifier at 8 bits; activations LSQ at A bits: attention input, q, k, v, softmax
  (unsigned), context, FFN input, GELU output (unsigned with a learnable offset, LSQ+);
  Swin's patch merging (its LayerNorm output and reduction weight) like a linear layer.
* ``binary`` (Quantization Variation's binary mode): the ``qv_lsq`` points with 1-bit weights
  ``sign(W) mean|W|`` and matmul inputs ``sign(x) mean|x|``, except the GELU output (almost
  all ``>= 0``): ``{0, s}`` + offset (unsigned 1-bit LSQ+); attention probabilities,
  embeddings and the classifier stay at 8 bits (LSQ).
"""

from __future__ import annotations

from qtx.errors import UserError
from qtx.quant.rules import rule

EXCLUDE_HEADS = r"(^|/)(lm_head|mlm_head)/|(^|/)logits$|/logits$"
_LN_WEIGHT = r"(^|/)(\w+_)?ln/weight$"
# The residual stream: the embedding sum and both residual sums of every layer.
_RESIDUAL_STREAM = r"(^|/)embed/sum$|(^|/)residual_(attn|ffn)$"


def w8a8_all(
    w=8,
    a=8,
    e=None,
    weight_estimator="current_minmax",
    act_estimator="running_minmax",
    momentum=0.9,
    percentile=99.999,
    ffn_hidden=False,
    residual_bits=None,
    act_scheme="asymmetric",
):
    """Quantizable Transformers' W8A8: every activation, per tensor (see module docstring).

    ``ffn_hidden``: also quantize the fc1 output before the activation (the reference does not).
    ``residual_bits``: width of the residual stream (``embed/sum``, ``residual_attn``,
    ``residual_ffn``); default ``max(a, 8)``, ``0`` keeps it in full precision.
    ``act_scheme``: ``asymmetric`` (the paper) or ``symmetric`` activation grids; symmetric
    ones have no zero point, so the integer model's matmuls need no zero-point terms.
    """
    if act_scheme not in ("asymmetric", "symmetric"):
        raise UserError(
            f"w8a8_all option act_scheme={act_scheme!r} is invalid; allowed: asymmetric, symmetric."
        )
    if residual_bits is not None and (
        not isinstance(residual_bits, int)
        or isinstance(residual_bits, bool)
        or not (residual_bits == 0 or 2 <= residual_bits <= 16)
    ):
        raise UserError(
            f"w8a8_all option residual_bits={residual_bits!r} is invalid; allowed: None "
            "(max(a, 8)), 0 (full precision) or an integer 2..16."
        )
    e = w if e is None else e
    fused = ()
    if not ffn_hidden:
        fused = (rule(r"(^|/)ffn/hidden$", "act", "fc1 output (fused with act)", off=True),)
    act = dict(
        bits=a,
        scheme=act_scheme,
        estimator=act_estimator,
        momentum=momentum,
        percentile=percentile,
    )
    r = max(a, 8) if residual_bits is None else residual_bits
    if r == 0:
        stream = rule(_RESIDUAL_STREAM, "act", "residual stream stays FP", off=True)
    else:
        stream = rule(_RESIDUAL_STREAM, "act", f"residual stream at {r} bits", **{**act, "bits": r})
    return (
        rule(r"(^|/)attn/gate/", label="gates stay FP", off=True, optional=True),
        rule(EXCLUDE_HEADS, label="LM head and logits stay FP", off=True),
        *fused,
        stream,
        rule(
            r"(^|/)embed/",
            "weight",
            "embedding weights",
            bits=e,
            scheme="symmetric",
            estimator=weight_estimator,
        ),
        rule(r".", "weight", "weights", bits=w, scheme="symmetric", estimator=weight_estimator),
        rule(r".", "act", "activations", **act),
    )


OS_ACT_POINTS = (
    r"(^|/)embed/ln/out$",
    r"(^|/)attn/(q|k|v)$",
    r"(^|/)attn/softmax$",
    r"(^|/)attn/context$",
    r"(^|/)attn_ln/out$",
    r"(^|/)ffn/act$",
    r"(^|/)ffn_ln/out$",
    r"(^|/)pooler/in$",
    r"(^|/)classifier/in$",
)


def os_fastertransformer(
    w=8,
    a=8,
    e=None,
    act_estimator="minmax",
    accumulate="mean",
    percentile=99.999,
    percentile_of="abs",
    learn="none",
    head_points="reference",
):
    """Outlier Suppression's FasterTransformer placement at W-E-A bits.

    With ``act_estimator='percentile'`` the range is the paper's 99.999 % of ``|x|``
    (``percentile_of='abs'``); ``percentile_of='x'`` takes signed 0.001 / 99.999 percentiles.
    ``learn='lsq+'`` is the paper's QAT baseline: activations LSQ+ (step and offset), weights
    LSQ (per-channel steps from their min/max), all initialised by calibration.
    ``head_points``: ``reference`` (the reference code) quantizes the pooler input and the
    classifier input; the LayerNorm output the pooler reads (the last post-LN layer's
    ``ffn_ln/out``, rule name ``head_ln/out``) and the pooler output stay FP. ``all`` also
    quantizes those two. Without a pooler the last ``ffn_ln/out`` is quantized in both.
    """
    if learn not in ("none", "lsq+"):
        raise UserError(
            f"os_fastertransformer option learn={learn!r} is invalid; allowed: none, lsq+."
        )
    if head_points not in ("reference", "all"):
        raise UserError(
            f"os_fastertransformer option head_points={head_points!r} is invalid; allowed: "
            "reference, all."
        )
    acts, head = OS_ACT_POINTS, ()
    if head_points == "all":
        acts = acts + (r"(^|/)pooler/out$",)
    else:  # ahead of the FasterTransformer rule, which matches its point's own name
        head = (
            rule(
                r"^head_ln/out$",
                "act",
                "LayerNorm output the pooler reads stays FP",
                off=True,
                optional=True,
            ),
        )
    e = w if e is None else e
    act = dict(
        bits=a,
        scheme="asymmetric",
        estimator=act_estimator,
        accumulate=accumulate,
        percentile=percentile,
        percentile_of=percentile_of,
        learn=learn,
    )
    wq = dict(scheme="symmetric", granularity="channel", estimator="current_minmax")
    if learn != "none":
        wq = dict(wq, estimator="minmax", learn="lsq")
    return (
        rule(r"(^|/)attn/gate/", label="gates stay FP", off=True, optional=True),
        rule(_LN_WEIGHT, "weight", "LayerNorm weights stay FP", off=True),
        rule(r"(^|/)embed/", "weight", "embedding weights", bits=e, **wq),
        rule(r".", "weight", "linear weights", bits=w, **wq),
        rule(
            r"(^|/)attn/softmax$",
            "act",
            "attention probabilities",
            bits=a,
            scheme="asymmetric",
            estimator="minmax",
            accumulate=accumulate,
            learn=learn,
        ),
        *head,
        rule("|".join(acts), "act", "FasterTransformer activations", **act),
        rule(r".", "act", "other activations stay FP", off=True),
    )


# What Quantization Variation keeps in full precision (besides unlisted points).
_QV_FULL_PRECISION = (
    rule(r"(^|/)attn/gate/", label="gates stay FP", off=True, optional=True),
    rule(EXCLUDE_HEADS, label="LM head and logits stay FP", off=True),
    rule(_LN_WEIGHT, "weight", "LayerNorm weights stay FP", off=True),
    rule(
        r"(^|/)embed/position/|(^|/)embed/cls|(^|/)embed/dist",
        "weight",
        "positions and class tokens stay FP",
        off=True,
        optional=True,
    ),
)


def qv_lsq(w=4, a=4, e=None, per_head=False, module_dependent=True):
    """Quantization Variation's module-dependent LSQ at W/A bits.

    ``e`` (default 8) is the width of the patch embedding, embeddings, classifier weights and
    classifier input; ``per_head`` gives q, k, v, softmax and context one step per head.
    ``module_dependent=False`` is the plain LSQ baseline at the same points (preset ``lsq``).
    """
    e = 8 if e is None else e
    w_scale, a_scale, gelu = ("weight_l1", "act_qv", "lsq+") if module_dependent else ("lsq",) * 3
    wq = dict(
        scheme="symmetric",
        learn="lsq",
        estimator="iterative",
        grad_scale=w_scale,
        min_scale=1e-4,
    )
    aq = dict(bits=a, learn="lsq", estimator="lsq_init", grad_scale=a_scale, min_scale=1e-4)
    head = dict(granularity="head") if per_head else {}
    return (
        *_QV_FULL_PRECISION,
        rule(
            r"(^|/)embed/|(^|/)(classifier|dist_classifier)/",
            "weight",
            "patch embedding, embeddings and classifier at E bits",
            bits=e,
            **wq,
        ),
        rule(
            r"(^|/)attn/(q|k|v|o|qkv)_proj/weight$|(^|/)ffn/fc[12]/weight$"
            r"|(^|/)merge/reduction/weight$",
            "weight",
            "attention, FFN and patch-merging weights",
            bits=w,
            **wq,
        ),
        rule(r"(^|/)attn_ln/out$", "act", "attention input", scheme="symmetric", **aq),
        rule(
            r"(^|/)merge/ln/out$",
            "act",
            "patch-merging input",
            optional=True,
            scheme="symmetric",
            **aq,
        ),
        rule(r"(^|/)attn/(q|k|v)$", "act", "q, k, v", scheme="symmetric", **aq, **head),
        rule(
            r"(^|/)attn/softmax$", "act", "attention probabilities", scheme="unsigned", **aq, **head
        ),
        rule(r"(^|/)attn/context$", "act", "attention output", scheme="symmetric", **aq, **head),
        rule(r"(^|/)ffn_ln/out$", "act", "FFN input", scheme="symmetric", **aq),
        rule(r"(^|/)ffn/act$", "act", "GELU output", scheme="unsigned", **{**aq, "learn": gelu}),
        rule(
            r"(^|/)classifier/in$",
            "act",
            "classifier input",
            optional=True,
            scheme="symmetric",
            **{**aq, "bits": e},
        ),
        rule(r".", label="everything else stays FP", off=True),
    )


def lsq(w=4, a=4, e=None):
    """Plain LSQ (Esser et al.), the baseline of Quantization Variation: the points and
    initialisation of ``qv_lsq``, one step per tensor, LSQ's gradient scale ``1/sqrt(N Qp)``
    for weights and activations, and a plain unsigned LSQ quantizer (no offset: GELU's
    negative values clip to 0) on the GELU output."""
    return qv_lsq(w, a, e, per_head=False, module_dependent=False)


def binary(w=1, a=1, e=None, softmax_bits=8, weight_granularity="tensor"):
    """Binary transformers (Quantization Variation's binary mode, docs/methods.md §3): at the
    points of ``qv_lsq``, weights ``sign(W) * mean|W|`` (STE through ``clip(W, -1, 1)``) and
    matmul inputs ``sign(x) * mean|x|`` when ``w`` / ``a`` are 1 (else LSQ at that width).

    The GELU output ``ffn/act`` is almost all ``>= 0`` (GELU's minimum is -0.17), so ``sign``
    would send every positive value to the same code. At ``a = 1`` it is binarised to
    ``{b, s + b}``: ``s * clip(round((x - b) / s), 0, 1) + b``, the unsigned 1-bit grid with
    learnable step ``s`` and offset ``b`` (LSQ+, ``lsq_init`` ``s = 2 mean|x|``, ``act_qv``
    gradient scale; ``qv_lsq``'s GELU quantizer at 1 bit, BiT's elastic binarisation).

    The attention probabilities stay multi-bit (unsigned LSQ at ``softmax_bits``; ``{0, s}``
    at 1 bit): their sign is always +1. Embeddings, the patch embedding, the classifier and
    its input are LSQ at ``e`` bits (default 8). ``weight_granularity``: ``tensor`` (one
    ``mean|W|``) or ``channel`` (one per output channel, as BiT / BinaryBERT).
    """
    if weight_granularity not in ("tensor", "channel"):
        raise UserError(
            f"binary option weight_granularity={weight_granularity!r} is invalid; allowed: "
            "tensor, channel."
        )
    e = 8 if e is None else e
    lsq_w = dict(scheme="symmetric", learn="lsq", estimator="iterative", grad_scale="weight_l1")
    lsq_a = dict(learn="lsq", estimator="lsq_init", grad_scale="act_qv")

    def weights(bits):
        if bits == 1:
            return dict(bits=1, scheme="symmetric", granularity=weight_granularity)
        return dict(bits=bits, min_scale=1e-4, **lsq_w)

    def acts(bits, scheme="symmetric"):
        if bits == 1 and scheme == "symmetric":
            return dict(bits=1, scheme="symmetric")  # sign(x) mean|x|
        return dict(bits=bits, scheme=scheme, min_scale=1e-4, **lsq_a)  # unsigned 1 bit: {0, s}

    # the GELU output is almost all >= 0: at 1 bit {0, s} + offset (unsigned LSQ+), not sign
    gelu = {**acts(1, "unsigned"), "learn": "lsq+"} if a == 1 else acts(a)
    matmul_inputs = r"(^|/)(attn_ln/out|attn/(q|k|v|context)|ffn_ln/out|merge/ln/out)$"
    return (
        *_QV_FULL_PRECISION,
        rule(
            r"(^|/)embed/|(^|/)(classifier|dist_classifier)/",
            "weight",
            "embeddings and classifier at E bits",
            bits=e,
            min_scale=1e-4,
            **lsq_w,
        ),
        rule(
            r"(^|/)attn/(q|k|v|o|qkv)_proj/weight$|(^|/)ffn/fc[12]/weight$"
            r"|(^|/)merge/reduction/weight$",
            "weight",
            "attention, FFN and patch-merging weights",
            **weights(w),
        ),
        rule(
            r"(^|/)attn/softmax$",
            "act",
            "attention probabilities",
            **acts(softmax_bits, "unsigned"),
        ),
        rule(r"(^|/)ffn/act$", "act", "GELU output", **gelu),
        rule(matmul_inputs, "act", "matmul inputs", **acts(a)),
        rule(r"(^|/)classifier/in$", "act", "classifier input", optional=True, **acts(e)),
        rule(r".", label="everything else stays FP", off=True),
    )
