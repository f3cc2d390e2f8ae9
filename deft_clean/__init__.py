"""deft-clean: find wrong labels in image datasets (DeFT) and train on what is left (TeS)."""

from deft_clean.classifier import Classifier, load_classifier, predict
from deft_clean.config import BackboneConfig, DataConfig, DetectConfig, FinetuneConfig
from deft_clean.data import load_manifest
from deft_clean.deft_model import load_detector
from deft_clean.detect import detect
from deft_clean.errors import BackboneError, ConfigError, DataError, DeftCleanError, Problem
from deft_clean.finetune import finetune
from deft_clean.results import read_results

__version__ = "0.1.0"

__all__ = [
    "BackboneConfig",
    "BackboneError",
    "Classifier",
    "ConfigError",
    "DataConfig",
    "DataError",
    "DeftCleanError",
    "DetectConfig",
    "FinetuneConfig",
    "Problem",
    "__version__",
    "detect",
    "finetune",
    "load_classifier",
    "load_detector",
    "load_manifest",
    "predict",
    "read_results",
]
