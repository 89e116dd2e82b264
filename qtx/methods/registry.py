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
========================  =========================  ============================================

A method is defined in its paper's package; adding one is that file plus one line here. The
drivers (``qtx.run``) reach methods only through these tables, so a method is used where a
config names it and nowhere else. Every lookup of an unknown name is one ``UserError`` naming
the config field and the allowed names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from qtx.errors import UserError
from qtx.methods import outlier_suppression as os_paper
from qtx.methods import quant_variation as qv_paper
from qtx.methods.kinds import (
    Calibrated,
    PTQMethod,
    QATInit,
    QATTerm,
    Reparametrisation,
)
from qtx.models import ModelConfig
from qtx.train.steps import StepHooks

__all__ = [
    "CALIBRATE",
    "PTQ",
    "QAT_INITS",
    "QAT_TERMS",
    "REPARAMETRISATIONS",
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
REPARAMETRISATIONS: dict[str, Reparametrisation] = {r.name: r for r in (os_paper.GAMMA_MIGRATION,)}
QAT_INITS: dict[str, QATInit] = {i.name: i for i in (CALIBRATE, os_paper.QAT_INIT)}
QAT_TERMS: dict[str, QATTerm] = {t.name: t for t in (qv_paper.QAT_TERM,)}


def _lookup(table: Mapping, name, field: str, what: str):
    if isinstance(name, str) and name in table:
        return table[name]
    raise UserError(f"{field}: {what} {name!r} is unknown; allowed: {', '.join(table)}.")


def ptq_method(name: str, field: str = "config.eval.ptq_methods") -> PTQMethod:
    """The registered post-training method ``name``."""
    return _lookup(PTQ, name, field, "post-training quantization method")


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
    ``percentiles``: the options of the registered methods that take some)."""
    os_paper.method_settings(options)


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
