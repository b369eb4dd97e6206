from __future__ import annotations

import copy

import pytest
import yaml

from twocluster.spec import SpecError, default_spec_path, load_pipeline_spec, parse_pipeline_spec


@pytest.fixture
def spec_doc() -> dict:
    return yaml.safe_load(default_spec_path("speech_commands").read_text())


def test_shipped_spec_is_valid(speech_spec):
    assert speech_spec.name == "speech_commands"
    assert speech_spec.labels.vocabulary[:2] == ["_silence_", "_unknown_"]
    assert len(speech_spec.labels.vocabulary) == 12
    assert speech_spec.labels.label_for_folder("yes") == "yes"
    assert speech_spec.labels.label_for_folder("marvin") == "_unknown_"
    assert speech_spec.labels.label_for_folder("_silence_") == "_silence_"
    assert speech_spec.labels.label_for_folder("banana") is None


def _set(doc: dict, dotted: str, value):
    doc = copy.deepcopy(doc)
    *parents, leaf = dotted.split(".")
    node = doc
    for p in parents:
        node = node[p]
    if value is _DELETE:
        del node[leaf]
    else:
        node[leaf] = value
    return doc


_DELETE = object()


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("featurizer.num_mel_bins", -3, r"featurizer\.log_mel\.num_mel_bins: Input should be greater than 0 \(got -3\)"),
        ("featurizer.upper_edge_hz", 9000.0, r"featurizer\.log_mel: upper_edge_hz \(9000.0\) exceeds the Nyquist frequency 8000.0"),
        ("featurizer.kind", "mfcc", r"featurizer: Input tag 'mfcc' found using 'kind' does not match"),
        ("model.name", "../other", r"model\.name: name '\.\./other' is not allowed"),
        ("name", "Speech Commands", r"  name: name 'Speech Commands' is not allowed"),
        ("scoring.alias", "prod;rm -rf /", r"scoring\.alias: name 'prod;rm -rf /' is not allowed"),
        ("thresholds.max_reject_rate", 1.5, r"thresholds\.max_reject_rate: Input should be less than or equal to 1"),
        ("splits.testing_percent", 95, r"splits: validation_percent \+ testing_percent must leave room"),
        ("labels.keywords", [True, "no"], r"labels\.keywords\.0: Input should be a valid string \(got True\)"),
        ("labels.unknown_words", ["yes"], r"labels: label folder 'yes' is listed twice"),
        ("model.epochs", "many", r"model\.epochs: Input should be a valid integer"),
        ("model.bogus", 1, r"model\.bogus: Extra inputs are not permitted"),
        ("store_uri", "/data/store", r"store_uri: Value error|store_uri: '/data/store' must be a file:///"),
        ("start_date", "soon", r"start_date: Input should be a valid date"),
        ("labels", _DELETE, r"labels: Field required"),
        ("retention.grace_hours", 6, r"retention\.grace_hours \(6\) is below the longest job timeout \(12 h\)"),
        ("inputs.max_depth", 1000, r"inputs\.audio\.max_depth: Input should be less than or equal to 64"),
        ("arrivals.days_ahead", -1, r"arrivals\.days_ahead: Input should be greater than or equal to 0"),
    ],
)
def test_bad_specs_name_the_field(spec_doc, field, value, expected):
    with pytest.raises(SpecError, match=expected) as info:
        parse_pipeline_spec(_set(spec_doc, field, value), "pipelines/broken.yaml")
    assert str(info.value).startswith("pipelines/broken.yaml: invalid pipeline spec")


def test_mismatched_input_and_featurizer_kinds(spec_doc):
    doc = _set(spec_doc, "inputs", {"kind": "image"})
    with pytest.raises(SpecError, match="inputs.kind 'image' needs featurizer.kind 'image', not 'log_mel'"):
        parse_pipeline_spec(doc, "x.yaml")


def test_unreadable_and_non_mapping_specs(tmp_path):
    with pytest.raises(SpecError, match="cannot read the pipeline spec"):
        load_pipeline_spec(tmp_path / "missing.yaml")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="bad.yaml: not valid YAML"):
        load_pipeline_spec(bad_yaml)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="must be a mapping, got list"):
        load_pipeline_spec(listing)


def test_store_uri_resolution_order(speech_spec, monkeypatch):
    monkeypatch.delenv("TWOCLUSTER_STORE_URI", raising=False)
    with pytest.raises(SpecError, match="no store URI for pipeline 'speech_commands'"):
        speech_spec.resolve_store_uri()
    with_uri = speech_spec.model_copy(update={"store_uri": "s3://bucket/spec"})
    assert with_uri.resolve_store_uri() == "s3://bucket/spec"
    monkeypatch.setenv("TWOCLUSTER_STORE_URI", "s3://bucket/env")
    assert with_uri.resolve_store_uri() == "s3://bucket/env"
    assert with_uri.resolve_store_uri("file:///flag") == "file:///flag"
