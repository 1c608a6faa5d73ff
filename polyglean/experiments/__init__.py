"""Experiments the command line runs, as library functions with typed configurations: the phase search evaluated
on labelled images (:func:`evaluate_classification`), image-space TTA over phase search (:func:`evaluate_tta`) and
shift consistency (:func:`shift_consistency`). Each keeps per-image outcomes and reports every row's change against
the plain model with a paired bootstrap interval and McNemar's exact test.

This is an application layer: it uses the search, the aggregators, TTA, data and metrics; nothing below imports it.
"""

from polyglean.experiments.classification import (
    ClassificationConfig,
    ClassificationResult,
    calibrate_adaptive,
    evaluate_classification,
    store_settings,
)
from polyglean.experiments.dense import DenseEvalConfig, evaluate_segmentation
from polyglean.experiments.common import (
    ImageSelection,
    Outcomes,
    Progress,
    base_samples,
    build_search,
    check_input_size,
    compare,
    data_fingerprint,
    model_classes,
    select_images,
)
from polyglean.experiments.shift import ShiftConsistency, load_eval_model, shift_consistency
from polyglean.experiments.tta import TTAConfig, TTAEvalResult, evaluate_tta

__all__ = [
    "ClassificationConfig", "ClassificationResult", "DenseEvalConfig", "ImageSelection", "Outcomes", "Progress",
    "ShiftConsistency", "TTAConfig", "TTAEvalResult", "base_samples", "build_search", "calibrate_adaptive",
    "check_input_size", "compare", "data_fingerprint", "evaluate_segmentation",
    "evaluate_classification", "evaluate_tta", "load_eval_model", "model_classes", "select_images",
    "shift_consistency", "store_settings",
]
