"""What running the published code (LTH14/mar, LightGen) beside the engine needs in an environment
without torchvision. Imports nothing of the engine."""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types


def torchvision_standin() -> None:
    """timm imports torchvision at import time for parts MAR and FLUID never use: when the real
    one is missing (or does not load against this torch), every torchvision module becomes a
    stand-in whose attributes are inert classes."""
    try:
        import torchvision  # noqa: F401
        return
    except Exception:
        for name in [k for k in sys.modules if k.split(".")[0] == "torchvision"]:
            del sys.modules[name]

    class AnyAttr(type):   # a class whose every attribute is another such class
        def __getattr__(cls, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return AnyAttr(name, (), {"__init__": lambda self, *a, **k: None})

    class Anything(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return AnyAttr(name, (), {"__init__": lambda self, *a, **k: None})

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, fullname, path, target=None):
            if fullname.split(".")[0] == "torchvision":
                return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
            return None

        def create_module(self, spec):
            module = Anything(spec.name)
            module.__path__ = []
            return module

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, Finder())
