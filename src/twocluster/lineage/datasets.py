"""The datasets each job read and wrote, as OpenLineage objects built from the committed manifests
(see :mod:`twocluster.lineage` for who reports them). Imports the OpenLineage client: a job
process imports this module only when a transport is configured."""

from __future__ import annotations

from typing import Any

import attr
from openlineage.client.event_v2 import InputDataset, OutputDataset
from openlineage.client.generated.base import DatasetFacet
from openlineage.client.generated.dataset_version_dataset import DatasetVersionDatasetFacet
from openlineage.client.generated.output_statistics_output_dataset import OutputStatisticsOutputDatasetFacet
from openlineage.client.generated.schema_dataset import SchemaDatasetFacet, SchemaDatasetFacetFields

from twocluster.store import layout
from twocluster.store.manifest import DatasetManifest, PredictionsManifest, scan_location
from twocluster.store.storage import ObjectStore

REJECTS_FACET = "twocluster_rejects"
REJECTS_FACET_SCHEMA = "https://github.com/twocluster/twocluster/blob/main/docs/lineage/RejectsDatasetFacet.json#/$defs/RejectsDatasetFacet"


@attr.define
class RejectsDatasetFacet(DatasetFacet):
    """The inputs a dataset version turned away, by reason (``docs/lineage/RejectsDatasetFacet.json``)."""

    inputs: int
    accepted: int
    rejected: int
    rejectedByReason: dict[str, int] = attr.field(factory=dict)  # noqa: N815 - OpenLineage's spelling

    @staticmethod
    def _get_schema() -> str:
        return REJECTS_FACET_SCHEMA


def naming(uri: str) -> tuple[str, str]:
    """(namespace, name) of a store URI, per OpenLineage's naming spec."""
    if uri.startswith("s3://"):
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        return f"s3://{bucket}", key.strip("/")
    if uri.startswith("file://"):
        return "file", uri.removeprefix("file://").rstrip("/")
    raise ValueError(f"no OpenLineage naming for {uri!r}")


def _input(uri: str, **facets: Any) -> InputDataset:
    namespace, name = naming(uri)
    return InputDataset(namespace=namespace, name=name, facets=facets or None)


def _output(uri: str, statistics: OutputStatisticsOutputDatasetFacet | None = None, **facets: Any) -> OutputDataset:
    namespace, name = naming(uri)
    return OutputDataset(namespace=namespace, name=name, facets=facets or None,
                         outputFacets={"outputStatistics": statistics} if statistics else None)


def _version_folder(manifest_uri: str) -> str:
    return manifest_uri.rsplit("/", 1)[0]


def _schema(feature_spec) -> SchemaDatasetFacet:
    fields = [SchemaDatasetFacetFields(name=name, type=f"{t.dtype}[{','.join(map(str, t.shape))}]")
              for name, t in feature_spec.features.items()]
    return SchemaDatasetFacet(fields=[*fields, SchemaDatasetFacetFields(name="label", type="int64"),
                                      SchemaDatasetFacetFields(name="key", type="string"),
                                      SchemaDatasetFacetFields(name="split", type="string")])


def preprocess_lineage(store: ObjectStore, pipeline: str, date: str) -> tuple[list, list]:
    """(inputs, outputs) of the date's preprocessing: its raw folder → its newest dataset version."""
    raw = raw_input(store, pipeline, date)
    latest = scan_location(store, layout.dataset_date_prefix(pipeline, date), DatasetManifest, newest_only=True).latest
    if latest is None:
        return [raw], []
    manifest: DatasetManifest = latest.manifest
    counts = manifest.counts
    out = _output(_version_folder(latest.manifest_uri),
                  OutputStatisticsOutputDatasetFacet(rowCount=counts.accepted, size=sum(f.bytes for f in manifest.files),
                                                     fileCount=len(manifest.files)),
                  version=DatasetVersionDatasetFacet(datasetVersion=latest.version), schema=_schema(manifest.feature_spec),
                  **{REJECTS_FACET: RejectsDatasetFacet(inputs=counts.input, accepted=counts.accepted, rejected=counts.rejected,
                                                        rejectedByReason=dict(counts.rejected_by_reason))})
    return [raw], [out]


def scoring_lineage(store: ObjectStore, pipeline: str, date: str) -> tuple[list, list]:
    """(inputs, outputs) of the date's scoring: its raw folder and the model version that scored
    it → its newest predictions version."""
    raw = raw_input(store, pipeline, date)
    latest = scan_location(store, layout.predictions_date_prefix(pipeline, date), PredictionsManifest, newest_only=True).latest
    if latest is None:
        return [raw], []
    manifest: PredictionsManifest = latest.manifest
    model = _input(store.uri(layout.model_version_prefix(manifest.model, manifest.model_version)),
                   version=DatasetVersionDatasetFacet(datasetVersion=manifest.model_version))
    out = _output(_version_folder(latest.manifest_uri),
                  OutputStatisticsOutputDatasetFacet(rowCount=manifest.counts.accepted, size=sum(f.bytes for f in manifest.files),
                                                     fileCount=len(manifest.files)),
                  version=DatasetVersionDatasetFacet(datasetVersion=latest.version))
    return [raw, model], [out]


def training_lineage(dataset_manifest_uris: list[str], model_manifest_uri: str, model_version: str) -> tuple[list, list]:
    """(inputs, outputs) of a training job: the dataset versions of its spec → the model version."""
    inputs = []
    for uri in dataset_manifest_uris:
        dated = layout.dated_version(uri)
        facets = {"version": DatasetVersionDatasetFacet(datasetVersion=dated[1])} if dated else {}
        inputs.append(_input(_version_folder(uri), **facets))
    return inputs, [_output(_version_folder(model_manifest_uri), version=DatasetVersionDatasetFacet(datasetVersion=model_version))]


def raw_input(store: ObjectStore, pipeline: str, date: str) -> InputDataset:
    """The date's raw folder, as an input dataset."""
    return _input(store.uri(layout.raw_date_prefix(pipeline, date)))
