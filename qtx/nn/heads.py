"""Output heads shared by several model families.

:class:`Classifier` is the sequence / image classification head of BERT, RoBERTa, ViT (also
DeiT's distillation head) and Swin: one quantized Dense from the pooled features (B, D) to
the logits (B, num_labels), float32. Points ``in`` (the operand of the matmul),
``dense/weight`` and ``logits``.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from qtx.nn.layers import Dense
from qtx.quant import QuantPlan, QuantPoint


class Classifier(nn.Module):
    """``dense(x)`` -> logits; points ``in``, ``dense/weight``, ``logits``."""

    num_labels: int
    plan: QuantPlan = QuantPlan()
    kernel_init: object = nn.initializers.normal(0.02)
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = QuantPoint(self.plan, name="in", operand=True)(x)
        x = Dense(self.num_labels, self.plan, True, self.kernel_init, self.dtype, name="dense")(x)
        return QuantPoint(self.plan, name="logits")(x.astype(jnp.float32))
