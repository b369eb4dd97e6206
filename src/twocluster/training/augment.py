"""Training-time augmentation layers that run on every Keras backend under ``jit``.

Keras's own geometric augmentation layers (``RandomTranslation``, ``RandomZoom``, ``RandomCrop``)
declare ``supports_jit = False``, which turns off compilation for the whole model: measured on an
H200 under JAX, the image model trained at 1.3 s per step with them and about 10 ms without.
These layers are written with ``keras.ops`` and ``keras.random`` only, so the training step stays
compiled. They wrap the model during training only (:func:`with_augmentation`); the exported
model is the bare one, so loading it never needs this package.
"""

from __future__ import annotations

from typing import Literal


def _layers():
    import keras
    from keras import ops

    @keras.saving.register_keras_serializable(package="twocluster")
    class RandomShift(keras.layers.Layer):
        """Shift each example by a random whole number of steps along some axes (time frames,
        image rows and columns), independently per example. ``fill="edge"`` repeats the border
        (a log-mel spectrogram's silence), ``"zero"`` fills with zeros (an image's background)."""

        def __init__(self, max_shift: dict[int, int], fill: Literal["edge", "zero"] = "edge", seed: int | None = None, **kwargs):
            super().__init__(**kwargs)
            self.max_shift = {int(k): int(v) for k, v in max_shift.items()}
            self.fill = fill
            self.seed = seed
            self.seed_generator = keras.random.SeedGenerator(seed)

        def call(self, x, training=False):
            if not training:
                return x
            batch = ops.shape(x)[0]
            for axis, limit in self.max_shift.items():
                n = x.shape[axis]
                shift = keras.random.randint((batch, 1), -limit, limit + 1, seed=self.seed_generator)
                index = ops.arange(n)[None, :] - shift  # [batch, n]: where each output step reads from
                valid = ops.logical_and(index >= 0, index < n)
                index = ops.clip(index, 0, n - 1)
                shape = [1] * len(x.shape)
                shape[0], shape[axis] = -1, n
                gathered = ops.take_along_axis(x, ops.broadcast_to(ops.reshape(index, shape), ops.shape(x)), axis=axis)
                if self.fill == "zero":
                    gathered = gathered * ops.cast(ops.broadcast_to(ops.reshape(valid, shape), ops.shape(x)), x.dtype)
                x = gathered
            return x

        def get_config(self):
            return {**super().get_config(), "max_shift": self.max_shift, "fill": self.fill, "seed": self.seed}

    return RandomShift


def random_shift(max_shift: dict[int, int], fill: Literal["edge", "zero"] = "edge", **kwargs):
    return _layers()(max_shift, fill, **kwargs)


def with_augmentation(model, layers: list):
    """``model`` behind ``layers`` (active in training only), sharing its weights: train this,
    export ``model``."""
    import keras

    if not layers:
        return model
    inputs = keras.Input(shape=model.input_shape[1:], name=model.inputs[0].name)
    x = inputs
    for layer in layers:
        x = layer(x)
    return keras.Model(inputs, model(x), name=f"{model.name}_training")
