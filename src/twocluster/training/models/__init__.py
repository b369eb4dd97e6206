"""Model modules: one per architecture, named by ``model.architecture`` in the pipeline spec.

A model module is a file in this folder with

    def build(feature_spec: FeatureSpec, num_classes: int, sample: np.ndarray, *, augment: bool) -> keras.Model

returning an uncompiled Keras model that takes features shaped like ``feature_spec.feature_shape``
and returns logits. ``sample`` is a batch of training features (to adapt normalization layers).
With ``augment``, the model may hold built-in layers that act only in training (noise, dropout
masks); a module may also define

    def augmentation(feature_spec: FeatureSpec) -> list[keras.layers.Layer]

training-only layers put in front of the model while it trains
(:mod:`twocluster.training.augment`). Augmentation is thus part of the model kind, so every input
pipeline and every Keras backend trains the same thing. The exported model holds Keras's
built-in layers only: its ``.keras`` file loads wherever Keras does (the scoring side, the gate)
without importing this package.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType


class ArchitectureError(ValueError):
    """No such model module, or the dataset's features do not fit the model."""


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def module_for(architecture: str) -> ModuleType:
    if architecture not in available():
        raise ArchitectureError(f"model.architecture {architecture!r} is not a model module; available: {', '.join(available())}")
    return importlib.import_module(f"{__name__}.{architecture}")


def build_model(architecture: str, feature_spec, num_classes: int, sample, *, augment: bool):
    return module_for(architecture).build(feature_spec, num_classes, sample, augment=augment)


def conv_block(x, conv, pool):
    """``conv`` (no bias) -> BatchNorm -> ReLU -> ``pool``: the unit both CNNs stack. BatchNorm
    momentum 0.9: its moving statistics settle within the few hundred steps a small dataset gives
    (with the default 0.99 the inference-mode model collapses to chance on small data)."""
    from keras import layers

    x = layers.BatchNormalization(momentum=0.9)(conv(x))
    return pool(layers.ReLU()(x))


def augmentation_for(module: ModuleType, feature_spec) -> list:
    """The module's training-only augmentation layers (none if it defines none)."""
    return list(module.augmentation(feature_spec)) if hasattr(module, "augmentation") else []
