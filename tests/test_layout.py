import datetime as dt

import pytest

from twocluster import layout


@pytest.mark.parametrize("bad", ["../etc", "a/b", "A", "", "x;rm -rf /", "a b", "-lead", "x" * 65, None])
def test_names_that_could_escape_or_reach_a_shell_are_refused(bad):
    with pytest.raises(layout.LayoutError, match="pipeline"):
        layout.dataset_date_prefix(bad, "2026-11-20")


@pytest.mark.parametrize("bad", ["2026-13-01", "2026-11-20/../..", "20261120", "yesterday", "2026-02-30"])
def test_bad_dates_are_refused(bad):
    with pytest.raises(layout.LayoutError, match="YYYY-MM-DD"):
        layout.raw_date_prefix("speech_commands", bad)


def test_layout_matches_the_design():
    v = layout.new_version_id(dt.datetime(2026, 11, 22, 1, 30, tzinfo=dt.UTC))
    assert v.startswith("20261122T013000Z-")
    assert layout.dataset_version_prefix("speech_commands", dt.date(2026, 11, 20), v) == f"datasets/speech_commands/date=2026-11-20/v={v}"
    assert layout.model_version_prefix("kws_cnn", v) == f"models/kws_cnn/versions/v={v}"
    assert layout.model_alias_prefix("kws_cnn", "production") == "models/kws_cnn/aliases/production"
    assert layout.predictions_version_prefix("speech_commands", "2026-11-20", v).startswith("predictions/speech_commands/date=2026-11-20/v=")
    assert layout.manifest_key("a/v=x/") == "a/v=x/_MANIFEST.json"
    assert layout.version_from_folder(f"v={v}") == v
    assert layout.version_from_folder("v=../../x") is None
    with pytest.raises(layout.LayoutError):
        layout.model_version_prefix("kws_cnn", "../../x")


def test_version_ids_are_unique_within_a_second():
    now = dt.datetime(2026, 11, 22, tzinfo=dt.UTC)
    assert len({layout.new_version_id(now) for _ in range(200)}) == 200
