"""A published model's serving copy: the same network as ONNX, run by ONNX Runtime.

Why a second format next to ``model.keras``: scoring runs in Spark's Python workers, and a fresh
worker that loads a Keras model first imports TensorFlow (15-22 s and ~800 MB per worker on the
project's 2-core machine, measured with ``/usr/bin/time python -c "import tensorflow"``), once per
worker per Spark application — most of a daily scoring job's wall time. ONNX Runtime imports and
opens the same model in well under a second. The trainer writes the copy where TensorFlow already
is (the export step); the gate and every scoring worker check it against the trainer's recorded
logits (``load_test.npz``) before using it, so a conversion that changed the numbers can never
score. A version without the copy (trained on another backend, or a conversion that failed)
scores through Keras as before.

This module is the serving contract both sides share (the file names, the runtime wrapper, the
check); it needs only ONNX Runtime, a base dependency of the package (every image installs
it). The conversion, which needs TensorFlow and tf2onnx, is the trainer's
(:func:`twocluster.training.trainer.export_onnx`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

ONNX_FILE = "model.onnx"
PROBE_FILE = "load_test.npz"  # a fixed batch and the trained model's logits for it
PROBE_ATOL = 1e-3  # the largest logit difference a reloaded or converted model may show
ONNX_OPSET = 17


class ServingCopyError(ValueError):
    """A serving copy that does not reproduce the trained model."""


class OnnxModel:
    """An ONNX model behind the two Keras calls scoring and the gate use (``predict_on_batch``,
    ``predict``), on ``threads`` CPU threads (the Spark task's cores: one Python worker per task
    slot already runs, so the runtime must not spread over every core)."""

    def __init__(self, path: Path, threads: int = 1):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        declared = self.session.get_inputs()[0]
        self.input_name, self.example_shape = declared.name, tuple(declared.shape[1:])

    def predict_on_batch(self, x: np.ndarray) -> np.ndarray:
        # Keras accepts a batch whose examples hold the same values in another shape (a trailing
        # channel axis of 1); the ONNX graph takes exactly its declared shape.
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(len(x), *self.example_shape)
        return self.session.run(None, {self.input_name: x})[0]

    def predict(self, x: np.ndarray, verbose: int = 0, batch_size: int = 256) -> np.ndarray:
        del verbose  # Keras' signature
        return np.concatenate([self.predict_on_batch(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def check_probe(model, probe_inputs: np.ndarray, probe_logits: np.ndarray, what: str, atol: float = PROBE_ATOL) -> None:
    """``model`` must reproduce the trainer's logits on the recorded batch."""
    logits = np.asarray(model.predict(probe_inputs, verbose=0))
    if logits.shape != probe_logits.shape or not np.all(np.isfinite(logits)):
        raise ServingCopyError(f"{what}: returned {logits.shape} outputs, expected finite {probe_logits.shape}")
    worst = float(np.max(np.abs(logits - probe_logits))) if logits.size else 0.0
    if worst > atol:
        raise ServingCopyError(f"{what}: logits differ from the trainer's by up to {worst:.2e} (> {atol:g})")


def load_probe(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    probe = np.load(folder / PROBE_FILE)
    return probe["inputs"], probe["logits"]
