"""``make_pipeline``: deterministic, process-sharded input pipelines for qtx.

    pipe = make_pipeline(config.data, task="mlm", process_index=jax.process_index(),
                         process_count=jax.process_count())
    for step, batch in zip(range(start, total), pipe.train_iterator(start)): ...

Tasks and batch keys (NumPy; ids int32, images float32; B = global batch / process count):

- ``clm``: ``input_ids`` (B,T), ``attention_mask`` (B,T) ones.
- ``mlm``: ``input_ids`` (B,T) masked, ``targets`` (B,T), ``weights`` (B,T) f32,
  ``attention_mask`` (B,T), ``token_type_ids`` (B,T) zeros.
- ``classification``: ``input_ids``, ``attention_mask``, ``token_type_ids`` (B,T),
  ``label`` (B,) int32 (float32 for glue/stsb).
- ``image``: ``image`` (B,H,W,C) f32 normalized, ``label`` (B,) int32, and ``label_soft``
  (B,num_classes) f32 in training when mixup, cutmix or label smoothing is on.

Eval batches also carry ``example_mask`` (B,) f32: the last partial eval batch is padded, and
padded rows have ``example_mask`` 0 (and zero ``attention_mask``/``weights``).

Determinism: the training batch of step ``s`` is a function of ``(config.data.seed, s)``
only, so ``train_iterator(start_step=s)`` resumes exactly. Shards of all processes
concatenate to the global batch (image mixing of TFDS sources pairs rows within a shard;
with ``repeated_aug`` > 1, process k of p holds global rows k, k + p, ..., so the shards
concatenate to a fixed permutation of it).

``config.data`` fields (all optional; defaults from ``qtx.data.config.DEFAULTS``):

================= ===================== ==================================================
field             default               meaning
================= ===================== ==================================================
name              per task              clm/mlm ``wikitext2_embedded``, classification
                                        ``sst2_local``, image ``digits``. Text sources:
                                        wikitext2_embedded, wikitext2_local, wikitext2,
                                        wikitext103, wikipedia, wiki40b, text_files, mixed
                                        with '+' (e.g. ``wiki40b+text_files``). GLUE:
                                        ``glue/<task>`` (sst2 mnli qnli rte mrpc qqp stsb
                                        cola), sst2_local. Images: digits, mnist_local,
                                        mnist, cifar10, imagenette, imagenet2012.
tokenizer         per task              ``qtx:bpe`` (clm), ``qtx:wordpiece`` (mlm,
                                        classification), a hub name or a local dir.
seq_len           128                   tokens per LM block / GLUE row (>= 8).
batch_size        16                    GLOBAL training batch; divisible by process count.
eval_batch_size   batch_size            global eval batch; divisible by process count.
seed              0                     data order, masking and augmentation seed.
mlm_probability   0.15                  MLM selection rate, in (0, 1).
local_dir         None                  folder like ../shared/data for ``*_local`` names;
                                        else $QTX_DATA_DIR, else ../shared/data or
                                        ../../shared/data (relative to the cwd).
data_dir          None                  TFDS data dir (None: the TFDS default).
text_files        None                  glob or list of globs for ``text_files``; when given,
                                        they are mixed into any clm/mlm source (``wiki40b``
                                        becomes ``wiki40b+text_files``: BookCorpus + Wikipedia).
max_eval_batches  None                  cap on eval batches (None: the whole split).
shuffle_buffer    10000                 block shuffle buffer of streamed text sources.
image_size        None                  output H=W (None: native, 224 for ImageNet-family).
channels          None                  1 or 3 (None: the source's; 1 -> 3 repeats).
crop_scale        None                  random-resized-crop area range (None: per dataset,
                                        (0.08, 1) for ImageNet-family, (0.35, 1) for
                                        CIFAR-10, no crop for digits/MNIST).
crop_pct          None                  eval center-crop fraction (None: 0.875 ImageNet-
                                        family, else 1.0).
hflip             None                  horizontal flips (None: on for natural images, off
                                        for digits/MNIST).
mixup_alpha       0.0                   mixup Beta alpha (DeiT: 0.8).
cutmix_alpha      0.0                   cutmix Beta alpha (DeiT: 1.0).
mix_switch_prob   0.5                   chance of cutmix when both are on.
label_smoothing   0.0                   (DeiT: 0.1), gives ``label_soft``.
random_erase      0.0                   random erasing probability (DeiT: 0.25).
randaugment       ''                    RandAugment spec, '' = off; 'rand-' + sections
                                        m<magnitude> n<ops> mstd<std> mmax<max> inc<0|1>
                                        p<prob> (DeiT: 'rand-m9-mstd0.5-inc1'; see
                                        ``qtx.data.randaugment``).
repeated_aug      1                     copies of each image per epoch, each augmented
                                        independently; epochs keep N // B steps (DeiT: 3).
                                        It is also Quantization Variation's multi-crop:
                                        with a crop_scale, 4 gives 4 random-resized crops
                                        of each image in the same batch.
glue_max_len      None                  GLUE row length (None: seq_len).
holdout           None                  digits / mnist_local: the number of last images
                                        held out for evaluation (None: 297 / 1000). GLUE:
                                        n train rows (a fixed choice, the same for every
                                        seed) leave training/calibration and are the eval
                                        rows instead of the dev split (None: dev split).
length_buckets    ()                    GLUE only: increasing row widths ending at
                                        glue_max_len (or seq_len); training batches are
                                        grouped by length over pools of 64 steps and cut to
                                        the smallest width >= their longest row (): off.
================= ===================== ==================================================

Source details live in ``text_sources`` (LM corpora), ``glue`` and ``vision``.
"""

from __future__ import annotations

from typing import Any

from qtx.data.base import Pipeline
from qtx.data.config import DEFAULTS, DataSpec, resolve_spec

__all__ = ["DEFAULTS", "DataSpec", "Pipeline", "make_pipeline"]


def make_pipeline(
    data_cfg: Any, *, task: str, process_index: int = 0, process_count: int = 1
) -> Pipeline:
    """Validate ``config.data`` (ValueError naming the field) and build the pipeline."""
    spec = resolve_spec(data_cfg, task, process_index, process_count)
    if task in ("clm", "mlm"):
        from qtx.data.text import build_lm_pipeline

        return build_lm_pipeline(spec)
    if task == "classification":
        from qtx.data.glue import build_glue_pipeline

        return build_glue_pipeline(spec)
    from qtx.data.vision import build_image_pipeline

    return build_image_pipeline(spec)
