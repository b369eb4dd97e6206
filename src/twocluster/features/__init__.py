"""Featurizers: one module per input kind, shared by preprocessing and scoring (no training /
serving skew). Importable without Spark or TensorFlow.

Every featurizer turns a batch of raw byte strings into a float32 array plus, for each input, a
reject reason (``None`` if it was featurized). Reasons are short stable codes that end up in the
rejects table and in the manifest's ``counts.rejected_by_reason``.
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from twocluster.spec import ImageFeaturizer as ImageFeaturizerSpec
from twocluster.spec import LogMelFeaturizer as LogMelFeaturizerSpec
from twocluster.store.featurespec import FeatureSpec, TensorSpec, TFRecordSpec
from twocluster.version import code_hashes

# Reject reasons shared by every featurizer.
EMPTY = "empty"
UNDECODABLE = "undecodable"
UNKNOWN_LABEL = "unknown_label"
TOO_LARGE = "too_large"  # bytes (from the listing: never read) or pixels (from the header)
WRONG_FORMAT = "wrong_format"  # a container the spec does not allow, or not the one the name says
BAD_NAME = "bad_name"  # control, separator or bidirectional characters, or bytes not UTF-8, in the object's name
DUPLICATE_NAME = "duplicate_name"  # the same name as another input once both are in Unicode NFC form


class FeaturizeError(ValueError):
    """One input cannot be featurized; ``reason`` is the reject code."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class FeaturizedBatch:
    features: np.ndarray  # [n, *shape] float32; rows of rejected inputs are zeros
    reasons: list[str | None]  # None = accepted
    details: list[str]  # human-readable detail for rejects ("" for accepted)
    warnings: list[str | None] | None = None  # an accepted input's content problem, where the spec says warn
    measures: list[tuple[float, ...] | None] | None = None  # an accepted input's quality measures (audio: CLIP_MEASURES)


class Featurizer:
    """Base class. Subclasses decode one input at a time (each may fail its own way) and then
    transform the decoded batch at once (vectorised)."""

    spec: LogMelFeaturizerSpec | ImageFeaturizerSpec
    feature_name: str
    shape: tuple[int, ...]  # of one featurized input
    decoded_shape: tuple[int, ...]  # of one decoded input

    def check_header(self, data: bytes, name: str, inputs) -> None:
        """Raise :class:`FeaturizeError` if the input breaks the spec's ``inputs`` limits, judged
        from its header alone (nothing decoded yet: this is what bounds a task's memory)."""

    def decode(self, data: bytes) -> np.ndarray:
        raise NotImplementedError

    def read(self, data: bytes, name: str = "", inputs=None, content: bool = False, may_be_quiet: bool = False,
             warnings: list[str] | None = None, measures: list | None = None) -> np.ndarray:
        """Decode one input; with ``inputs``, check its header against their limits first.
        Featurizers that can check and decode in one pass over the header override this. With
        ``content`` (preprocessing), the decoded input is also checked against ``inputs.content``
        where the input kind has such checks; ``may_be_quiet``: it lies in a silence folder. Where
        the checks' ``action`` is ``warn``, a content problem is appended to ``warnings`` instead
        of raised."""
        if inputs is not None:
            self.check_header(data, name, inputs)
        return self.decode(data)

    def transform(self, decoded: np.ndarray) -> np.ndarray:
        """[n, *decoded_shape] -> [n, *shape]."""
        return decoded

    def feature_spec(self, label_vocabulary: list[str] | None = None, tfrecord: TFRecordSpec | None = None) -> FeatureSpec:
        """What a consumer must know to use the features (recorded in dataset, model and
        predictions manifests), including the hash of the featurizer's code."""
        return FeatureSpec(
            kind=self.spec.kind,
            features={self.feature_name: TensorSpec(dtype="float32", shape=list(self.shape))},
            params=self.spec.model_dump(mode="json"),
            featurizer_code=code_hashes()["featurizer"],
            label_vocabulary=label_vocabulary or [],
            tfrecord=tfrecord,
        )

    def featurize_one(self, data: bytes, name: str = "", inputs=None) -> np.ndarray:
        return self.transform(self.read(data, name, inputs)[None, ...])[0]

    def featurize_many(self, blobs: Sequence[bytes | None], names: Sequence[str] | None = None, inputs=None,
                       content: bool = False, quiet_folders: frozenset[str] = frozenset()) -> FeaturizedBatch:
        """Featurize a batch; with ``inputs`` (the spec's inputs section) each blob's header is
        checked against its limits, and against its ``names`` entry, before it is decoded. With
        ``content`` (preprocessing), each decoded input is checked against ``inputs.content``;
        inputs in ``quiet_folders`` (the silence folders) may be silent."""
        decoded = np.zeros((len(blobs), *self.decoded_shape), dtype=np.float32)
        reasons: list[str | None] = []
        details: list[str] = []
        warnings: list[str | None] = []
        measures: list[tuple[float, ...] | None] = []
        for i, data in enumerate(blobs):
            found: list[str] = []
            taken: list = []
            try:
                if not data:
                    raise FeaturizeError(EMPTY, "zero bytes")
                name = names[i] if names is not None else ""
                quiet = bool(quiet_folders) and posixpath.basename(posixpath.dirname(name)) in quiet_folders
                decoded[i] = self.read(bytes(data), name, inputs, content, quiet, found, taken) if content else self.read(bytes(data), name, inputs)
                reasons.append(None)
                details.append("")
            except FeaturizeError as e:
                reasons.append(e.reason)
                details.append(e.detail)
            warnings.append(found[0] if found and reasons[-1] is None else None)
            measures.append(taken[0] if taken and reasons[-1] is None else None)
        return FeaturizedBatch(self.transform(decoded), reasons, details, warnings, measures)

    @staticmethod
    def content_problem(problem: FeaturizeError, checks, warnings: list[str] | None) -> None:
        """A content check failed: raise it, or, where ``checks.action`` is ``warn``, note it."""
        if getattr(checks, "action", "reject") == "warn" and warnings is not None:
            warnings.append(problem.reason)
            return
        raise problem


def extension_of(name: str) -> str:
    return posixpath.splitext(name)[1][1:].lower()


def featurizer_for(spec: LogMelFeaturizerSpec | ImageFeaturizerSpec) -> Featurizer:
    if spec.kind == "log_mel":
        from twocluster.features.audio import LogMelFeaturizer

        return LogMelFeaturizer(spec)
    if spec.kind == "image":
        from twocluster.features.image import ImageFeaturizer

        return ImageFeaturizer(spec)
    raise ValueError(f"no featurizer for kind {spec.kind!r}")
