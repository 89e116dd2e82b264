"""Hugging Face interop: load local HF checkpoints into qtx models and export them back.

* ``load(path, head=, attention=, plan=, dtype=) -> (model, variables)``;
* ``config_from_hf(hf_config) -> ModelConfig`` and ``params_from_hf(family, sd, cfg)``;
* ``export(path, cfg, variables)`` writes a ``save_pretrained``-style directory; attention
  variants ship qtx's PyTorch code (``remote/``, ``trust_remote_code=True``, see ``variants``);
* ``quant_sidecar.write_sidecar(path, cfg, plan, variables)``: the quantizers of a calibrated
  or QAT-trained model, applied in PyTorch by ``remote/quantization_qtx.py``;
* ``load_tokenizer(path)``: the directory's ``AutoTokenizer``.

Families: BERT, RoBERTa, OPT, ViT, DeiT, Swin and the LLaMA-style decoders (Llama, Mistral,
Qwen2, Qwen3, Qwen3.5 text models; ``convert_llama``), see ``convert_*`` for the key mappings,
each translated by a converter module of the protocol ``converter.Converter``, found with
``converter.converter(family)``.
"""

from qtx.hf.export import export, export_problems, state_dict_to_hf
from qtx.hf.io import load_tokenizer, read_config, read_state_dict
from qtx.hf.load import config_from_hf, load, params_from_hf, pretrained_params

__all__ = [
    "config_from_hf",
    "export",
    "export_problems",
    "load",
    "load_tokenizer",
    "params_from_hf",
    "pretrained_params",
    "read_config",
    "read_state_dict",
    "state_dict_to_hf",
]
