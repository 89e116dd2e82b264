"""What the command-line mains (train.py, eval.py) share: flag parsing and one-line errors.

A user's mistake (:class:`qtx.errors.UserError`: an invalid config value or ``:arg``, a
missing dataset or tokenizer, a mismatched or missing checkpoint) prints
``error: <sentence>`` on stderr and exits with status 2, without a traceback. A divergent run
(``FloatingPointError``) prints its line and exits with 1. ``--verbosity=1`` (or the
environment variable ``QTX_TRACEBACK=1``) shows the traceback as well. Programming errors
(every other exception) keep theirs.
"""

from __future__ import annotations

import difflib
import glob
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


def _config_file_error(argv: list[str]) -> UserError | None:
    """The one line for a ``--config`` file that does not exist or does not load
    (ml_collections keeps that error until the config is first read)."""
    path = _config_arg(argv)
    if not path:
        return None
    file = path.partition(":")[0]
    if not os.path.isfile(file):
        known = sorted(glob.glob(os.path.join(os.path.dirname(file) or ".", "*.py")))
        near = difflib.get_close_matches(file, known, n=1)
        hint = f" (did you mean {near[0]}?)" if near else ""
        return UserError(
            f"--config={path}: no such file{hint}; allowed: a config file, e.g. "
            "configs/opt125m_gated.py:tiny (ls configs/)."
        )
    value = flags.FLAGS["config"].value if "config" in flags.FLAGS else None
    if type(value).__name__ != "_ErrorConfig":
        return None
    err = getattr(value, "_error", None)
    last = str(err).strip().splitlines()[-1].strip() if err is not None else ""
    return UserError(f"--config={path} does not load: {last}")


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:
        user = _config_file_error(argv) or _user_error_in(e)
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
    except Exception as e:  # the config file fails to import or to build its config
        user = _config_file_error(argv) or _config_import_error(e, argv)
        if user is None:
            raise
        report(user, USER_ERROR_STATUS, argv, cause=e)
    else:
        user = _config_file_error(argv)
        if user is not None:
            report(user, USER_ERROR_STATUS, argv)
        return rest
    return []  # not reached


def _config_arg(argv: list[str]) -> str | None:
    """The ``--config`` value as written in ``argv``."""
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _config_import_error(err: BaseException, argv: list[str]) -> UserError | None:
    """One line for an exception raised by the ``--config`` file's own code (a syntax error,
    a missing import), naming the file and line; None when the error is not from it."""
    path = _config_arg(argv)
    if not path:
        return None
    file = os.path.abspath(path.partition(":")[0])
    frames = [
        f for f in traceback.extract_tb(err.__traceback__) if os.path.abspath(f.filename) == file
    ]
    if isinstance(err, SyntaxError) and err.filename and os.path.abspath(err.filename) == file:
        where = f"{err.filename}:{err.lineno}"
        text = err.msg
    elif frames:
        where, text = f"{frames[-1].filename}:{frames[-1].lineno}", str(err)
    else:
        return None
    return UserError(
        f"--config={path} does not load ({where}): {type(err).__name__}: {text}; allowed: a "
        "config file whose get_config(arg) runs (--verbosity=1 shows the traceback)."
    )


HELP_FLAGS = ("--help", "-h", "-?", "--helpshort")


def print_help() -> None:
    """The program's docstring as written, its flags, and what every program takes."""
    doc = (sys.modules["__main__"].__doc__ or "").strip("\n")
    own = flags.FLAGS.main_module_help().strip()
    print(
        f"{doc}\n\n{own}\n\n"
        "  --config.<field>=<value>: overrides a field of the config (any depth), e.g.\n"
        "    --config.train.steps=50 --config.optim.lr=3e-4; tuples and dicts take Python\n"
        "    literals: --config.eval.setups=\"('W8A8', 'W6A6')\". The config file's docstring\n"
        "    lists its fields' meaning and its :arg values.\n"
        "  --verbosity=1 (or QTX_TRACEBACK=1): show tracebacks and logs with errors.\n"
        "  --helpfull: every flag, including those of the libraries.",
        flush=True,
    )


def run(main: Callable[[list[str]], object], program: str) -> None:
    """``absl.app.run(main)`` with one-line user errors (see the module docstring); ``--help``
    prints :func:`print_help` and exits with status 0."""
    if any(a in HELP_FLAGS for a in sys.argv[1:]):
        print_help()
        sys.exit(0)

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
