"""ViT and DeiT (pre-LN encoders over image patches) with a classification head.

Points besides the layers' (see ``qtx.nn.transformer``)::

    embed/patch/weight            patch-embedding kernel (p, p, C, D)
    embed/position/weight         learned positions (1, N + 1 [+ 1], D)
    embed/sum                     [CLS, (DIST,) patches] + positions
    final_ln/weight, final_ln/out
    classifier/in, classifier/dense/weight, classifier/logits        (on the CLS token)
    dist_classifier/in, dist_classifier/dense/weight, dist_classifier/logits  (DeiT distilled)

The class and distillation tokens (``embed/cls``, ``embed/dist``) are plain parameters.
With a distillation token, ``logits`` is the mean of both heads (DeiT's inference rule) and
``cls_logits`` / ``dist_logits`` are returned as well.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from qtx.errors import UserError
from qtx.models.config import ModelConfig
from qtx.models.family import PRE_LN_OUTLIER_POINTS, Family, image_dummy_inputs, image_inputs
from qtx.nn.heads import Classifier
from qtx.nn.layers import LayerNorm, PatchEmbed
from qtx.nn.transformer import run_layers
from qtx.quant import QuantPlan, QuantPoint


class ViTEmbeddings(nn.Module):
    cfg: ModelConfig
    plan: QuantPlan = QuantPlan()

    @nn.compact
    def __call__(self, images, deterministic=True):
        c, p = self.cfg, self.plan
        h = PatchEmbed(c.hidden_size, c.patch_size, p, c.compute_dtype, name="patch")(images)
        b = h.shape[0]
        init = nn.initializers.normal(c.init_std)
        tokens = [self.param("cls", init, (1, 1, c.hidden_size))]
        if c.distillation_token:
            tokens.append(self.param("dist", init, (1, 1, c.hidden_size)))
        tokens = [jnp.broadcast_to(t, (b, 1, c.hidden_size)).astype(h.dtype) for t in tokens]
        h = jnp.concatenate(tokens + [h], axis=1)
        pos = PositionTable(h.shape[1], c.hidden_size, p, init, name="position")()
        h = QuantPoint(p, name="sum")(h + pos.astype(h.dtype))
        return nn.Dropout(c.dropout)(h, deterministic=deterministic or c.dropout == 0)


class PositionTable(nn.Module):
    """Learned positions (1, N, D) behind a ``weight`` point."""

    num: int
    features: int
    plan: QuantPlan = QuantPlan()
    init: object = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self):
        table = self.param("embedding", self.init, (1, self.num, self.features))
        return QuantPoint(self.plan, "weight", channel_axis=-1, name="weight")(table)


class ViT(nn.Module):
    """``images`` (B, H, W, C) -> dict with ``last_hidden_state`` (B, N + 1, D) after the
    final LayerNorm, ``logits`` (B, L) and ``hidden_states`` when ``output_hidden_states``."""

    cfg: ModelConfig
    plan: QuantPlan = QuantPlan()

    @nn.compact
    def __call__(self, images, deterministic: bool = True, output_hidden_states: bool = False):
        c, p = self.cfg, self.plan
        if images.ndim != 4 or images.shape[-1] != c.num_channels:
            raise UserError(
                f"images must be (B, H, W, {c.num_channels}) for config.model.num_channels="
                f"{c.num_channels}; got shape {tuple(images.shape)}."
            )
        h = ViTEmbeddings(c, p, name="embed")(images, deterministic)
        h, states = run_layers(
            c.block(),
            p,
            c.num_layers,
            h,
            None,
            None,
            deterministic,
            c.remat,
            output_hidden_states,
            linear_drop_path=True,  # DeiT: stochastic depth grows linearly to drop_path
            scan=c.scan_layers,
            remat_policy=c.remat_policy,
        )
        h = LayerNorm(p, c.ln_eps, name="final_ln")(h)
        out = {"last_hidden_state": h}
        if output_hidden_states:
            out["hidden_states"] = states
        if c.head == "classification":
            init = nn.initializers.normal(c.init_std)
            head = lambda n: Classifier(c.num_labels, p, init, c.compute_dtype, name=n)  # noqa
            logits = head("classifier")(h[:, 0])
            if c.distillation_token:
                dist = head("dist_classifier")(h[:, 1])
                out["cls_logits"], out["dist_logits"] = logits, dist
                logits = (logits + dist) / 2
            out["logits"] = logits
        return out


def vit_tokens(cfg: ModelConfig, seq_len: int) -> int:
    """Tokens of one image: patches + class (+ distillation) token."""
    return cfg.num_patches + 1 + int(cfg.distillation_token)


VIT_FAMILY = Family(
    name="vit",
    module=ViT,
    heads=("classification", "none"),
    tasks=("image",),
    model_inputs=image_inputs,
    dummy_inputs=image_dummy_inputs,
    kurtosis_points=PRE_LN_OUTLIER_POINTS,
    inf_norm_points=PRE_LN_OUTLIER_POINTS,
    headline_point=r"residual_ffn$",
    images=True,
    noop_tokens="class",
    tokens_per_example=vit_tokens,
)
