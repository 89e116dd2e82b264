"""The methods by name: one table per kind (:mod:`qtx.methods.kinds`), and their lookups.

========================  =========================  ============================================
table                     kind                       chosen by
========================  =========================  ============================================
``PTQ``                   :class:`PTQMethod`         ``config.eval.ptq_methods``
``REPARAMETRISATIONS``    :class:`Reparametrisation` a PTQ method, or the model config (e.g.
                                                     ``config.model.gamma_migrated``)
``QAT_INITS``             :class:`QATInit`           ``config.train.qat_init``
``QAT_TERMS``             :class:`QATTerm`           their own ``config.train`` fields (each
                                                     returns no hooks and no state when off)
``TRANSFORMS``            :class:`Transform`         a composed PTQ method's name part
``WEIGHT_ROUNDINGS``      :class:`WeightRounding`    a composed PTQ method's name part
``REFINEMENTS``           :class:`Refinement`        a composed PTQ method's name part
========================  =========================  ============================================

A composed PTQ method (:class:`qtx.methods.pipeline.Pipeline`) is named by its parts joined
with ``+`` (``smoothquant+gptq``, ``os_plus+token_wise_clipping``): transforms, at most one
activation estimator (``minmax``, ``percentile``, ``omse``), at most one weight rounding and
one refinement; ``outlier_suppression`` stands for ``gamma_migration+token_wise_clipping``.

A method is defined in its paper's package; adding one is that file plus one line here. The
drivers (``qtx.run``) reach methods only through these tables, so a method is used where a
config names it and nowhere else. Every lookup of an unknown name is one ``UserError`` naming
the config field and the allowed names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from qtx.errors import UserError
from qtx.methods import gptq, os_plus, quarot, smoothquant
from qtx.methods import outlier_suppression as os_paper
from qtx.methods import quant_variation as qv_paper
from qtx.methods.kinds import (
    ESTIMATORS,
    Calibrated,
    PTQMethod,
    QATInit,
    QATTerm,
    Refinement,
    Reparametrisation,
    Transform,
    WeightRounding,
)
from qtx.methods.pipeline import Pipeline
from qtx.models import ModelConfig
from qtx.train.steps import StepHooks

__all__ = [
    "CALIBRATE",
    "PTQ",
    "QAT_INITS",
    "QAT_TERMS",
    "REFINEMENTS",
    "REPARAMETRISATIONS",
    "TRANSFORMS",
    "WEIGHT_ROUNDINGS",
    "Calibrated",
    "PTQMethod",
    "QATInit",
    "QATTerm",
    "Reparametrisation",
    "applied_reparametrisations",
    "check_ptq_options",
    "combined_hooks",
    "ptq_method",
    "qat_init",
    "qat_term",
    "reparametrisation",
    "step_hooks",
    "train_state",
]

# config.train.qat_init='calibrate': the QAT plan's own estimators start its quantizers
CALIBRATE = QATInit("calibrate", "LSQ / LSQ+ (the quantization preset's estimators)", None)

PTQ: dict[str, PTQMethod] = {
    m.name: m
    for m in (
        os_paper.MINMAX,
        os_paper.PERCENTILE,
        os_paper.OMSE,
        os_paper.MIGRATED_MINMAX,
        os_paper.TOKEN_WISE_CLIPPING,
        os_paper.OUTLIER_SUPPRESSION,
    )
}
# the stages composed methods are made of, by the name part that selects them
TRANSFORMS: dict[str, Transform] = {
    t.name: t
    for t in (
        os_paper.GAMMA_MIGRATION_TRANSFORM,
        smoothquant.SMOOTHQUANT,
        smoothquant.SMOOTHQUANT_SEARCH,
        os_plus.OS_PLUS,
        quarot.ROTATION,
    )
}
WEIGHT_ROUNDINGS: dict[str, WeightRounding] = {w.name: w for w in (gptq.GPTQ,)}
REFINEMENTS: dict[str, Refinement] = {r.name: r for r in (os_paper.TOKEN_WISE_REFINE,)}
# names that stand for a composition of parts
ALIASES = {"outlier_suppression": ("gamma_migration", "token_wise_clipping")}


def composed(name: str, field: str = "config.eval.ptq_methods") -> Pipeline:
    """The composed method ``name`` (parts joined with ``+``; see the module docstring)."""
    parts = [p for part in name.split("+") for p in ALIASES.get(part, (part,))]
    transforms, estimators, weights, refine = [], [], [], []
    for part in parts:
        if part in TRANSFORMS:
            transforms.append(TRANSFORMS[part])
        elif part in ESTIMATORS:
            estimators.append(part)
        elif part in WEIGHT_ROUNDINGS:
            weights.append(WEIGHT_ROUNDINGS[part])
        elif part in REFINEMENTS:
            refine.append(REFINEMENTS[part])
        else:
            allowed = [*TRANSFORMS, *ESTIMATORS, *WEIGHT_ROUNDINGS, *REFINEMENTS, *ALIASES]
            raise UserError(
                f"{field}: {name!r} has the unknown part {part!r}; allowed: a registered "
                f"method ({', '.join(PTQ)}) or parts joined with '+' ({', '.join(allowed)})."
            )
    for what, got in (("activation estimator", estimators), ("weight rounding", weights),
                      ("refinement", refine)):  # fmt: skip
        if len(got) > 1:
            raise UserError(f"{field}: {name!r} names more than one {what}; allowed: at most one.")
    return Pipeline(
        name,
        tuple(transforms),
        estimators[0] if estimators else "minmax",
        weights[0] if weights else None,
        refine[0] if refine else None,
        percentiles=os_paper.percentiles_of,
    )


# the methods after gamma migration by their own names (docs/methods.md §5)
AFTER_GAMMA_MIGRATION = ("smoothquant", "smoothquant_search", "os_plus", "rotation", "gptq")
PTQ.update({n: composed(n) for n in AFTER_GAMMA_MIGRATION})
REPARAMETRISATIONS: dict[str, Reparametrisation] = {
    r.name: r for r in (os_paper.GAMMA_MIGRATION, quarot.ROTATION_REPARAM)
}
QAT_INITS: dict[str, QATInit] = {i.name: i for i in (CALIBRATE, os_paper.QAT_INIT)}
QAT_TERMS: dict[str, QATTerm] = {t.name: t for t in (qv_paper.QAT_TERM,)}


def _lookup(table: Mapping, name, field: str, what: str):
    if isinstance(name, str) and name in table:
        return table[name]
    raise UserError(f"{field}: {what} {name!r} is unknown; allowed: {', '.join(table)}.")


def ptq_method(name: str, field: str = "config.eval.ptq_methods") -> PTQMethod:
    """The registered post-training method ``name``, or the composed method it names."""
    if isinstance(name, str) and name in PTQ:
        return PTQ[name]
    parts = (*TRANSFORMS, *ESTIMATORS, *WEIGHT_ROUNDINGS, *REFINEMENTS)
    if isinstance(name, str) and ("+" in name or name in parts):
        return composed(name, field)
    raise UserError(
        f"{field}: post-training quantization method {name!r} is unknown; allowed: "
        f"{', '.join(PTQ)}, or parts joined with '+' ({', '.join(dict.fromkeys(parts))})."
    )


def stage_option_fields() -> tuple[str, ...]:
    """The ``config.eval.ptq_options`` fields the stages of composed methods read."""
    stages = (*TRANSFORMS.values(), *WEIGHT_ROUNDINGS.values())
    return tuple(dict.fromkeys(f for s in stages for f in s.option_fields))


def reparametrisation(name: str, field: str = "config.model") -> Reparametrisation:
    """The registered reparametrisation ``name`` (each is a ``config.model`` field)."""
    return _lookup(REPARAMETRISATIONS, name, field, "reparametrisation")


def qat_init(name: str, field: str = "config.train.qat_init") -> QATInit:
    """The registered QAT initialisation ``name``."""
    return _lookup(QAT_INITS, name, field, "QAT initialisation")


def qat_term(name: str, field: str = "config.train") -> QATTerm:
    """The registered QAT term ``name`` (each is switched by ``config.train`` fields)."""
    return _lookup(QAT_TERMS, name, field, "QAT term")


def applied_reparametrisations(cfg: ModelConfig) -> tuple[Reparametrisation, ...]:
    """The reparametrisations ``cfg`` says its parameters carry (``params_for`` makes an
    original model's parameters fit it)."""
    return tuple(r for r in REPARAMETRISATIONS.values() if r.applied(cfg))


def check_ptq_options(options: Mapping | None) -> None:
    """Validates ``config.eval.ptq_options`` (token-wise clipping's settings, percentile's
    ``percentiles``, and the fields of the composed methods' stages)."""
    os_paper.method_settings(options, stage_option_fields())
    for stage in (*TRANSFORMS.values(), *WEIGHT_ROUNDINGS.values()):
        if stage.check_options is not None:
            stage.check_options(options)


def step_hooks(train: dict, total_steps: int) -> StepHooks | None:
    """What the QAT terms ``config.train`` turns on add to the train step (None: nothing)."""
    hooks = [t.hooks(train, total_steps) for t in QAT_TERMS.values()]
    return combined_hooks([h for h in hooks if h is not None])


def train_state(train: dict, apply_fn: Callable, variables: dict, inputs: dict) -> dict:
    """``{collection: tree}`` the QAT terms ``config.train`` turns on keep in
    ``TrainState.extra`` (``apply_fn``: the QAT model's, ``inputs``: dummy inputs)."""
    out = {}
    for t in QAT_TERMS.values():
        out.update(t.state(train, apply_fn, variables, inputs))
    return out


def combined_hooks(hooks: Sequence[StepHooks]) -> StepHooks | None:
    """One :class:`StepHooks` doing what each of ``hooks`` does: losses and metrics summed /
    merged, observations kept per hook, updates in order. None for none, the hook for one."""
    if len(hooks) <= 1:
        return hooks[0] if hooks else None
    hooks = tuple(hooks)

    def loss(params, out, collected, batch, step):
        total, metrics = 0.0, {}
        for h in hooks:
            if h.loss is not None:
                value, m = h.loss(params, out, collected, batch, step)
                total, metrics = total + value, {**metrics, **m}
        return total, metrics

    def observe(collected):
        return tuple(None if h.observe is None else h.observe(collected) for h in hooks)

    def update(extra, observed, step):
        metrics = {}
        observed = (None,) * len(hooks) if observed is None else observed
        for h, seen in zip(hooks, observed, strict=True):
            if h.update is not None:
                extra, m = h.update(extra, seen, step)
                metrics.update(m)
        return extra, metrics

    return StepHooks(
        collections=tuple(dict.fromkeys(c for h in hooks for c in h.collections)),
        loss=loss if any(h.loss is not None for h in hooks) else None,
        observe=observe if any(h.observe is not None for h in hooks) else None,
        update=update if any(h.update is not None for h in hooks) else None,
    )
