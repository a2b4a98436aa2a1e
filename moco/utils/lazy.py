"""Lazy public names for a package's ``__init__`` (PEP 562).

The sub-packages hand on their public names as Detectron2's do, but a tool's ``--help`` imports
a light module of a package (``moco.utils.cli``) and must not pay for torch and Detectron2, which
its siblings import; so a name is imported from its module on first use.
"""

import importlib


def lazy_exports(package, exports):
    """``__getattr__`` for ``package``: ``exports`` maps each public name to its module."""

    def __getattr__(name):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    return __getattr__
