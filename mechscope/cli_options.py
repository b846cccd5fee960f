"""Command-line options generated from a config dataclass: one option per field, its docstring as the help.

A field's docstring is the string literal right under it in the class body, as in

    k: int = 64
    \"\"\"Active latents per token.\"\"\"

`dataclass_options(Config)` returns `inspect.Parameter`s (typer options named after the fields,
underscores as dashes) and `build(Config, values)` makes the config from the parsed values, so the
config's own `__post_init__` checks them.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import textwrap
import typing
from typing import Annotated

import typer

from mechscope.errors import MechscopeError


def field_docs(cls) -> dict[str, str]:
    """Each field's docstring (the string literal right after it in the class body)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        field = isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
        if field and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _option_type(hint):
    """The type typer parses for a field's type hint (`X | None` as X; lists keep their item type)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
        return args[0]
    return hint


def dataclass_options(cls, skip: tuple[str, ...] = (), prefix: str = "") -> list[inspect.Parameter]:
    """Keyword-only typer options for the fields of the dataclass `cls` (except `skip`)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    params = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        kind = _option_type(hints[f.name])
        flag = "--" + prefix + f.name.replace("_", "-")
        if kind is bool:
            flag = f"{flag}/--no-{prefix}{f.name.replace('_', '-')}"
        option = typer.Option(flag, help=docs.get(f.name, ""), show_default=not isinstance(default, list) or bool(default))
        params.append(inspect.Parameter(prefix + f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=Annotated[kind | None if default is None else kind, option]))  # fmt: skip
    return params


def build(cls, values: dict, prefix: str = ""):
    """An instance of `cls` from parsed option values (empty repeated options are their default)."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        if prefix + f.name in values:
            value = values[prefix + f.name]
            if isinstance(value, list | tuple) and not value and f.default is None:
                value = None
            kwargs[f.name] = list(value) if isinstance(value, tuple) else value
    try:
        return cls(**kwargs)
    except MechscopeError as error:  # the config names its fields; the user typed options
        raise MechscopeError(as_options(str(error), [prefix + f.name for f in dataclasses.fields(cls)])) from None


def as_options(message: str, names: list[str]) -> str:
    """`message` with each field name written as the user typed it: `d_model=300` and `fire_share 2.0`
    become `--d-model 300` and `--fire-share 2.0`."""
    for name in sorted(names, key=len, reverse=True):
        message = re.sub(rf"(?<![\w-]){re.escape(name)}(=| (?=[-\d'\[(]))", "--" + name.replace("_", "-") + " ", message)
    return message


def with_options(cls, skip: tuple[str, ...] = ()):
    """Decorator: add the options of the dataclass `cls` to a command function, passed to it as `config=`."""

    def decorate(fn):
        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.name != "config"]
        extra = dataclass_options(cls, skip)
        names = {p.name for p in extra}

        def command(**values):
            config = build(cls, {k: v for k, v in values.items() if k in names})
            return fn(config=config, **{k: v for k, v in values.items() if k not in names})

        command.__signature__ = sig.replace(parameters=own + extra)
        command.__name__, command.__doc__ = fn.__name__, fn.__doc__
        return command

    return decorate
