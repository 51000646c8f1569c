"""User code named in a recipe or on the command line as ``module:function``."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable

from .errors import TunelabError, one_line


def load_function(spec: str, where: str) -> Callable:
    """The function ``spec`` names; a clear error (at ``where``) when it cannot be imported or found."""
    mod_name, _, fn_name = spec.partition(":")
    if not mod_name or not fn_name:
        raise TunelabError(f"expected module:function, got {spec!r}", where)
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())  # a module beside the user (after the installed packages: none is shadowed)
    try:
        mod = importlib.import_module(mod_name)
    except Exception as e:
        raise TunelabError(f"cannot import {mod_name}: {one_line(e)}", where) from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise TunelabError(f"{mod_name} has no function {fn_name!r}", where)
    return fn
