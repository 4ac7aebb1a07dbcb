"""Inference model: the trained network exported as a program that can only do tensor math.

Owns the export of a checkpoint to `models/inference.pt2` with normalisation and test-time
augmentation baked in (`export`), the check that refuses any archive that is not pure tensor
computation (`safe_archive`: shipped with the logged model, so it imports nothing of this
package), and the fast-start JSON copy of an exported program (`fast_program`).
"""

from deep_repro.inference.export import (
    ChannelAffine,
    Equivalence,
    EquivalenceError,
    Int8Linear,
    NormalisedClassifier,
    build_inference_module,
    check_equivalence,
    export,
    fold_batchnorm,
    load_checkpoint,
    load_exported_program,
    load_inference_model,
    measure_latency,
    predict_logits,
    pure_layers,
    quantize_int8,
    read_checked_model,
)

__all__ = [
    "ChannelAffine",
    "Equivalence",
    "EquivalenceError",
    "Int8Linear",
    "NormalisedClassifier",
    "build_inference_module",
    "check_equivalence",
    "export",
    "fold_batchnorm",
    "load_checkpoint",
    "load_exported_program",
    "load_inference_model",
    "measure_latency",
    "predict_logits",
    "pure_layers",
    "quantize_int8",
    "read_checked_model",
]
