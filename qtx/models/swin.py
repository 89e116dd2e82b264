"""Swin Transformer (Liu et al., 2021): windowed attention, shifted windows, relative position
bias and patch merging, with the same named points as the other families.

Stage ``s`` (width ``D * 2**s``) has blocks ``stage_s/layer_j``; each block is a pre-LN layer
whose attention runs inside ``w x w`` windows (shifted by ``w // 2`` in odd blocks)::

    x = x + reverse(Attn(partition(shift(LN(x))), bias + shift mask))
    x = x + FFN(LN(x))

The block's points are those of ``qtx.nn.transformer`` (``attn_ln``, ``attn/q`` ..
``attn/context``, ``residual_attn``, ``ffn_ln``, ``ffn/...``, ``residual_ffn``); the attention
sees (B * windows, w * w, C) and ``attn/scores`` includes the relative position bias. Besides::

    embed/patch/weight, embed/ln/weight, embed/ln/out      patch embedding and its LayerNorm
    stage_s/merge/ln/..., stage_s/merge/reduction/weight   patch merging (all but the last stage)
    final_ln/weight, final_ln/out
    classifier/in, classifier/dense/weight, classifier/logits   (on the mean over tokens)

The relative position bias tables (``stage_s/layer_j/rel_pos/table``, ((2w-1)^2, H)) are plain
parameters. As Hugging Face's ``SwinModel``: a stage whose resolution is at most the window
runs one unshifted window over it; feature maps are zero-padded to a multiple of the window
after the LayerNorm (the padded tokens are attended to, as in the reference) and odd sizes
are padded before merging.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from qtx.errors import UserError
from qtx.models.config import ModelConfig
from qtx.models.vit import VIT_FAMILY
from qtx.nn.attention import MultiHeadAttention
from qtx.nn.heads import Classifier
from qtx.nn.layers import Dense, LayerNorm, PatchEmbed
from qtx.nn.transformer import FFN, BlockConfig, drop_path
from qtx.quant import QuantPlan, QuantPoint


def relative_position_index(window: int) -> np.ndarray:
    """(w*w, w*w) int32: row-major index into the ((2w-1)^2, H) table of the offset between
    tokens i and j of a window: ``(dy + w - 1) * (2w - 1) + dx + w - 1``."""
    ys, xs = np.meshgrid(np.arange(window), np.arange(window), indexing="ij")
    coords = np.stack([ys.ravel(), xs.ravel()])  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :] + (window - 1)  # (2, N, N)
    return (rel[0] * (2 * window - 1) + rel[1]).astype(np.int32)


def shift_mask(height: int, width: int, window: int, shift: int) -> np.ndarray:
    """(windows, w*w, w*w) bool, True where two tokens of a shifted window come from the same
    region of the (padded) map, so they may attend to each other."""

    def regions(n):
        idx = np.arange(n)
        return (idx >= n - window).astype(np.int32) + (idx >= n - shift).astype(np.int32)

    ids = regions(height)[:, None] * 3 + regions(width)[None, :]  # (H, W)
    ids = partition(ids[None, :, :, None], window)[..., 0]  # (windows, N)
    return ids[:, :, None] == ids[:, None, :]


def partition(x, window: int):
    """(B, H, W, C) -> (B * H/w * W/w, w*w, C), windows in row-major order."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def reverse(windows, window: int, height: int, width: int):
    """Inverse of :func:`partition`: (B * windows, w*w, C) -> (B, H, W, C)."""
    c = windows.shape[-1]
    x = windows.reshape(-1, height // window, width // window, window, window, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, height, width, c)


def window_and_shift(resolution: tuple[int, int], window: int, shift: int) -> tuple[int, int]:
    """The window and shift a block uses at ``resolution``: one unshifted window covering the
    map when it is no larger than the window (as Hugging Face's Swin)."""
    if min(resolution) <= window:
        return min(resolution), 0
    return window, shift


class RelativePositionBias(nn.Module):
    """(H, w*w, w*w) bias from a learned ((2w-1)^2, H) table, initialised to zeros."""

    window: int
    num_heads: int

    @nn.compact
    def __call__(self):
        size = (2 * self.window - 1) ** 2
        table = self.param("table", nn.initializers.zeros, (size, self.num_heads))
        n = self.window * self.window
        return (
            table[relative_position_index(self.window).ravel()].reshape(n, n, -1).transpose(2, 0, 1)
        )


class SwinBlock(nn.Module):
    """One pre-LN block on ``x`` (B, H, W, C) with windowed attention; see module docstring."""

    cfg: BlockConfig
    plan: QuantPlan = QuantPlan()
    window: int = 7
    shift: int = 0

    def setup(self):
        c, p = self.cfg, self.plan
        self.attn = MultiHeadAttention(
            c.num_heads,
            c.attention,
            p,
            use_bias=c.use_bias,
            dropout=c.attention_dropout,
            init_std=c.init_std,
            dtype=c.dtype,
            kernel=c.attention_kernel,
        )
        self.rel_pos = RelativePositionBias(self.window, c.num_heads)
        self.ffn = FFN(c, p)
        # the attention input is padded and windowed first (stays float in an integer plan)
        self.attn_ln = LayerNorm(p, c.ln_eps)
        self.ffn_ln = LayerNorm(p, c.ln_eps, operand=True)
        self.residual_attn = QuantPoint(p)
        self.residual_ffn = QuantPoint(p)
        self.drop = nn.Dropout(c.dropout)

    def __call__(self, x, deterministic: bool = True):
        c, w, shift = self.cfg, self.window, self.shift
        b, height, width, d = x.shape

        def branch(y):
            y = self.drop(y, deterministic=deterministic or c.dropout == 0)
            return drop_path(self, y, c.drop_path, deterministic)

        y = self.attn_ln(x)
        hp, wp = height + (-height) % w, width + (-width) % w
        y = jnp.pad(y, ((0, 0), (0, hp - height), (0, wp - width), (0, 0)))
        mask = None
        if shift:
            y = jnp.roll(y, (-shift, -shift), axis=(1, 2))
            allowed = shift_mask(hp, wp, w, shift)  # (windows, N, N)
            n = allowed.shape[0]
            mask = jnp.broadcast_to(allowed[None, :, None], (b, n, 1, w * w, w * w))
            mask = mask.reshape(b * n, 1, w * w, w * w)
        a = self.attn(partition(y, w), mask, None, deterministic, score_bias=self.rel_pos()[None])
        a = reverse(a, w, hp, wp)
        if shift:
            a = jnp.roll(a, (shift, shift), axis=(1, 2))
        x = self.residual_attn(x + branch(a[:, :height, :width]))
        f = branch(self.ffn(self.ffn_ln(x), deterministic))
        return self.residual_ffn(x + f)


class PatchMerging(nn.Module):
    """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C): the four 2x2 neighbours concatenated
    (order (0,0), (1,0), (0,1), (1,1)), LayerNorm ``ln`` and ``reduction`` (4C -> 2C, no bias)."""

    plan: QuantPlan = QuantPlan()
    ln_eps: float = 1e-5
    init_std: float = 0.02
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
        x = jnp.concatenate([x[:, r::2, s::2] for s in range(2) for r in range(2)], axis=-1)
        x = LayerNorm(self.plan, self.ln_eps, operand=True, name="ln")(x)
        init = nn.initializers.normal(self.init_std)
        return Dense(2 * c, self.plan, False, init, self.dtype, name="reduction")(x)


class SwinEmbeddings(nn.Module):
    """``images`` (B, H, W, C) -> (B, H/p, W/p, D): patches (``patch``), LayerNorm (``ln``)."""

    cfg: ModelConfig
    plan: QuantPlan = QuantPlan()

    @nn.compact
    def __call__(self, images, deterministic: bool = True):
        c, p = self.cfg, self.plan
        h = PatchEmbed(c.hidden_size, c.patch_size, p, c.compute_dtype, name="patch")(images)
        h = LayerNorm(p, c.ln_eps, name="ln")(h)
        h = nn.Dropout(c.dropout)(h, deterministic=deterministic or c.dropout == 0)
        grid = c.image_size // c.patch_size
        return h.reshape(h.shape[0], grid, grid, -1)


class SwinStage(nn.Module):
    """The blocks ``layer_j`` of one stage, then ``merge`` (a :class:`PatchMerging`) when
    ``downsample``. ``blocks``: ``(block config, window, shift, resolution)`` per block."""

    blocks: tuple
    downsample: bool
    cfg: ModelConfig
    plan: QuantPlan = QuantPlan()

    @nn.compact
    def __call__(self, h, deterministic: bool = True):
        c, p = self.cfg, self.plan
        block_cls = nn.remat(SwinBlock, static_argnums=(2,)) if c.remat else SwinBlock
        for j, (block, w, shift, _) in enumerate(self.blocks):
            h = block_cls(block, p, w, shift, name=f"layer_{j}")(h, deterministic)
        if self.downsample:
            h = PatchMerging(p, c.ln_eps, c.init_std, c.compute_dtype, name="merge")(h)
        return h


def stage_blocks(cfg: ModelConfig) -> list[tuple[BlockConfig, int, int, tuple[int, int]]]:
    """Per block, in order: ``(block config, window, shift, resolution)``. Drop path grows
    linearly from 0 to ``cfg.drop_path`` over all blocks (as Swin)."""
    grid = cfg.image_size // cfg.patch_size
    res = (grid, grid)
    total = sum(cfg.depths)
    out, i = [], 0
    for s, (depth, heads) in enumerate(zip(cfg.depths, cfg.stage_heads, strict=True)):
        ratio = cfg.intermediate_size / cfg.hidden_size
        dim = cfg.hidden_size << s
        for j in range(depth):
            rate = cfg.drop_path * i / max(total - 1, 1)
            block = dataclasses.replace(
                cfg.block(),
                hidden_size=dim,
                num_heads=heads,
                intermediate_size=int(ratio * dim),
                pre_ln=True,
                drop_path=rate,
            )
            w, shift = window_and_shift(res, cfg.window_size, cfg.window_size // 2 * (j % 2))
            out.append((block, w, shift, res))
            i += 1
        res = ((res[0] + 1) // 2, (res[1] + 1) // 2)
    return out


class Swin(nn.Module):
    """``images`` (B, H, W, C) -> dict with ``last_hidden_state`` (B, L, D * 2**(S-1)) after
    the final LayerNorm, ``pooled`` (B, D * 2**(S-1)), ``logits`` (B, labels) and
    ``hidden_states`` (the embedding output and each stage's output, (B, L_s, C_s)) when
    ``output_hidden_states``."""

    cfg: ModelConfig
    plan: QuantPlan = QuantPlan()

    @nn.compact
    def __call__(self, images, deterministic: bool = True, output_hidden_states: bool = False):
        c, p = self.cfg, self.plan
        size = (c.image_size, c.image_size, c.num_channels)
        if images.ndim != 4 or tuple(images.shape[1:]) != size:
            raise UserError(
                f"images must be (B, {c.image_size}, {c.image_size}, {c.num_channels}) for "
                f"config.model.image_size={c.image_size} and num_channels={c.num_channels}; got "
                f"shape {tuple(images.shape)}."
            )
        h = SwinEmbeddings(c, p, name="embed")(images, deterministic)
        states = [h]
        blocks = stage_blocks(c)
        for s, depth in enumerate(c.depths):
            stage, blocks = blocks[:depth], blocks[depth:]
            last = s == len(c.depths) - 1
            h = SwinStage(tuple(stage), not last, c, p, name=f"stage_{s}")(h, deterministic)
            states.append(h)
        h = h.reshape(h.shape[0], -1, h.shape[-1])
        h = LayerNorm(p, c.ln_eps, name="final_ln")(h)
        pooled = jnp.mean(h.astype(jnp.float32), axis=1)
        out = {"last_hidden_state": h, "pooled": pooled}
        if output_hidden_states:
            out["hidden_states"] = tuple(x.reshape(x.shape[0], -1, x.shape[-1]) for x in states)
        if c.head == "classification":
            init = nn.initializers.normal(c.init_std)
            out["logits"] = Classifier(c.num_labels, p, init, c.compute_dtype, name="classifier")(
                pooled
            )
        return out


def check_swin(cfg: ModelConfig, bad) -> None:
    """Swin's stages: ``depths`` and ``stage_heads`` as tuples of positive integers, heads
    dividing the stage widths; sets ``num_layers = sum(depths)``, ``num_heads = heads[0]``."""
    for f in ("depths", "stage_heads"):
        v = getattr(cfg, f)
        if not isinstance(v, tuple):  # lists from a config file or the command line
            object.__setattr__(cfg, f, tuple(int(x) for x in v))
    depths, heads = cfg.depths, cfg.stage_heads
    if not depths or min(depths) < 1:
        bad("depths", "a non-empty tuple of positive integers (blocks per stage)")
    if len(heads) != len(depths) or min(heads) < 1:
        bad("stage_heads", f"{len(depths)} positive integers (one per stage of depths)")
    for s, h in enumerate(heads):
        if (cfg.hidden_size << s) % h:
            bad("stage_heads", "divisors of the stage widths hidden_size * 2**stage")
    if cfg.window_size < 1:
        bad("window_size", "a positive integer")
    object.__setattr__(cfg, "num_layers", sum(depths))
    object.__setattr__(cfg, "num_heads", heads[0])


SWIN_FAMILY = dataclasses.replace(
    VIT_FAMILY,
    name="swin",
    module=Swin,
    noop_tokens="",  # no class or special token
    no_scan="its stages differ in width",
    tokens_per_example=None,
    check=check_swin,
)
