"""The training job spec: the only thing besides the object store that the GPU cluster gets.

A JSON document (a file or an object in the store) that the Airflow side writes and the trainer
validates before any heavy work. Importable without TensorFlow.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from twocluster.store import layout
from twocluster.store.manifest import DataFormat
from twocluster.store.storage import ObjectStore, split_uri

StoreName = Annotated[str, AfterValidator(layout.check_name)]


class JobSpecError(ValueError):
    pass


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(25, gt=0)
    batch_size: int = Field(64, gt=0)
    learning_rate: float = Field(2e-3, gt=0)
    learning_rate_schedule: Literal["constant", "cosine"] = "constant"
    augment: bool = False
    shuffle_buffer: int = Field(4096, gt=0, description="the TFRecord pipeline's shuffle buffer; the Arrow copy is shuffled whole each epoch")


class Resources(BaseModel):
    """What the job asks its cluster for (the backends turn this into device requests/limits)."""

    model_config = ConfigDict(extra="forbid")

    gpus: int = Field(1, ge=0)


class TrainingJobSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run_id: str = Field(pattern=layout.RUN_ID_PATTERN)
    pipeline: StoreName
    datasets: list[str] = Field(min_length=1, description="dataset manifest URIs (file:// or s3://)")
    train_split: str = "train"
    validation_split: str = "validation"
    test_split: str = "test"
    model_name: StoreName
    architecture: str = Field("keyword_cnn", pattern=r"^[a-z][a-z0-9_]*$", description="a module in twocluster.training.models")
    # auto: the datasets' Arrow copy where every one has it; for older datasets, TFRecords through
    # tf.data on the TensorFlow backend and the Parquet copy on JAX/PyTorch.
    input_format: Literal["auto"] | DataFormat = "auto"
    store_uri: str = Field(description="store root that models/ is written under")
    hyperparameters: Hyperparameters = Hyperparameters()
    seed: int = 1234
    resources: Resources = Resources()

    @field_validator("datasets")
    @classmethod
    def _manifest_uris(cls, uris: list[str]) -> list[str]:
        for uri in uris:
            if not uri.startswith(("file:///", "s3://")) or not uri.endswith("/" + layout.MANIFEST_NAME):
                raise ValueError(f"{uri!r} is not a dataset manifest URI (file:///... or s3://.../{layout.MANIFEST_NAME})")
        return uris

    @field_validator("store_uri")
    @classmethod
    def _store_uri(cls, uri: str) -> str:
        if not uri.startswith(("file:///", "s3://")):
            raise ValueError(f"{uri!r} must be a file:///absolute/path or s3://bucket/prefix URI")
        return uri

    def fingerprint(self) -> str:
        """What the run trains from: datasets, splits, model, architecture, input format,
        hyper-parameters, seed and the trainer's code. Equal fingerprints train the same model, so a
        rerun returns the finished version; a rerun after the dates were reprocessed (other dataset
        versions) or the code changed trains a new one. The run id, store and resources are not
        part of it."""
        from twocluster.version import code_hashes

        inputs = self.model_dump(mode="json", exclude={"run_id", "store_uri", "resources"})
        canonical = json.dumps({**inputs, "trainer_code": code_hashes()["trainer"]}, sort_keys=True, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def parse_job_spec(text: str | bytes, source: str) -> TrainingJobSpec:
    try:
        return TrainingJobSpec.model_validate(json.loads(text))
    except json.JSONDecodeError as e:
        raise JobSpecError(f"{source}: not JSON: {e}") from None
    except ValidationError as e:
        problems = "\n".join(f"  {'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg'].removeprefix('Value error, ')}" for err in e.errors())
        raise JobSpecError(f"{source}: invalid training job spec:\n{problems}") from None


def load_job_spec(location: str, store: ObjectStore | None = None) -> TrainingJobSpec:
    """From a local path or a ``file://``/``s3://`` URI; a URI under ``store``'s root is read with
    that store's settings (the Airflow side's identity, not whatever ``AWS_*`` the process has)."""
    if store is not None and location.startswith(store.root_uri.rstrip("/") + "/"):
        return parse_job_spec(store.read_bytes(location[len(store.root_uri.rstrip("/")) + 1:]), location)
    if "://" in location:
        folder, name = split_uri(location)
        return parse_job_spec(ObjectStore(folder).read_bytes(name), location)
    try:
        return parse_job_spec(Path(location).read_bytes(), location)
    except OSError as e:
        raise JobSpecError(f"{location}: cannot read the training job spec: {e.strerror}") from None
