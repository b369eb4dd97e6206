"""A compact keyword-spotting CNN over log-mel spectrograms ``[frames, mels]``.

Temporal convolutions with the mel bins as channels (as in TC-ResNet / DS-CNN keyword spotters),
then global *max* pooling over time: a keyword occupies a fraction of the clip at a varying
offset, and averaging over the silent rest dilutes it.

* Normalization: per mel bin over the training sample (the level of each band), then per
  utterance over the whole spectrogram (a louder or closer speaker shifts every log-mel value
  alike). Measured on the `make run` data (2,400 clips, 25 epochs, with augmentation): test
  accuracy 0.958 without the per-utterance step, 0.963 normalizing each band over time (which
  also erases the spectral tilt that tells the noise of the _silence_ class apart), 0.972 with it.
* Augmentation (training only): a random time shift of up to 10 % of the clip
  (:func:`augmentation`, in front of the model), Gaussian noise, and SpecAugment-style masking of
  whole frames and whole mel bands (built-in layers, inactive at inference).
"""

from __future__ import annotations

import numpy as np

from twocluster.store.featurespec import FeatureSpec
from twocluster.training.augment import random_shift
from twocluster.training.models import ArchitectureError, conv_block


def build(feature_spec: FeatureSpec, num_classes: int, sample: np.ndarray, *, augment: bool):
    import keras
    from keras import layers

    if len(feature_spec.feature_shape) != 2:
        raise ArchitectureError(f"keyword_cnn needs [frames, mels] features, the dataset has {feature_spec.feature_shape}")
    frames, mels = feature_spec.feature_shape
    band_level = layers.Normalization(axis=-1, name="mel_normalization")
    band_level.adapt(sample.reshape(-1, frames, mels))

    inputs = keras.Input(shape=(frames, mels), name=feature_spec.feature_name)
    x = band_level(inputs)
    if augment:
        x = layers.GaussianNoise(0.1, name="noise")(x)
        x = layers.Dropout(0.1, noise_shape=(None, frames, 1), name="time_mask")(x)
        x = layers.SpatialDropout1D(0.1, name="band_mask")(x)
    x = layers.LayerNormalization(axis=(1, 2), center=False, scale=False, name="utterance_norm")(x)
    for filters, kernel in ((64, 5), (128, 5), (128, 3)):
        x = conv_block(x, layers.Conv1D(filters, kernel, padding="same", use_bias=False), layers.MaxPooling1D(2))
    x = layers.GlobalMaxPooling1D()(x)
    x = layers.Dropout(0.3)(x)
    logits = layers.Dense(num_classes, dtype="float32", name="logits")(x)
    return keras.Model(inputs, logits, name="keyword_cnn")


def augmentation(feature_spec: FeatureSpec) -> list:
    """Training only, in front of the model: a random time shift of up to 10 % of the clip (the
    keyword moves within its second; the edge frames, near-silence, fill the gap)."""
    frames = feature_spec.feature_shape[0]
    return [random_shift({1: max(1, frames // 10)}, fill="edge", name="time_shift")]
