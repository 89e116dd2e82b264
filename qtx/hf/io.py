"""Reading and writing local Hugging Face checkpoint directories (no hub access).

A directory holds ``config.json`` and the weights as ``model.safetensors``,
``pytorch_model.bin`` or a sharded variant of either (``*.index.json``). Tensors come back as
numpy arrays in torch layout (Linear weights (out, in)); safetensors files are parsed here, so
bfloat16 checkpoints load without torch (via ``ml_dtypes``); ``.bin`` files need torch.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping

import ml_dtypes
import numpy as np

from qtx.errors import UserError

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
TORCH_BIN = "pytorch_model.bin"

_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


def _check_dir(path) -> str:
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise UserError(
            f"Hugging Face checkpoint directory {path!r} does not exist; pass a local directory "
            "written by save_pretrained (this loader never downloads)."
        )
    return path


def read_config(path) -> dict:
    """``config.json`` of the checkpoint directory ``path`` as a dict."""
    file = os.path.join(_check_dir(path), CONFIG)
    if not os.path.isfile(file):
        raise UserError(f"{path!r} has no {CONFIG}; it is not a Hugging Face checkpoint dir.")
    with open(file) as f:
        return json.load(f)


def read_safetensors(file) -> dict[str, np.ndarray]:
    """All tensors of one ``.safetensors`` file, as numpy arrays of the stored dtype."""
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise UserError(f"tensor {name!r} in {file} has unsupported dtype {info['dtype']}.")
        start, end = info["data_offsets"]
        arr = np.frombuffer(data[start:end], dtype=_ST_DTYPES[info["dtype"]])
        out[name] = arr.reshape(info["shape"]).copy()
    return out


def write_safetensors(file, tensors: Mapping[str, np.ndarray]) -> None:
    """Writes ``tensors`` as a torch-loadable ``.safetensors`` file (metadata format=pt)."""
    header, offset, blobs = {"__metadata__": {"format": "pt"}}, 0, []
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        if arr.dtype not in _ST_NAMES:
            raise UserError(f"tensor {name!r} has unsupported dtype {arr.dtype}.")
        blob = arr.tobytes()
        header[name] = {
            "dtype": _ST_NAMES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # keep the data 8-byte aligned
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for blob in blobs:
            f.write(blob)


def _read_torch_bin(file) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is a test dependency
        raise UserError(f"reading {file} needs torch; install it or use safetensors.") from e
    sd = torch.load(file, map_location="cpu", weights_only=True)
    out = {}
    for k, t in sd.items():
        t = t.detach()
        out[k] = (t.float() if t.dtype == torch.bfloat16 else t).numpy().copy()
    return out


def _read_sharded(path, index_name, reader) -> dict[str, np.ndarray]:
    with open(os.path.join(path, index_name)) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    out = {}
    for name in files:
        out.update(reader(os.path.join(path, name)))
    return out


def read_state_dict(path) -> dict[str, np.ndarray]:
    """The checkpoint's tensors ``{hf_key: array}`` (torch layout), from safetensors if present,
    else ``pytorch_model.bin`` (sharded checkpoints included)."""
    path = _check_dir(path)
    candidates = [
        (SAFETENSORS, read_safetensors, False),
        (SAFETENSORS + ".index.json", read_safetensors, True),
        (TORCH_BIN, _read_torch_bin, False),
        (TORCH_BIN + ".index.json", _read_torch_bin, True),
    ]
    for name, reader, sharded in candidates:
        if os.path.isfile(os.path.join(path, name)):
            if sharded:
                return _read_sharded(path, name, reader)
            return reader(os.path.join(path, name))
    raise UserError(
        f"{path!r} has no weights; expected one of {', '.join(c[0] for c in candidates)}."
    )


def load_tokenizer(path):
    """``transformers.AutoTokenizer`` of the local directory ``path`` (no download)."""
    path = _check_dir(path)
    names = (
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
        "vocab.json",
        "spiece.model",
        "sentencepiece.bpe.model",
    )
    if not any(os.path.isfile(os.path.join(path, n)) for n in names):
        raise UserError(
            f"{path!r} has no tokenizer files (one of {', '.join(names)}); save the tokenizer "
            "with tokenizer.save_pretrained(path) next to the weights."
        )
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)
