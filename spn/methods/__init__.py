"""WSOL training methods: the heads and losses of CAM/SPN training, adversarial erasing (AE),
ACoL, SPA, I2C, DANet and ICL, each usable with ``spn train --method NAME`` or on its own.

`METHODS` maps a name to the class that implements it (imported when first asked for, so
``import spn.methods`` stays light); `get_method` builds one with its options.
"""

from __future__ import annotations

import importlib
from typing import Any

from .base import Classification, Method, MethodError, MethodOutput, Step, classification_loss, parse_options

__all__ = [
    "METHODS",
    "Classification",
    "Method",
    "MethodError",
    "MethodOutput",
    "Step",
    "classification_loss",
    "get_method",
    "parse_options",
]

#: name -> "module:Class" of every method ``--method`` accepts.
METHODS: dict[str, str] = {
    "default": "spn.methods.base:Classification",
    "ae": "spn.methods.erasing:AdversarialErasing",
    "acol": "spn.methods.acol:ACoL",
    "spa": "spn.methods.spa:SPA",
    "i2c": "spn.methods.i2c:I2C",
    "danet": "spn.methods.danet:DANet",
    "icl": "spn.methods.icl:ICL",
}


def get_method(name: str, options: dict[str, Any] | None = None) -> Method:
    """The method ``name`` with ``options`` (see each method's ``defaults``).

    Example:
        >>> get_method("default")
        Classification()
    """
    if name not in METHODS:
        raise MethodError(f"unknown method {name!r}; the methods are: {', '.join(METHODS)}")
    module_name, _, class_name = METHODS[name].partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(**(options or {}))
