"""deft-clean: find wrong labels in image datasets (DeFT) and train on what is left (TeS).

The public names below are imported on first use (PEP 562), so ``import deft_clean`` and
``deft-clean --version`` do not load torch; ``deft_clean.detect`` and the like are the functions,
as they always were, even though submodules of the same name exist.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

from deft_clean.version import __version__ as __version__

_EXPORTS = {
    "Classifier": "classifier",
    "load_classifier": "classifier",
    "predict": "classifier",
    "BackboneConfig": "config",
    "DataConfig": "config",
    "DetectConfig": "config",
    "FinetuneConfig": "config",
    "load_manifest": "data",
    "load_detector": "deft_model",
    "detect": "detect",
    "embed": "embed",
    "BackboneError": "errors",
    "ConfigError": "errors",
    "DataError": "errors",
    "DeftCleanError": "errors",
    "OutputError": "errors",
    "Problem": "errors",
    "finetune": "finetune",
    "read_results": "results",
    "DetectResult": "summary",
    "DetectSummary": "summary",
}
__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'deft_clean' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"deft_clean.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """Keeps an exported function (``detect``) from being replaced by its submodule when that is imported."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
