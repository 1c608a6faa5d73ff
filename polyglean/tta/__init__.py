"""Image-space test-time augmentation: policies, aggregators (Mean, Max, GPS, AugTTA, ClassTTA), and their
combination with phase search (every view searched over phases, then the views aggregated)."""

from polyglean.tta.aggregators import (
    GPS,
    TTA_AGGREGATORS,
    AugTTA,
    ClassTTA,
    FitError,
    MaxTTA,
    MeanTTA,
    TTAAggregator,
    calibrated_nll,
    fit_key,
    load_fitted,
    save_fitted,
)
from polyglean.tta.augment import (
    Augmentation,
    AutoContrast,
    Brightness,
    Compose,
    Contrast,
    HFlip,
    Identity,
    PadCrop,
    Pixels,
    ResizedCrop,
    Rotate,
    Saturation,
    Scale,
    Sharpness,
    compose,
)
from polyglean.tta.cache import ViewCache
from polyglean.tta.combine import AugmentedSearch, TTAResult, ViewLogits, concat_images, search_views
from polyglean.tta.policies import POLICIES, build_policy

__all__ = [
    "GPS", "POLICIES", "TTA_AGGREGATORS", "AugTTA", "Augmentation", "AugmentedSearch", "AutoContrast", "Brightness",
    "ClassTTA", "Compose", "Contrast", "FitError", "HFlip", "Identity", "MaxTTA", "MeanTTA", "PadCrop", "Pixels",
    "ResizedCrop", "Rotate", "Saturation", "Scale", "Sharpness", "TTAAggregator", "TTAResult", "ViewCache", "ViewLogits",
    "build_policy", "calibrated_nll", "compose", "concat_images", "fit_key", "load_fitted", "save_fitted",
    "search_views",
]
