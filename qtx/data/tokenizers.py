"""Tokenizer loading for ``config.data.tokenizer``.

Forms accepted by :func:`load_tokenizer`:

- ``"qtx:bpe"``: the embedded byte-level BPE (vocab 8192; ``<s>``=0 bos, ``<pad>``=1,
  ``</s>``=2 eos, ``<unk>``=3), for causal LMs.
- ``"qtx:wordpiece"``: the embedded uncased WordPiece (vocab 8192; ``[PAD]``=0, ``[UNK]``=1,
  ``[CLS]``=2, ``[SEP]``=3, ``[MASK]``=4), for BERT-style models.
- anything else: ``transformers.AutoTokenizer.from_pretrained(spec)``, i.e. a Hugging Face hub
  name (``bert-base-uncased``, ``facebook/opt-125m``; needs network or a warm cache) or a
  local directory holding ``tokenizer.json`` / ``tokenizer_config.json``.

Both embedded tokenizers were trained by ``python -m qtx.data.build_assets`` on the
WikiText-2 text shipped in ``assets/``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from qtx.errors import UserError

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
EMBEDDED = {
    "qtx:bpe": (
        "qtx_bpe.json",
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"},
    ),
    "qtx:wordpiece": (
        "qtx_wordpiece.json",
        {
            "pad_token": "[PAD]",
            "unk_token": "[UNK]",
            "cls_token": "[CLS]",
            "sep_token": "[SEP]",
            "mask_token": "[MASK]",
            "model_input_names": ["input_ids", "token_type_ids", "attention_mask"],
        },
    ),
}
ALLOWED_FORMS = (
    "'qtx:bpe', 'qtx:wordpiece', a Hugging Face hub name such as 'bert-base-uncased' or "
    "'facebook/opt-125m', or a local tokenizer directory"
)


@functools.lru_cache(maxsize=16)
def load_tokenizer(spec: str):
    """Return a ``transformers`` fast tokenizer for ``spec`` (cached per process)."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"config.data.tokenizer must be {ALLOWED_FORMS}; got {spec!r}.")
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if spec.startswith("qtx:"):
        if spec not in EMBEDDED:
            raise UserError(
                f"config.data.tokenizer={spec!r} is not an embedded tokenizer; use {ALLOWED_FORMS}."
            )
        fname, specials = EMBEDDED[spec]
        path = ASSETS_DIR / fname
        if not path.is_file():
            raise UserError(
                f"config.data.tokenizer={spec!r} needs {path}, which is missing; regenerate it "
                "with `python -m qtx.data.build_assets --source DATA_DIR`."
            )
        tok = PreTrainedTokenizerFast(tokenizer_file=str(path), **specials)
        tok.model_max_length = 1 << 30
        return tok
    try:  # the local cache first: offline, the hub would be retried for a minute
        return _from_local_cache(spec) or AutoTokenizer.from_pretrained(spec)
    except Exception as err:  # hub/network/format errors all surface as one config error
        raise UserError(
            f"config.data.tokenizer={spec!r} could not be loaded ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); use {ALLOWED_FORMS}."
        ) from err


@functools.lru_cache(maxsize=32)
def _backend(tokenizer, max_len: int | None, pad_id: int | None):
    """A private copy of the fast backend set to truncate/pad to ``max_len`` (or not)."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_truncation()
    backend.no_padding()
    if max_len is not None:
        backend.enable_truncation(max_len, strategy="longest_first")
        backend.enable_padding(
            length=max_len, pad_id=pad_id, pad_token=tokenizer.pad_token, pad_type_id=0
        )
    return backend


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text without special tokens, no truncation: list of (L_i,) lists."""
    if not texts:
        return []
    if getattr(tokenizer, "backend_tokenizer", None) is not None:
        encs = _backend(tokenizer, None, None).encode_batch(texts, add_special_tokens=False)
        return [e.ids for e in encs]
    out = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)
    return out["input_ids"]


def encode_fixed(tokenizer, a: list[str], b: list[str] | None, max_len: int) -> dict:
    """Encode texts (or pairs) with special tokens, truncated longest-first and padded to
    ``max_len``: ``input_ids`` (N,T) int32, ``attention_mask`` and ``token_type_ids`` (N,T)."""
    if getattr(tokenizer, "backend_tokenizer", None) is not None:
        backend = _backend(tokenizer, max_len, tokenizer.pad_token_id)
        encs = backend.encode_batch(list(zip(a, b, strict=True)) if b else a)
        return {
            "input_ids": np.asarray([e.ids for e in encs], np.int32).reshape(-1, max_len),
            "attention_mask": np.asarray([e.attention_mask for e in encs], np.int8),
            "token_type_ids": np.asarray([e.type_ids for e in encs], np.int8),
        }
    enc = tokenizer(
        a,
        b,
        truncation=True,
        max_length=max_len,
        padding="max_length",
        return_token_type_ids=True,
        return_tensors="np",
        verbose=False,
    )
    return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}


def single_token_id(tokenizer, text: str) -> int | None:
    """Id of ``text`` when it encodes to exactly one token, else None."""
    ids = encode_texts(tokenizer, [text])[0]
    return int(ids[0]) if len(ids) == 1 else None


def special_token_ids(tokenizer) -> np.ndarray:
    """Sorted int32 ids of the special tokens plus the '.' and ',' tokens (with and without a
    leading space for byte-level vocabularies): the "no-op" tokens attention heads park on."""
    ids = set(int(i) for i in tokenizer.all_special_ids)
    for text in (".", ",", " .", " ,"):
        tid = single_token_id(tokenizer, text)
        if tid is not None:
            ids.add(tid)
    return np.asarray(sorted(ids), dtype=np.int32)


def unk_replacement(tokenizer) -> str | None:
    """Token text that WikiText's literal ``<unk>`` should become for this tokenizer, or None.

    The embedded BPE has ``<unk>`` itself; a WordPiece vocabulary gets ``[UNK]``. Nothing is
    replaced when the tokenizer's unk token doubles as another special (OPT's is ``</s>``).
    """
    unk = tokenizer.unk_token
    others = {tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token}
    others |= {tokenizer.sep_token, tokenizer.cls_token}
    if not unk or unk == "<unk>" or unk in others:
        return None
    return unk


@functools.lru_cache(maxsize=16)
def _from_local_cache(spec: str):
    """``AutoTokenizer`` for a hub name from the local cache only, or None (never the network)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(spec, local_files_only=True)
    except Exception:  # noqa: BLE001 - not in the cache, in whatever way
        return None


def hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the Hugging Face hub can be reached (False when ``HF_HUB_OFFLINE`` is set)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def tokenizer_missing(spec: str) -> str | None:
    """Why ``config.data.tokenizer=spec`` cannot be had on this machine, or None: an embedded
    tokenizer or a local directory always can; a hub name when it is in the local cache or
    the hub answers."""
    if spec.startswith("qtx:") or Path(spec).expanduser().is_dir():
        return None
    if _from_local_cache(spec) is not None or hub_reachable():
        return None
    return (
        f"the tokenizer config.data.tokenizer={spec!r} is not in the local Hugging Face cache "
        "and the hub cannot be reached; with network access, fetch it once: python -c "
        f"\"from transformers import AutoTokenizer; AutoTokenizer.from_pretrained('{spec}')\" "
        "(or set config.data.tokenizer to a local tokenizer directory)."
    )
