"""Dataclass configs whose field docstrings double as `--help` text (the sparsify convention).

    @dataclass
    class FitConfig:
        n_features: int = 20
        \"\"\"Number of latents to select.\"\"\"

`field_docs(FitConfig)` reads those string literals from the class source; `add_arguments` turns the fields into
argparse options and `from_args` builds the config back from parsed arguments.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import math
import operator
import re
import textwrap
import typing
from functools import cache

from .errors import DSGError


@cache
def field_docs(cls) -> dict[str, str]:
    """{field name: the docstring literal written under it}, including fields inherited from dataclass bases."""
    docs = {}
    for base in reversed(cls.__mro__[1:]):
        if dataclasses.is_dataclass(base):
            docs.update(field_docs(base))
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    for prev, node in zip(body, body[1:]):
        if (
            isinstance(prev, ast.AnnAssign)
            and isinstance(prev.target, ast.Name)
            and isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            docs[prev.target.id] = " ".join(node.value.value.split())
    return docs


def _base_type(tp):
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


_OTHER_DEFAULT = re.compile(r"(?:^|(?<=\s))Default\b[^.]*\.")  # a docstring's sentence about its own default


def add_arguments(parser: argparse.ArgumentParser, cls_or_default, skip: tuple[str, ...] = ()) -> None:
    """One `--field-name` option per dataclass field, with its docstring as help and its default shown.

    Pass an instance instead of the class to show (and later apply, see `from_args`) other defaults.
    """
    cls = cls_or_default if isinstance(cls_or_default, type) else type(cls_or_default)
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = f.default if isinstance(cls_or_default, type) else getattr(cls_or_default, f.name)
        doc = docs.get(f.name, "")
        if default != f.default:  # the docstring's "Default: ..." sentence tells the class's default, not this one
            doc = " ".join(_OTHER_DEFAULT.sub(" ", doc).split())
        # argparse %-formats help text: a docstring's "99 % rule" would print as a format directive
        help_text = f"{doc} (default: {default})".replace("%", "%%")
        if tp is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            group.add_argument(flag, dest=f.name, type=tp, default=None, metavar=f.name.upper(), help=help_text)


def from_args(cls_or_default, args: argparse.Namespace):
    """Build a config from parsed arguments: options given on the command line override the defaults of the
    dataclass (or of the default instance passed in)."""
    cls = cls_or_default if isinstance(cls_or_default, type) else type(cls_or_default)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}
    if isinstance(cls_or_default, type):
        return cls(**values)
    return dataclasses.replace(cls_or_default, **values)


def is_number(x) -> bool:
    """A finite int or float, not a bool (what a float setting accepts)."""
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:  # an integer too large for a float
        return False


def is_index(x) -> bool:
    """An integer of any kind (Python, numpy, a 0-dim integer tensor: anything with __index__), not a bool and not a
    float or a string of digits (what an id or a position accepts)."""
    if isinstance(x, (bool, str, bytes)) or "bool" in str(getattr(x, "dtype", "")):
        return False
    try:
        operator.index(x)  # a float tensor has __index__ too, and refuses it here
    except TypeError:
        return False
    return True


MAX_SEED = 2**31 - 1
"""The largest seed a config takes: each run draws with a few small offsets from it, and every generator it
feeds (numpy, scikit-learn, torch) takes them all."""


def check_types(config) -> None:
    """Each field of a dataclass config holds a value of its annotated type (None only where it is optional; an
    int is a number, a bool is not; numbers are finite), or a DSGError names the field."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value, tp = getattr(config, f.name), hints[f.name]
        optional = type(None) in typing.get_args(tp)
        base = _base_type(tp)
        if value is None and optional:
            continue
        if base is bool:
            ok = isinstance(value, bool)
        elif base is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif base is float:
            ok = is_number(value)
        else:
            ok = isinstance(value, base) if isinstance(base, type) else True
        if not ok:
            kind = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}.get(base, base)
            raise DSGError(f"{f.name} must be {kind}, got {value!r}.")
        if f.name == "seed" and not 0 <= value <= MAX_SEED:  # numpy's and scikit-learn's generators take no other
            raise DSGError(f"seed must be an integer from 0 to {MAX_SEED}, got {value!r}.")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise DSGError(f"{name} must be one of {tuple(choices)}, got {value!r}.")
