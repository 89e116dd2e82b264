"""What the command-line mains (train.py, eval.py) share: flag parsing and one-line errors.

A user's mistake (:class:`qtx.errors.UserError`: an invalid config value or ``:arg``, a
missing dataset or tokenizer, a mismatched or missing checkpoint) prints
``error: <sentence>`` on stderr and exits with status 2, without a traceback. A divergent run
(``FloatingPointError``) prints its line and exits with 1. ``--verbosity=1`` (or the
environment variable ``QTX_TRACEBACK=1``) shows the traceback as well. Programming errors
(every other exception) keep theirs.
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from collections.abc import Callable

from absl import app, flags, logging

from qtx.errors import MissingResources, UserError

TRACEBACK_ENV = "QTX_TRACEBACK"
USER_ERROR_STATUS = 2


def want_traceback(argv: list[str] | None = None) -> bool:
    """``QTX_TRACEBACK=1``, or ``--verbosity`` / ``-v`` >= 1 (parsed or still in ``argv``)."""
    if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
        return True
    fl = flags.FLAGS["verbosity"]
    if fl.present:
        return int(fl.value) >= 1
    for i, a in enumerate(argv or ()):
        value = None
        if a.startswith(("--verbosity=", "-v=")):
            value = a.split("=", 1)[1]
        elif a in ("--verbosity", "-v") and i + 1 < len(argv):
            value = argv[i + 1]
        if value is not None:
            try:
                return int(value) >= 1
            except ValueError:
                return False
    return False


_WRAPPED = "Error whilst parsing config file:"


def _user_error_in(err: BaseException) -> UserError | None:
    """The UserError behind a flag-parsing error. ml_collections re-raises a config's own
    error as ``type(e)("Error whilst parsing config file: <traceback>")``; this takes back
    the original sentence from the traceback's last line."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, UserError):
            text = str(err)
            if text.startswith(_WRAPPED):
                last = text.rstrip().splitlines()[-1]
                text = last.split(": ", 1)[1] if last.startswith("qtx.errors.") else last
            return UserError(text)
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def report(err: BaseException, status: int, argv=None, hint: str = "", cause=None) -> None:
    """Prints ``error: <line>`` for each line of ``err`` (and, on request, the traceback of
    ``cause or err``), then exits with ``status``."""
    if want_traceback(argv):
        traceback.print_exception(cause or err, file=sys.stderr)
    lines = err.lines if isinstance(err, MissingResources) else str(err).splitlines() or [""]
    for line in lines + ([hint] if hint else []):
        print(f"error: {line}", file=sys.stderr)
    sys.stderr.flush()
    sys.exit(status)


def config_path() -> str:
    """The ``--config`` argument as given (``configs/x.py[:arg]``)."""
    from ml_collections import config_flags

    return config_flags.get_config_filename(flags.FLAGS["config"])


def offline_hint(program: str) -> str:
    """For a missing resource: the ``:tiny`` variant of this config runs offline."""
    try:
        path = config_path()
    except Exception:  # noqa: BLE001 - the hint is optional
        return ""
    base, _, arg = path.partition(":")
    if arg == "tiny":
        return ""
    return (
        f"the offline variant runs without them: python {program} --config={base}:tiny "
        f"(see the config's docstring)."
    )


def _unknown_field(path: str) -> bool:
    node = flags.FLAGS["config"].value
    try:
        for part in path.split("."):
            node = node[part]
    except (KeyError, AttributeError, TypeError):
        return True
    return False


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        user = _user_error_in(e)
        report(user if user is not None else e, USER_ERROR_STATUS, argv, cause=e)
    except (AttributeError, KeyError) as e:  # ml_collections: an override of no known field
        unknown = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
        unknown = [a for a in unknown if _unknown_field(a[len("--config.") :])]
        hint = re.search(r"Did you mean \S+ instead of \S+\?", str(e))
        report(
            UserError(
                f"{', '.join(unknown) or 'an override'} names no field of the config"
                + (f" (d{hint.group(0)[1:]})" if hint else "")
                + "; allowed: the fields that the config file defines."
            ),
            USER_ERROR_STATUS,
            argv,
            cause=e,
        )
    return []  # not reached


def run(main: Callable[[list[str]], object], program: str) -> None:
    """``absl.app.run(main)`` with one-line user errors (see the module docstring)."""

    def guarded(argv):
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)  # progress lines are printed; logs on request
        from qtx.train import distributed

        try:
            try:
                result = main(argv)
            except Exception as e:
                distributed.await_verdict(e)  # a lost peer ends this process with its line
                raise
            distributed.finish()
            return result
        except MissingResources as e:
            report(e, USER_ERROR_STATUS, hint=offline_hint(program))
        except UserError as e:
            report(e, USER_ERROR_STATUS)
        except FloatingPointError as e:
            report(e, 1)

    app.run(guarded, flags_parser=_parse_flags)
