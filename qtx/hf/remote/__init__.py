"""PyTorch modeling code shipped inside exported Hugging Face directories.

:func:`qtx.hf.export` copies ``configuration_qtx.py``, ``attention_qtx.py``,
``hadamard_qtx.py``, ``modeling_qtx.py`` and ``quantization_qtx.py`` next to the weights of a
model whose attention HF cannot represent (or that is rotated), so
``AutoModel*.from_pretrained(dir, trust_remote_code=True)`` runs it. They import torch and
transformers only, never qtx, and are not imported by qtx itself.
"""

import pathlib
import shutil

DIR = pathlib.Path(__file__).resolve().parent
FILES = ("configuration_qtx.py", "attention_qtx.py", "hadamard_qtx.py", "modeling_qtx.py")
QUANT_FILE = "quantization_qtx.py"


def copy_code(path: str, quantization: bool = False) -> None:
    """Copies the modeling and configuration code (and the quantization code) into ``path``."""
    for name in (*FILES, QUANT_FILE) if quantization else FILES:
        shutil.copyfile(DIR / name, f"{path}/{name}")


def copy_all(path: str) -> None:
    """Copies the modeling, configuration and quantization code into ``path``."""
    copy_code(path, quantization=True)
