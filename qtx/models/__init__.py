"""BERT, RoBERTa, OPT, ViT/DeiT and Swin built from shared blocks, chosen by name."""

from qtx.models.bert import Bert
from qtx.models.config import ModelConfig, model_config_from_dict
from qtx.models.opt import OPT
from qtx.models.registry import SIZES, build, dummy_inputs, model_config
from qtx.models.swin import Swin
from qtx.models.vit import ViT

__all__ = [
    "OPT",
    "SIZES",
    "Swin",
    "Bert",
    "ModelConfig",
    "ViT",
    "build",
    "dummy_inputs",
    "model_config",
    "model_config_from_dict",
]
