"""Command-line flags derived from the settings dataclasses.

One default per setting, on the dataclass field; the CLI flag (name, type, choices, help and
the default it shows) is built from the field (as vLLM's ``EngineArgs.add_cli_args`` does), so
the library and the CLI cannot disagree. A field becomes a flag when it is declared with
:func:`setting`; argparse's own default is ``SUPPRESS``, so a flag the command line does not
give is absent from the namespace and the dataclass's default applies (:func:`given`).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

_MISSING = dataclasses.MISSING

BOS_HELP = (
    "begin each window with the tokenizer's BOS token when the tokenizer adds one to a text, "
    "as lm-eval's add_bos_token (--no-bos: text tokens only)"
)


def parse_size(text: str) -> int:
    """``4GB``, ``500MB``, ``64KiB``, ``1024`` (bytes) -> bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    units |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    t = text.strip().upper()
    number = t.rstrip("KMGTIB")
    try:
        n = int(float(number) * units[t[len(number) :]])
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 4GB or 500MB") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not positive")
    return n


def setting(
    default: Any = _MISSING,
    help: str = "",
    *,
    flags: Sequence[str] = (),
    choices: Iterable[Any] | None = None,
    type: Callable[[str], Any] | None = None,
    metavar: str | None = None,
    repeat: bool = False,
    show_default: bool = True,
    default_factory: Callable[[], Any] | None = None,
) -> Any:
    """A dataclass field that is also a CLI flag. ``flags``: its names (default
    ``--field-name``); ``repeat``: the flag may be given several times and collects a tuple;
    booleans get ``--flag``/``--no-flag`` when they default to True, ``--flag`` otherwise."""
    cli = dict(
        help=help,
        flags=tuple(flags),
        choices=None if choices is None else tuple(choices),
        type=type,
        metavar=metavar,
        repeat=repeat,
        show_default=show_default,
    )
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata={"cli": cli})
    return dataclasses.field(default=default, metadata={"cli": cli})


_TYPES = {"int": int, "float": float, "str": str}


def _base_type(annotation: str) -> str:
    """``"int | None"`` -> ``"int"`` (annotations are strings: ``from __future__``)."""
    parts = [p.strip() for p in str(annotation).split("|") if p.strip() != "None"]
    return parts[0] if len(parts) == 1 else str(annotation)


def add_flags(
    parser: argparse.ArgumentParser, cls: type, only: Iterable[str] | None = None
) -> list[str]:
    """Add a flag for every :func:`setting` field of dataclass ``cls`` (or those in ``only``);
    returns the field names added."""
    names = []
    wanted = None if only is None else set(only)
    for f in dataclasses.fields(cls):
        cli = f.metadata.get("cli")
        if cli is None or (wanted is not None and f.name not in wanted):
            continue
        names.append(f.name)
        flags = cli["flags"] or (f"--{f.name.replace('_', '-')}",)
        kw: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=cli["help"])
        default = f.default if f.default is not _MISSING else None
        kind = _base_type(f.type)
        if kind == "bool":
            kw["action"] = argparse.BooleanOptionalAction if default else "store_true"
        elif cli["repeat"]:
            kw["action"] = "append"
            kw["type"] = cli["type"] or str
        else:
            kw["type"] = cli["type"] or _TYPES.get(kind, str)
        if cli["choices"] is not None:
            kw["choices"] = cli["choices"]
        if cli["metavar"] is not None:
            kw["metavar"] = cli["metavar"]
        if cli["show_default"] and f.default is not _MISSING and kind != "bool":
            kw["help"] = f"{kw['help']} (default: {default})".lstrip()
        elif kind == "bool" and default:
            kw["help"] = f"{kw['help']} (on by default)".lstrip()
        parser.add_argument(*flags, **kw)
    return names


def given(ns: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of ``cls`` that the command line set (repeatable flags as tuples); the
    others are left to the dataclass's defaults."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli") is not None and hasattr(ns, f.name):
            v = getattr(ns, f.name)
            out[f.name] = tuple(v) if f.metadata["cli"]["repeat"] else v
    return out
