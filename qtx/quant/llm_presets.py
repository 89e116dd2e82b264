"""LLM quantization presets (decoders: OPT and the llama family; docs/quantization_points.md,
"LLM presets"), registered in ``qtx.quant.presets``.
Gates, the LM head and the logits stay FP in all four; the FFN outputs a fused kernel never
writes out (OPT's ``ffn/hidden``, llama's ``ffn/gate`` and ``ffn/up``) are never quantized.
They share the options ``group_size`` (128), ``weight_scheme`` (None: the preset's own) and
``weight_estimator``, so one ``config.eval.options`` serves every LLM setup of a config:

* ``w8a8_static``: the papers' setting, ``w8a8_all`` (static per-tensor ranges at every
  activation point, residual stream and embeddings included) with the fused FFN outputs FP;
  ``weight_granularity='channel'`` puts the linear kernels per output channel.
* ``w8a8_dynamic`` (SmoothQuant / vLLM serving): linear kernels symmetric per output channel;
  every matmul input per token, dynamic (``current_minmax`` on the real tokens), symmetric
  (``act_scheme``): the linear layers' inputs (``attn_ln/out``, ``ffn_ln/out``,
  ``attn/context``, ``ffn/act``) and, unless ``attention=False``, ``q``, ``k``, ``v`` (per
  token and head) and the probabilities (per query, unsigned). Embeddings FP unless E bits
  (``w8a8_dynamic:W8A8E8``: per row). Residual stream, dense outputs, scores FP.
* ``w4a8``: linear kernels at W bits per group of ``group_size`` input rows and output column
  (``granularity='group'``, ``axis=-2``; a group larger than the input is the whole input),
  symmetric; activations as ``w8a8_dynamic`` at A bits.
* ``w4a16``: weight-only, kernels as ``w4a8`` but asymmetric (zero point; ``weight_scheme=
  'symmetric'`` for symmetric), every activation FP; its bits must keep ``A16``
  (``w4a16:W3A16``).
"""

from __future__ import annotations

import dataclasses

from qtx.errors import UserError
from qtx.quant.paper_presets import EXCLUDE_HEADS, w8a8_all
from qtx.quant.rules import rule

# LLM presets (decoders: OPT, llama). Linear-layer kernels (in, out) of both families (and
# OPT-350m's projections); LayerNorm / RMSNorm and q/k-norm weights are not among them.
_LINEAR_WEIGHTS = (
    r"(^|/)attn/(q|k|v|o|qkv)_proj/weight$"
    r"|(^|/)ffn/(fc1|fc2|gate_proj|up_proj|down_proj)/weight$|(^|/)project_(in|out)/weight$"
)
# the inputs of those linear layers: q/k/v and FFN inputs (normalised hidden states; BERT's
# embedding LayerNorm feeds layer 0), the o_proj input and the fc2 / down_proj input
_LINEAR_INPUTS = r"(^|/)(attn_ln|ffn_ln)/out$|^embed/ln/out$|(^|/)attn/context$|(^|/)ffn/act$"
# the FFN's pre-activation outputs a fused kernel never writes out: OPT's fc1 output, llama's
# gate_proj and up_proj outputs (silu(gate) * up is computed in one go)
_FUSED_FFN = r"(^|/)ffn/(hidden|gate|up)$"
WEIGHT_SCHEMES = ("symmetric", "asymmetric")


def _llm_weights(preset, w, e, group_size, weight_scheme, weight_estimator, grouped, scheme):
    """Rules for the weights of an LLM preset: gates, LM head and other non-linear weights
    FP; embeddings FP unless ``e`` bits; linear kernels at ``w`` bits per output channel or,
    ``grouped``, per (input group of ``group_size``, output channel)."""
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise UserError(
            f"{preset} option group_size={group_size!r} is invalid; allowed: an integer >= 1."
        )
    scheme = weight_scheme or scheme
    if scheme not in WEIGHT_SCHEMES:
        raise UserError(
            f"{preset} option weight_scheme={weight_scheme!r} is invalid; allowed: None "
            f"(the preset's default), {', '.join(WEIGHT_SCHEMES)}."
        )
    wq = dict(scheme=scheme, estimator=weight_estimator, granularity="channel")
    kernel, table = wq, wq  # tables (V, D): per row (token)
    if grouped:  # kernels (in, out) grouped along in, tables along D
        kernel = dict(wq, granularity="group", group_size=group_size, axis=-2)
        table = dict(wq, granularity="group", group_size=group_size, axis=-1)
    embed = rule(r"(^|/)embed/", "weight", "embeddings stay FP", off=True)
    if e is not None:
        embed = rule(r"(^|/)embed/", "weight", f"embeddings at {e} bits", bits=e, **table)
    return (
        rule(r"(^|/)attn/gate/", label="gates stay FP", off=True, optional=True),
        rule(EXCLUDE_HEADS, label="LM head and logits stay FP", off=True),
        embed,
        rule(_LINEAR_WEIGHTS, "weight", f"linear weights at {w} bits", bits=w, **kernel),
        rule(r".", "weight", "other weights (norms) stay FP", off=True),
    )


def _per_token_acts(a, act_scheme, attention):
    """Per-token dynamic activation rules at ``a`` bits: linear-layer inputs and, with
    ``attention``, q / k / v and the probabilities (one range per token and head)."""
    tok = dict(bits=a, granularity="token", estimator="current_minmax")
    attn = ()
    if attention:
        attn = (
            rule(r"(^|/)attn/softmax$", "act", "probabilities per query", scheme="unsigned", **tok),
            rule(
                r"(^|/)attn/(q|k|v)$", "act", "q, k, v per token and head", scheme=act_scheme, **tok
            ),
        )
    return (
        *attn,
        # axis 2: a (B, T, H, Dh) context is one row per token across its heads (one scale
        # per row of o_proj's input, so o_proj runs as an integer matmul)
        rule(
            _LINEAR_INPUTS,
            "act",
            "linear-layer inputs per token",
            scheme=act_scheme,
            **dict(tok, axis=2),
        ),
        rule(r".", "act", "other activations stay FP", off=True),
    )


def w8a8_static(
    w=8,
    a=8,
    e=None,
    group_size=128,
    weight_scheme=None,
    weight_estimator="current_minmax",
    weight_granularity="tensor",
    act_estimator="running_minmax",
    momentum=0.9,
    percentile=99.999,
    ffn_hidden=False,
    residual_bits=None,
):
    """The papers' W8A8 on decoders: ``w8a8_all`` (static per-tensor ranges at every
    activation point, embeddings at ``e`` = ``w`` bits) with the FFN outputs a fused kernel
    keeps (OPT's ``ffn/hidden``, llama's ``ffn/gate`` and ``ffn/up``) in FP unless
    ``ffn_hidden``. ``weight_granularity='channel'``: linear kernels per output channel.
    ``group_size`` is accepted (config.eval.options reach every setup) and unused."""
    _llm_weights(
        "w8a8_static", w, e, group_size, weight_scheme, weight_estimator, False, "symmetric"
    )  # validates the shared options
    if weight_granularity not in ("tensor", "channel"):
        raise UserError(
            f"w8a8_static option weight_granularity={weight_granularity!r} is invalid; "
            "allowed: tensor, channel."
        )
    base = w8a8_all(
        w, a, e, weight_estimator, act_estimator, momentum, percentile, True, residual_bits
    )
    scheme = weight_scheme or "symmetric"
    if scheme != "symmetric":  # weights of w8a8_all are symmetric
        base = tuple(
            r
            if r.kind != "weight" or r.spec is None
            else dataclasses.replace(r, spec=r.spec.replace(scheme=scheme))
            for r in base
        )
    fused = ()
    if not ffn_hidden:
        fused = (rule(_FUSED_FFN, "act", "FFN outputs of fused kernels", off=True, optional=True),)
    channel = ()
    if weight_granularity == "channel":
        channel = (
            rule(
                _LINEAR_WEIGHTS,
                "weight",
                "linear weights per output channel",
                bits=w,
                scheme=scheme,
                granularity="channel",
                estimator=weight_estimator,
            ),
        )
    return (*fused, *channel, *base)


def w8a8_dynamic(
    w=8,
    a=8,
    e=None,
    group_size=128,
    weight_scheme=None,
    weight_estimator="current_minmax",
    act_scheme="symmetric",
    attention=True,
):
    """LLM serving's W8A8 (SmoothQuant / vLLM style): linear kernels symmetric per output
    channel; activations per token, dynamic (``current_minmax``, real tokens only) at every
    matmul input. ``attention=False`` keeps q, k, v and the probabilities in FP."""
    return (
        *_llm_weights(
            "w8a8_dynamic", w, e, group_size, weight_scheme, weight_estimator, False, "symmetric"
        ),
        *_per_token_acts(a, act_scheme, attention),
    )


def w4a8(
    w=4,
    a=8,
    e=None,
    group_size=128,
    weight_scheme=None,
    weight_estimator="current_minmax",
    act_scheme="symmetric",
    attention=True,
):
    """W4A8: linear kernels at ``w`` bits per (group of ``group_size`` input rows, output
    column), symmetric unless ``weight_scheme``; activations as ``w8a8_dynamic``."""
    return (
        *_llm_weights("w4a8", w, e, group_size, weight_scheme, weight_estimator, True, "symmetric"),
        *_per_token_acts(a, act_scheme, attention),
    )


def w4a16(
    w=4,
    a=16,
    e=None,
    group_size=128,
    weight_scheme=None,
    weight_estimator="current_minmax",
):
    """Weight-only W4A16 (GPTQ / AWQ layout): linear kernels at ``w`` bits per (group of
    ``group_size`` input rows, output column), asymmetric unless ``weight_scheme``;
    activations stay FP (``a`` must be 16)."""
    if a != 16:
        raise UserError(
            f"w4a16 keeps activations in full precision, so its bits need A16 (got A{a}); "
            "allowed: 'w4a16:W<bits>A16', or 'w4a8:W<bits>A<bits>' for quantized activations."
        )
    return (
        *_llm_weights(
            "w4a16", w, e, group_size, weight_scheme, weight_estimator, True, "asymmetric"
        ),
        rule(r".", "act", "activations stay FP", off=True),
    )
