"""HF PyTorch train steps of the same shape as a qtx model (used by ``train_throughput.py``).

One step: ``zero_grad``, forward with the task's loss, backward, global-norm clipping (when the
config clips) and ``torch.optim.AdamW``, ending in a host sync (``loss.item()``). Models are
built from the qtx config by its family's converter's ``hf_config`` (``qtx.hf.converter``)
with random init:

* ``clm`` (OPT): ``AutoModelForCausalLM`` (``OPTForCausalLM``), labels = ``input_ids``;
* ``mlm`` (BERT, RoBERTa): ``AutoModelForMaskedLM`` (no pooler), labels = ``targets`` at the
  masked positions (``weights`` > 0), -100 elsewhere;
* ``image`` (ViT): ``AutoModelForImageClassification``, ``pixel_values`` in NCHW.

Import this module only after the instruction-set environment is settled (it imports torch).
"""

from __future__ import annotations

import numpy as np
import torch

from qtx.hf.converter import converter

POSITION_PARAMS = ("embed_positions", "position_embeddings")  # left out of N (FLOPs)


def hf_model(cfg, task: str):
    """The randomly initialised ``transformers`` model of qtx ``cfg`` for ``task``."""
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForImageClassification,
        AutoModelForMaskedLM,
    )

    hf_config = converter(cfg.family).hf_config(cfg)  # a UserError for a family without one
    auto = {
        "clm": AutoModelForCausalLM,
        "mlm": AutoModelForMaskedLM,
        "image": AutoModelForImageClassification,
    }[task]
    return auto.from_config(hf_config)


def torch_batch(task: str, batch: dict, dev: str) -> dict:
    """Keyword arguments of the HF model call (with ``labels``) for a qtx batch."""
    b = {k: torch.from_numpy(np.array(v)) for k, v in batch.items()}  # a writable copy
    if task == "image":
        images = b["image"].permute(0, 3, 1, 2).contiguous().float()  # NHWC -> NCHW
        return {"pixel_values": images.to(dev), "labels": b["label"].long().to(dev)}
    out = {"input_ids": b["input_ids"].long(), "attention_mask": b["attention_mask"].long()}
    if task == "clm":
        out["labels"] = out["input_ids"]
    else:
        out["token_type_ids"] = b["token_type_ids"].long()
        out["labels"] = torch.where(b["weights"] > 0, b["targets"].long(), -100)
    return {k: v.to(dev) for k, v in out.items()}


def hf_step(cfg, task: str, batches: list[dict], optim: dict):
    """``(blocking call of one HF train step, n_params, losses, info)``.

    On CUDA a bfloat16 qtx config runs under ``torch.autocast(bfloat16)`` (float32 weights
    and optimizer, as qtx); on CPU everything is float32.
    """
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = hf_model(cfg, task).to(dev).train()
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=optim["lr"],
        betas=(optim["b1"], optim["b2"]),
        eps=optim["eps"],
        weight_decay=optim["weight_decay"],
    )
    data = [torch_batch(task, b, dev) for b in batches]
    amp = dev == "cuda" and cfg.dtype == "bfloat16"
    box, losses = [0], []

    def call():
        b = data[box[0] % len(data)]
        box[0] += 1
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=dev, dtype=torch.bfloat16, enabled=amp):
            loss = model(**b).loss
        loss.backward()
        if optim["clip_norm"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), optim["clip_norm"])
        opt.step()
        losses.append(loss.item())  # host sync

    n = sum(
        p.numel()
        for name, p in model.named_parameters()
        if not any(s in name for s in POSITION_PARAMS)
    )
    import transformers

    info = {
        "class": type(model).__name__,
        "device": dev,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "attn_implementation": model.config._attn_implementation,
        "autocast": "bfloat16" if amp else None,
    }
    return call, n, losses, info


def torch_matmul_peak(n: int, repeats: int, measure) -> dict:
    """float32 ``a @ a`` FLOP/s of torch (for reference), timed with ``measure``."""
    a = torch.randn(n, n)
    r = measure({"mm": lambda: a @ a}, repeats, min_sample_s=0.2)["mm"]
    return {"n": n, "dtype": "float32", **r, "flops": 2 * n**3 / r["median_ms"] * 1e3}


def cpu_capability() -> str:
    """The vector ISA ATen dispatches to (``torch.backends.cpu.get_cpu_capability()``)."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # older torch
        return "unknown"
