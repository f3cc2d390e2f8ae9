"""deft-clean: find wrong labels in image datasets (DeFT) and train on what is left (TeS)."""

from deft_clean.config import BackboneConfig, DataConfig, DetectConfig, FinetuneConfig
from deft_clean.errors import BackboneError, ConfigError, DataError, DeftCleanError, Problem

__version__ = "0.1.0"

__all__ = [
    "BackboneConfig",
    "BackboneError",
    "ConfigError",
    "DataConfig",
    "DataError",
    "DeftCleanError",
    "DetectConfig",
    "FinetuneConfig",
    "Problem",
    "__version__",
]
