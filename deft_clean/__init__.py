"""deft-clean: find wrong labels in image datasets (DeFT) and train on what is left (TeS)."""

from deft_clean.classifier import Classifier, load_classifier, predict
from deft_clean.config import BackboneConfig, DataConfig, DetectConfig, FinetuneConfig
from deft_clean.data import load_manifest
from deft_clean.deft_model import load_detector
from deft_clean.detect import detect
from deft_clean.embed import embed
from deft_clean.errors import BackboneError, ConfigError, DataError, DeftCleanError, Problem
from deft_clean.finetune import finetune
from deft_clean.results import read_results
from deft_clean.summary import DetectResult, DetectSummary
from deft_clean.version import __version__

__all__ = [
    "BackboneConfig",
    "BackboneError",
    "Classifier",
    "ConfigError",
    "DataConfig",
    "DataError",
    "DeftCleanError",
    "DetectConfig",
    "DetectResult",
    "DetectSummary",
    "FinetuneConfig",
    "Problem",
    "__version__",
    "detect",
    "embed",
    "finetune",
    "load_classifier",
    "load_detector",
    "load_manifest",
    "predict",
    "read_results",
]
