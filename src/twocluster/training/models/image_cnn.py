"""A small VGG-style CNN for images ``[height, width, channels]`` scaled to [0, 1].

Three blocks of a 3x3 convolution with BatchNorm and 2x2 max pooling, then global average
pooling (small enough to train on two CPU cores in a couple of minutes). Augmentation (training
only): random shifts (:func:`augmentation`) and Gaussian noise.
"""

from __future__ import annotations

import numpy as np

from twocluster.store.featurespec import FeatureSpec
from twocluster.training.augment import random_shift
from twocluster.training.models import ArchitectureError, conv_block


def build(feature_spec: FeatureSpec, num_classes: int, sample: np.ndarray, *, augment: bool):
    import keras
    from keras import layers

    if len(feature_spec.feature_shape) != 3:
        raise ArchitectureError(f"image_cnn needs [height, width, channels] features, the dataset has {feature_spec.feature_shape}")
    height, width, channels = feature_spec.feature_shape
    pixel_level = layers.Normalization(axis=-1, name="pixel_normalization")
    pixel_level.adapt(sample.reshape(-1, height, width, channels))

    inputs = keras.Input(shape=(height, width, channels), name=feature_spec.feature_name)
    x = pixel_level(inputs)
    if augment:
        x = layers.GaussianNoise(0.1, name="noise")(x)
    for filters in (32, 64, 128):
        x = conv_block(x, layers.Conv2D(filters, 3, padding="same", use_bias=False), layers.MaxPooling2D(2))
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.3)(x)
    logits = layers.Dense(num_classes, dtype="float32", name="logits")(x)
    return keras.Model(inputs, logits, name="image_cnn")


def augmentation(feature_spec: FeatureSpec) -> list:
    """Training only, in front of the model: shifts of up to 1/10 of the height and width (a
    digit is not always centred), zeros (the background) filling the gap. No flips: a mirrored
    digit is another symbol."""
    height, width, _ = feature_spec.feature_shape
    return [random_shift({1: max(1, height // 10), 2: max(1, width // 10)}, fill="zero", name="shift")]
