"""RMSNorm (LLaMA, Qwen): ``y = x / sqrt(mean(x^2) + eps) * g`` over the last axis, float32.

Kinds (``kind``): ``rmsnorm`` with the gain ``g = w`` (weights start at 1; Llama, Mistral,
Qwen2, Qwen3) and ``rmsnorm_zero_centered`` with ``g = 1 + w`` (weights start at 0; Gemma,
Qwen3-Next, Qwen3.5). The point ``weight`` sees the gain ``g`` itself, ``out`` the output
(both the shape of the normalised axis / the input).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from qtx.errors import UserError
from qtx.quant import QuantPlan, QuantPoint

RMS_NORMS = ("rmsnorm", "rmsnorm_zero_centered")
NORMS = ("layernorm", *RMS_NORMS)


class RMSNorm(nn.Module):
    """``x`` (..., D) -> float32 (..., D); ``mask`` (leading axes, True at real tokens)
    restricts the ``out`` point's statistics to real tokens. ``out_point=False`` leaves the
    output without a point (q/k norms, whose output points come after RoPE)."""

    plan: QuantPlan = QuantPlan()
    eps: float = 1e-6
    kind: str = "rmsnorm"
    operand: bool = False  # the output feeds matmuls (a QArray in an integer plan)
    out_point: bool = True

    @nn.compact
    def __call__(self, x, mask=None):
        if self.kind not in RMS_NORMS:
            raise UserError(
                f"config.model.norm={self.kind!r} is invalid here; allowed: {', '.join(RMS_NORMS)}."
            )
        d = x.shape[-1]
        centred = self.kind == "rmsnorm_zero_centered"
        init = nn.initializers.zeros if centred else nn.initializers.ones
        w = self.param("scale", init, (d,), jnp.float32)
        gain = QuantPoint(self.plan, "weight", channel_axis=-1, name="weight")(
            1.0 + w if centred else w
        )
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), -1, keepdims=True) + self.eps) * gain
        if not self.out_point:
            return y
        return QuantPoint(self.plan, name="out", operand=self.operand)(y, mask)
