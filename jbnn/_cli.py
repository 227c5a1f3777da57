"""Flag parsing shared by ``train.py`` and ``explain.py``.

``ml_collections``' ``--config.a.b=value`` overrides name config fields by path; a path
that names no field made absl print a 40-line ``AttributeError`` traceback (a "Did you
mean" hint only for top-level names). :func:`flags_parser` turns that into one line that
names the override, the missing field and the fields that section has; for an empty
section (``data_kwargs``, whose fields are free), the dict-literal override that sets it.
"""

from __future__ import annotations

import ast
import runpy
import sys
from collections.abc import Callable, Sequence
from typing import Any

from absl import app

__all__ = ["flags_parser"]


def flags_parser(prog: str) -> Callable[[list[str]], Any]:
    """An ``app.run(main, flags_parser=...)`` parser with one-line errors for overrides."""

    def parse(argv: list[str]) -> Any:
        try:
            return app.parse_flags_with_usage(argv)
        except (AttributeError, KeyError) as e:
            sys.exit(f"{prog}: {override_error(argv, e)}")

    return parse


def _overrides(argv: Sequence[str]) -> list[tuple[str, str | None]]:
    """The dotted paths and values (None: not given) of the ``--config.<path>`` flags."""
    out = []
    for i, arg in enumerate(argv[1:], start=1):
        if arg.startswith("--config."):
            path, eq, value = arg[len("--config.") :].partition("=")
            if not eq:  # --config.a.b value
                nxt = argv[i + 1] if i + 1 < len(argv) else None
                value = None if nxt is None or nxt.startswith("-") else nxt
            out.append((path, value))
    return out


def _config_file(argv: Sequence[str]) -> str | None:
    for i, arg in enumerate(argv[1:], start=1):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _literal(value: str | None) -> Any:
    """The Python value a command-line value stands for, as ml_collections reads it."""
    if value is None:
        return "<value>"
    try:
        return ast.literal_eval(value)
    except (SyntaxError, ValueError):
        return value  # a bare word: a string


def _missing_field(config: Any, path: str, value: str | None = None) -> str | None:
    """Why ``path`` names no field of ``config`` (None when it does); ``value`` is the
    override's value, for the dict literal that sets an empty section."""
    keys = path.split(".")
    node, walked = config, []
    for i, key in enumerate(keys):
        if not hasattr(node, "keys"):
            where = "config." + ".".join(walked)
            return f"{where} is {type(node).__name__} {node!r}, not a section with fields"
        if key not in node:
            where = "config." + ".".join(walked) if walked else "the config's top level"
            if walked and not len(node):  # e.g. data_kwargs: its fields are free
                literal = _literal(value)
                for inner in reversed(keys[i:]):
                    literal = {inner: literal}
                flag = f"--config.{'.'.join(walked)}={literal!r}"
                return (
                    f"{where} is an empty section: it has no fields to override; set it as a "
                    f'whole instead, "{flag}"'
                )
            return f"{where} has no field {key!r}; its fields: {', '.join(sorted(node.keys()))}"
        node, walked = node[key], [*walked, key]
    return None


def override_error(argv: Sequence[str], error: Exception) -> str:
    """A one-line message for a ``--config.<path>`` override that names no field."""
    config = None
    filename = _config_file(argv)
    if filename is not None:
        path, _, arg = filename.partition(":")
        try:
            get_config = runpy.run_path(path)["get_config"]
            config = get_config(arg) if arg else get_config()
        except Exception:  # noqa: BLE001 - the generic message below is still right
            config = None
    if config is not None:
        for override, value in _overrides(argv):
            why = _missing_field(config, override, value)
            if why is not None:
                return f"--config.{override}: unknown config field ({why})."
    return f"a --config override names no config field ({type(error).__name__}: {error})."
