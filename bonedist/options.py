"""Typed options written once: a dataclass field carries its help, choices, bounds and flag, and from it come both
the validation and the command-line flags (``TrainConfig``, ``InputConfig`` and every model's options).

    @dataclass
    class Options:
        drop_rate: float = option(0.5, "dropout of the head", minimum=0)

    add_arguments(parser.add_argument_group("model"), Options)   # --drop-rate
    check_fields(Options(drop_rate=-1))                          # BonedistError: --drop-rate must be >= 0, got -1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from dataclasses import field

from bonedist import BonedistError


def option(default, help: str, choices: tuple | None = None, group: str = "", minimum: float | None = None,
           cli: bool = True, flag: str | None = None, maximum: float | None = None, aliases: tuple[str, ...] = (),
           parse: typing.Callable[[str], typing.Any] | None = None, metavar: str | None = None):
    """A dataclass field with its help text, allowed values, flag group, bounds and flag spelling; ``aliases`` are
    earlier spellings of the flag (accepted with a deprecation line), ``parse`` turns the flag's text into the
    field's value (a comma list, a mapping) where the type alone cannot."""
    meta = {"help": help, "choices": choices, "group": group, "minimum": minimum, "maximum": maximum, "cli": cli,
            "flag": flag, "aliases": tuple(aliases), "parse": parse, "metavar": metavar}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or f"--{f.name.replace('_', '-')}"


def check_fields(obj, prefix: str = "") -> None:
    """Raise ``BonedistError`` naming the flag for a value outside its field's choices or bounds."""
    for f in dataclasses.fields(obj):
        value, meta = getattr(obj, f.name), f.metadata
        if value is None or not meta:
            continue
        flag = prefix + flag_of(f)
        if meta.get("choices") and value not in meta["choices"]:
            raise BonedistError(f"{flag} must be one of {', '.join(map(str, meta['choices']))}, got {value!r}")
        low, high = meta.get("minimum"), meta.get("maximum")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if low is not None and value < low:
                bound = ">= 0" if low == 0 else "positive" if low < 1e-6 else f"at least {low:g}"
                raise BonedistError(f"{flag} must be {bound}, got {value}")
            if high is not None and value > high:
                raise BonedistError(f"{flag} must be at most {high:g}, got {value}")


def parse_value(text: str):
    """A literal option value: JSON numbers/booleans/null, else the string itself (never evaluated as code)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _converter(kind) -> typing.Callable | None:
    text = str(kind)
    if text.startswith("int"):
        return int
    if text.startswith("float"):
        return float
    if text.startswith("str") and "|" not in text.replace("str | None", "str"):
        return str
    return parse_value  # unions such as "str | float": JSON first, else the text


class _Store(argparse._StoreAction):
    """``store``, saying once that an earlier spelling of the flag is deprecated."""

    def __init__(self, *args, deprecated: tuple[str, ...] = (), canonical: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self.deprecated, self.canonical = deprecated, canonical

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string in self.deprecated:
            print(f"{parser.prog}: warning: {option_string} is deprecated; use {self.canonical}",
                  file=sys.stderr)
        super().__call__(parser, namespace, values, option_string)


def _help(f: dataclasses.Field, show_default: bool) -> str:
    """The field's help and, with ``show_default``, its default (stated once: in the field)."""
    text = f.metadata["help"]
    value = f.default if f.default is not dataclasses.MISSING else None
    if not show_default or value in (None, "", (), []) or "default" in text or isinstance(value, bool):
        return text
    shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
    return f"{text} (default {shown})"


def add_arguments(group, cls, seen: set[str] | None = None, default=None,
                  where: typing.Callable[[dataclasses.Field], bool] | None = None, raw: bool = False,
                  show_defaults: bool = False) -> None:
    """One flag per CLI field of the dataclass ``cls`` (booleans as --x/--no-x) that ``where`` accepts; flags in
    ``seen`` are skipped (and added to it). ``default=None`` leaves every flag None unless given (the caller fills
    in the field's default); ``raw`` keeps the text for the caller to convert (model options: by the chosen
    model's own field types); ``show_defaults`` appends each field's default to its help (commands without
    presets)."""
    for f in dataclasses.fields(cls):
        if not f.metadata or not f.metadata.get("cli", True) or (where is not None and not where(f)):
            continue
        flag = flag_of(f)
        if seen is not None:
            if flag in seen:
                continue
            seen.add(flag)
        if str(f.type).startswith("bool"):
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                               help=_help(f, show_defaults))
            continue
        choices = f.metadata.get("choices")
        kw = {"dest": f.name, "type": None if raw else (f.metadata.get("parse") or _converter(f.type)),
              "default": default, "action": _Store, "metavar": f.metadata.get("metavar"),
              "choices": choices if not raw or all(isinstance(c, str) for c in choices or ()) else None}
        group.add_argument(flag, help=_help(f, show_defaults), **kw)
        for alias in f.metadata.get("aliases", ()):  # accepted, not shown: one deprecation line when used
            group.add_argument(alias, help=argparse.SUPPRESS, deprecated=(alias,), canonical=flag, **kw)


def convert(f: dataclasses.Field, text, flag: str | None = None):
    """A raw flag value as field ``f``'s type (``add_arguments(raw=True)``); a bad value is one line."""
    if not isinstance(text, str) or str(f.type).startswith("bool"):
        return text
    kind = f.metadata.get("parse") or _converter(f.type)
    try:
        return kind(text)
    except (TypeError, ValueError):
        name = getattr(kind, "__name__", "value")
        raise BonedistError(f"{flag or flag_of(f)}: expected {'an' if name == 'int' else 'a'} {name}, got {text!r}") \
            from None


def given(args: argparse.Namespace, cls) -> dict:
    """The fields of ``cls`` that were given on the command line (not None)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if f.metadata.get("cli", True) and getattr(args, f.name, None) is not None}


def build(cls, values: dict, what: str):
    """``cls(**values)``; an unknown key is one line naming it and the known ones."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise BonedistError(f"{what} has no option {', '.join(map(repr, unknown))}; its options: "
                            f"{', '.join(names) or 'none'}")
    return cls(**values)
