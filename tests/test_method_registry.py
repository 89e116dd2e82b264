"""The method registry: every name resolves to a record of its kind, unknown names fail in one
line naming the config field and the allowed names, and a method registered under a new name
is what ``evaluate_setup`` runs when a config asks for it (and only then)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import bert_glue_os
from qtx.errors import UserError
from qtx.methods import registry
from qtx.methods.kinds import ESTIMATORS, QATInit, QATTerm, Reparametrisation
from qtx.methods.outlier_suppression import MINMAX, PAPER_TABLE
from qtx.models import build, dummy_inputs, model_config
from qtx.run import experiment
from qtx.run.ptq import evaluate_setup
from qtx.train.steps import StepHooks

CFG = model_config(
    "opt-tiny",
    vocab_size=256,
    hidden_size=32,
    num_layers=1,
    num_heads=2,
    intermediate_size=64,
    max_positions=32,
    init_std=0.1,
)


def batch(seed):
    ids = np.random.default_rng(seed).integers(3, CFG.vocab_size, size=(4, 16), dtype=np.int32)
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones(ids.shape, jnp.int32)}


def os_tiny(**eval_overrides):
    """``configs/bert_glue_os.py:tiny`` with ``config.eval`` fields replaced."""
    c = bert_glue_os.get_config("tiny")
    for k, v in eval_overrides.items():
        setattr(c.eval, k, v)
    return c


def test_every_registered_name_resolves_to_its_kind():
    for name, m in registry.PTQ.items():
        assert registry.ptq_method(name) is m and m.name == name and m.paper
        assert m.estimator in ESTIMATORS and callable(m.calibrate) and callable(m.rules)
        assert m.reparametrisation is None or isinstance(m.reparametrisation, Reparametrisation)
    for name, r in registry.REPARAMETRISATIONS.items():
        assert registry.reparametrisation(name) is r and isinstance(r, Reparametrisation)
        cfg = model_config("llama-tiny", {"tie_embeddings": False}) if name == "rotation" else CFG
        assert r.name == name and r.paper and not r.applied(cfg)
        assert r.applied(cfg.replace(**{r.config_field: True}))
    for name, i in registry.QAT_INITS.items():
        assert registry.qat_init(name) is i and isinstance(i, QATInit) and i.name == name
    for name, t in registry.QAT_TERMS.items():
        assert registry.qat_term(name) is t and isinstance(t, QATTerm) and t.name == name
    # the paper's table is registered, in its order; the defaults are registered too
    assert [n for n in registry.PTQ if n in PAPER_TABLE] == list(PAPER_TABLE)
    assert experiment.TRAIN_DEFAULTS["qat_init"] in registry.QAT_INITS
    assert (
        registry.PTQ["outlier_suppression"].reparametrisation
        is registry.REPARAMETRISATIONS["gamma_migration"]
    )


@pytest.mark.parametrize(
    "section, field, value, allowed",
    [
        ("eval", "ptq_methods", ("minmax", "nope"), registry.PTQ),
        ("train", "qat_init", "nope", registry.QAT_INITS),
    ],
)
def test_unknown_names_fail_in_one_line_naming_the_field(section, field, value, allowed):
    c = os_tiny()
    setattr(getattr(c, section), field, value)
    with pytest.raises(UserError) as e:
        experiment.load(c)
    msg = str(e.value)
    assert "\n" not in msg and f"config.{section}.{field}" in msg and "'nope'" in msg
    assert f"allowed: {', '.join(allowed)}" in msg
    with pytest.raises(UserError, match="config.eval.ptq_methods: .* 'x' is unknown"):
        registry.ptq_method("x")


def test_a_method_is_not_applied_twice():
    """A PTQ method whose reparametrisation the model config already has is refused, naming
    the config field, for every method that uses one."""
    c = os_tiny(ptq_methods=("minmax",))
    c.model.gamma_migrated = True
    experiment.load(c)  # no reparametrising method: fine
    gm = registry.REPARAMETRISATIONS["gamma_migration"]
    users = [n for n, m in registry.PTQ.items() if m.reparametrisation is gm]
    assert users == ["gamma_migration", "outlier_suppression"]
    for name in users:
        c.eval.ptq_methods = ("minmax", name)
        with pytest.raises(UserError, match=r"config.model.gamma_migrated=True cannot take"):
            experiment.load(c)


@dataclasses.dataclass(frozen=True)
class RecordedMinMax:
    """A method of a new paper: MinMax that records the setups it calibrated."""

    name: str = "recorded_minmax"
    paper: str = "a test"
    estimator: str = "minmax"
    reparametrisation: Reparametrisation | None = None
    seen: list = dataclasses.field(default_factory=list, compare=False)

    def rules(self, setup, options=None, percentile=None):
        return MINMAX.rules(setup, options, percentile)

    def calibrate(self, cfg, setup, params, calib, *args, **kwargs):
        self.seen.append(setup)
        yield from MINMAX.calibrate(cfg, setup, params, calib, *args, **kwargs)


@pytest.fixture
def recorded():
    """``RecordedMinMax`` registered (one line) for the test, removed again afterwards."""
    method = RecordedMinMax()
    registry.PTQ[method.name] = method
    yield method
    del registry.PTQ[method.name]


def test_a_registered_method_runs_where_a_config_asks_for_it(recorded):
    params = build(CFG).init(jax.random.key(0), **dummy_inputs(CFG))["params"]
    calib, ev = [batch(1), batch(2)], batch(3)

    def run(model, variables):
        return {"accuracy": float(jnp.mean(model.apply(variables, **ev)["logits"]))}

    r, report, secs, info = evaluate_setup(CFG, "W8A8", params, calib, run, method=recorded.name)
    assert recorded.seen == ["W8A8"] and secs > 0 and len(report.quantized) > 10
    r_minmax, *_ = evaluate_setup(CFG, "W8A8", params, calib, run, method="minmax")
    assert r == r_minmax and info == {}
    assert recorded.seen == ["W8A8"]  # minmax is not the new method

    # a config names it: validated and given its cells; the paper's table does not list it
    exp = experiment.load(os_tiny(ptq_methods=("minmax", recorded.name)))
    assert [m for _, _, m in exp.eval_cells()] == ["minmax", recorded.name]
    assert recorded.name not in PAPER_TABLE
    assert recorded.name not in experiment.load(os_tiny()).eval["ptq_methods"]


def test_the_registry_forgets_a_method_removed_again():
    assert "recorded_minmax" not in registry.PTQ
    with pytest.raises(UserError, match="'recorded_minmax' is unknown"):
        experiment.load(os_tiny(ptq_methods=("recorded_minmax",)))


def test_combined_hooks_sum_losses_and_run_every_update():
    """Two QAT terms' hooks in one train step: losses add, metrics merge, each update sees its
    own observation."""

    def term(k, value):
        return StepHooks(
            collections=(f"c{k}",),
            loss=lambda p, out, coll, b, s: (value, {f"loss{k}": value}),
            observe=lambda coll: coll[f"c{k}"],
            update=lambda extra, seen, s: ({**extra, k: seen}, {f"seen{k}": seen}),
        )

    assert registry.combined_hooks([]) is None
    one = term("a", 1.0)
    assert registry.combined_hooks([one]) is one
    both = registry.combined_hooks([one, term("b", 2.0)])
    assert both.collections == ("ca", "cb")
    assert both.loss(None, None, {}, None, 0) == (3.0, {"lossa": 1.0, "lossb": 2.0})
    seen = both.observe({"ca": 5, "cb": 6})
    extra, metrics = both.update({}, seen, 0)
    assert extra == {"a": 5, "b": 6} and metrics == {"seena": 5, "seenb": 6}


def test_a_reparametrisation_reads_its_field_from_the_source_workdir(tmp_path):
    """``config.init_from`` already holds migrated parameters when its workdir's config.json
    says ``model.gamma_migrated``; an HF checkpoint (original model) or no config never does."""
    rep = registry.reparametrisation("gamma_migration")

    def workdir(name, model, weights=False):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model": model}))
        if weights:
            (d / "model.safetensors").write_bytes(b"")
        return str(d)

    assert rep.source_applied(workdir("migrated", {"gamma_migrated": True}))
    assert not rep.source_applied(workdir("plain", {"gamma_migrated": False}))
    assert not rep.source_applied(workdir("hf", {"gamma_migrated": True}, weights=True))
    assert not rep.source_applied(str(tmp_path / "missing"))
