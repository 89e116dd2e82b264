"""The family records (qtx.models.family) and the HF converter protocol (qtx.hf.converter):
every registered family builds and runs from its record alone, and a family registered at
test time is usable everywhere a built-in one is."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qtx.quant as q
from configs import common
from qtx.errors import UserError
from qtx.evaluate.outliers import OutlierAccumulator, track_patterns
from qtx.hf import convert_vit, converter, variants
from qtx.models import SIZES, build, dummy_inputs, model_config
from qtx.models.family import (
    Family,
    families_of_task,
    family_names,
    family_record,
    register,
    unregister,
)
from qtx.models.opt import OPT_FAMILY
from qtx.run import experiment
from qtx.train.losses import HEAD_OF_TASK, TASKS, model_inputs

BUILT_IN = ("bert", "roberta", "opt", "vit", "swin", "llama")
NEW = "tinyopt"


def tiny_preset(family: str) -> str:
    return next(n for n, s in SIZES.items() if n.endswith("-tiny") and s["family"] == family)


def a_batch(cfg, b: int = 2, t: int = 6) -> dict:
    """A batch in the data pipelines' layout (every key a family may read)."""
    if family_record(cfg.family).images:
        shape = (b, cfg.image_size, cfg.image_size, cfg.num_channels)
        return {"image": jnp.ones(shape, jnp.float32), "label": jnp.zeros((b,), jnp.int32)}
    ids = jnp.arange(b * t, dtype=jnp.int32).reshape(b, t) % 50 + 3
    return {
        "input_ids": ids,
        "attention_mask": jnp.ones_like(ids),
        "token_type_ids": jnp.zeros_like(ids),
    }


@pytest.fixture
def new_family():
    """A copy of OPT's record under a new name, removed afterwards."""
    record = register(dataclasses.replace(OPT_FAMILY, name=NEW))
    yield record
    unregister(NEW)


def test_the_built_in_families_are_registered_in_order():
    assert family_names()[: len(BUILT_IN)] == BUILT_IN
    assert families_of_task("clm") == ("opt", "llama")
    assert families_of_task("mlm") == families_of_task("classification") == ("bert", "roberta")
    assert families_of_task("image") == ("vit", "swin")


@pytest.mark.parametrize("family", BUILT_IN)
def test_every_family_builds_and_runs_from_its_record(family):
    rec = family_record(family)
    assert isinstance(rec, Family) and rec.name == family
    for task in rec.tasks:
        assert task in TASKS and HEAD_OF_TASK[task] in rec.heads
    cfg = model_config(tiny_preset(family))
    model = build(cfg)
    assert isinstance(model, rec.module)
    variables = model.init(jax.random.key(0), **dummy_inputs(cfg, 2, 8))
    inputs = model_inputs(family, a_batch(cfg))
    assert ("images" in inputs) == rec.images
    assert ("token_type_ids" in inputs) == (family in ("bert", "roberta"))
    out = model.apply(variables, **inputs)
    assert np.all(np.isfinite(np.asarray(out["logits"])))
    assert cfg.block().causal == rec.causal


def test_an_unknown_family_is_a_one_line_error():
    allowed = "allowed: bert, roberta, opt, vit, swin, llama."
    with pytest.raises(UserError, match="config.model.family='gpt' is invalid; " + allowed):
        family_record("gpt")
    with pytest.raises(UserError) as err:
        model_config("opt-tiny", family="gpt")
    assert str(err.value) == f"config.model.family='gpt' is invalid; {allowed}"
    with pytest.raises(ValueError, match="already registered"):
        register(OPT_FAMILY)


def test_a_family_registered_at_run_time_needs_only_its_record(new_family):
    assert NEW in family_names() and NEW in families_of_task("clm")
    cfg = model_config("opt-tiny", family=NEW)
    ref = model_config("opt-tiny")
    inputs = dummy_inputs(cfg, 2, 8)
    variables = build(ref).init(jax.random.key(1), **dummy_inputs(ref, 2, 8))
    got = build(cfg).apply(variables, **model_inputs(NEW, a_batch(cfg)))["logits"]
    want = build(ref).apply(variables, **model_inputs("opt", a_batch(ref)))["logits"]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert set(inputs) == {"input_ids", "attention_mask"}

    # the outlier statistics of qtx.evaluate.outliers
    assert track_patterns(NEW) == track_patterns("opt")
    plan = q.QuantPlan(track=track_patterns(NEW))
    _, coll = build(cfg, plan).apply(variables, **inputs, mutable=["intermediates"])
    acc = OutlierAccumulator(NEW)
    acc.update(coll["intermediates"])
    summary = acc.summary()
    assert np.isfinite(summary["max_inf_norm"]) and np.isfinite(summary["headline_inf_norm"])
    assert any(k.endswith("residual_ffn") for k in summary["per_layer"])

    # an experiment config with config.model.family overridden
    c = common.opt_clm("gated", "tiny")
    c.model.update(family=NEW)
    exp = experiment.load(c)
    assert exp.model.family == NEW
    assert exp.plan.track == experiment.load(common.opt_clm("gated", "tiny")).plan.track

    # ... but no Hugging Face converter
    with pytest.raises(UserError, match=f"config.model.family='{NEW}' has no Hugging Face"):
        converter.converter(NEW)


def test_a_family_of_another_task_is_refused_by_name(new_family):
    c = common.opt_clm("gated", "tiny")
    c.model.update(family="bert", head="mlm")
    with pytest.raises(UserError, match="allowed families: opt, llama, tinyopt"):
        experiment.load(c)


PROTOCOL = [
    n
    for n in dir(converter.Converter)
    if not n.startswith("_") and n not in dir(object) and n != "register"
] + list(converter.Converter.__annotations__)


def test_every_converter_implements_the_protocol():
    assert {"layout", "config_from_hf", "canonical", "hf_config", "MODEL_TYPES"} <= set(PROTOCOL)
    for conv in converter.converters():
        missing = [n for n in PROTOCOL if not hasattr(conv, n)]
        assert not missing, (conv.__name__, missing)
        assert set(conv.BASE_MODELS) == set(conv.MODEL_TYPES)
    for family in BUILT_IN:
        assert family in converter.converter(family).MODEL_TYPES.values()
    assert converter.converter_of_model_type("deit") is convert_vit
    assert converter.converter_of_model_type("gpt2") is None
    assert converter.model_types() == [
        "bert", "deit", "llama", "mistral", "opt", "qwen2", "qwen3", "qwen3_5_text", "roberta",
        "swin", "vit",
    ]  # fmt: skip


def test_remote_config_names_the_base_model_classes():
    cfg = model_config("deit-t", attention={"softmax": "clipped"})
    d = {"model_type": "deit", "architectures": ["DeiTForImageClassificationWithTeacher"]}
    auto = variants.remote_config(cfg, d)["auto_map"]
    assert auto == {
        "AutoConfig": "configuration_qtx.QtxDeiTConfig",
        "AutoModel": "modeling_qtx.QtxDeiTModel",
        "AutoModelForImageClassification": (
            "modeling_qtx.QtxDeiTForImageClassificationWithTeacher"
        ),
    }
    d = {"model_type": "opt", "architectures": ["OPTForCausalLM"]}
    auto = variants.remote_config(model_config("opt-tiny"), d)["auto_map"]
    assert auto["AutoConfig"] == "configuration_qtx.QtxOPTConfig"
    assert auto["AutoModelForCausalLM"] == "modeling_qtx.QtxOPTForCausalLM"
