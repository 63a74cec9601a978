"""``train.py`` imported as a module by the tests that run it in-process (it is a script, not in the package)."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def import_train() -> ModuleType:
    """The ``train`` module, loaded once per test session (later calls get the same module)."""
    loaded = sys.modules.get("train")
    if loaded is not None and Path(getattr(loaded, "__file__", "")).resolve() == ROOT / "train.py":
        return loaded
    spec = importlib.util.spec_from_file_location("train", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module
