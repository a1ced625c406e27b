"""Which config keys a stage run reads: a test tool for "no setting is silently ignored".

``trace(cfg)`` swaps each section dataclass of a loaded config for a subclass whose attribute
reads are recorded under their dotted key while ``reads.on``. Reads made by ``dataclasses``
itself (asdict for config.yaml, replace) do not count; the copies ``replace`` makes are of the
recording subclass, so a stage that reads a field through such a copy is still seen.
"""

from __future__ import annotations

import dataclasses
import sys


class Reads:
    def __init__(self):
        self.keys: set[str] = set()
        self.on = False


def _by_dataclasses() -> bool:
    f = sys._getframe(2)
    return f.f_code.co_filename.endswith("dataclasses.py")


def trace(obj, reads: Reads, prefix: str = ""):
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        return obj
    cls = type(obj)
    names = {f.name for f in dataclasses.fields(obj)}

    def __getattribute__(self, name):
        value = object.__getattribute__(self, name)
        if reads.on and name in names and not _by_dataclasses():
            if not dataclasses.is_dataclass(value):
                reads.keys.add(prefix + name)
        return value

    obj.__class__ = type(cls.__name__, (cls,), {"__getattribute__": __getattribute__})
    for f in dataclasses.fields(cls):
        trace(object.__getattribute__(obj, f.name), reads, f"{prefix}{f.name}.")
    return obj


def leaves(cls, prefix: str = "") -> list[str]:
    """Every dotted leaf key of a config dataclass (sections recursed into)."""
    import typing

    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += leaves(tp, f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out
