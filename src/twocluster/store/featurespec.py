"""The feature spec: what a consumer must know to use featurized data, recorded in every dataset,
model and predictions manifest (DESIGN.md, contract 4).

Typed, so a typo is an error when the manifest is written, and comparable: scoring checks
:meth:`FeatureSpec.compatible_with` before it reads any data, and the trainer refuses to mix
datasets whose specs differ.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Parameters that bound what is *accepted*, not how features are computed: a model trained with
# one limit scores inputs admitted under another.
_ADMISSION_PARAMS = frozenset({"max_source_seconds", "max_source_pixels"})


class TensorSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dtype: Literal["float32", "int64", "string"]
    shape: list[int] = Field(default_factory=list)


class TFRecordSpec(BaseModel):
    """How the dataset's ``tf.train.Example`` records are laid out."""

    model_config = ConfigDict(extra="forbid")

    compression: Literal["GZIP", "NONE"]
    features: dict[str, TensorSpec]

    def parse_spec(self, names: list[str] | None = None) -> dict:
        """``tf.io.parse_single_example``'s features argument (imports TensorFlow)."""
        import tensorflow as tf

        dtypes = {"float32": tf.float32, "int64": tf.int64, "string": tf.string}
        wanted = names or list(self.features)
        return {n: tf.io.FixedLenFeature(self.features[n].shape, dtypes[self.features[n].dtype]) for n in wanted}

    @property
    def compression_type(self) -> str:
        """The name ``tf.data.TFRecordDataset`` takes."""
        return "GZIP" if self.compression == "GZIP" else ""


class FeatureSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["log_mel", "image"]
    features: dict[str, TensorSpec] = Field(min_length=1, description="the model inputs (name -> dtype, shape)")
    params: dict[str, Any] = Field(description="the featurizer's settings")
    featurizer_code: str = Field(pattern=r"^sha256:[0-9a-f]{64}$", description="hash of the featurizer's source")
    label_vocabulary: list[str] = Field(default_factory=list, description="class names in label_id order")
    tfrecord: TFRecordSpec | None = None

    @property
    def feature_name(self) -> str:
        return next(iter(self.features))

    @property
    def feature_shape(self) -> list[int]:
        return self.features[self.feature_name].shape

    def compatible_with(self, other: FeatureSpec) -> list[str]:
        """Why features computed under ``other`` cannot be fed to a consumer of ``self`` (a model
        trained on ``self``); empty when they can. The featurizer's code hash is reported
        separately (:meth:`same_code_as`), since a pipeline may choose to only warn on it."""
        problems = []
        if self.kind != other.kind:
            problems.append(f"featurizer kind: {self.kind!r} vs {other.kind!r}")
        if self.features != other.features:
            mine = {k: v.model_dump() for k, v in self.features.items()}
            theirs = {k: v.model_dump() for k, v in other.features.items()}
            problems.append(f"features (names, dtypes, shapes): {mine} vs {theirs}")
        for key in sorted((set(self.params) | set(other.params)) - _ADMISSION_PARAMS):
            if self.params.get(key) != other.params.get(key):
                problems.append(f"featurizer.{key}: {self.params.get(key)!r} vs {other.params.get(key)!r}")
        return problems

    def same_code_as(self, other: FeatureSpec) -> bool:
        return self.featurizer_code == other.featurizer_code
