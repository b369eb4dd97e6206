import datetime as dt

import pytest

from twocluster.store import layout


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


@pytest.mark.parametrize("bad", ["production\n", "prod\x00", "ｐｒｏｄ", "prod/../x", ""])
def test_names_are_matched_whole_on_ascii(bad):
    """Issue 14, item 3: ``re.match`` with ``$`` let "production\\n" through, ``\\d`` full-width
    digits."""
    with pytest.raises(layout.LayoutError):
        layout.check_name(bad)


@pytest.mark.parametrize("bad", ["20261122T013000Z-1a2b3c4d\n", "２０２６１１２２T013000Z-1a2b3c4d", "20261122T013000Z-1A2B3C4D"])
def test_versions_are_matched_whole_on_ascii(bad):
    with pytest.raises(layout.LayoutError):
        layout.check_version(bad)
    assert layout.version_from_folder("v=" + bad) is None


@pytest.mark.parametrize("bad", ["2026-11-22\n", "２０２６-11-22", "2026-1-22"])
def test_dates_are_matched_whole_on_ascii(bad):
    with pytest.raises(layout.LayoutError):
        layout.check_date(bad)


def test_run_ids_that_differ_anywhere_get_different_keys():
    from twocluster.orchestration.runs import training_run_id

    long_a, long_b = "manual__" + "x" * 130 + "a", "manual__" + "x" * 130 + "b"
    assert training_run_id("p", "2026-11-20", long_a) != training_run_id("p", "2026-11-20", long_b)
    assert all(len(training_run_id("p", "2026-11-20", r)) <= 128 for r in (long_a, long_b))
    # Replaced characters cannot make two ids collide either.
    assert training_run_id("p", "2026-11-20", "a b") != training_run_id("p", "2026-11-20", "a/b")
    assert layout.run_key("r:1+0") != layout.run_key("r_1_0") != layout.run_key("r+1:0")
    # Ordinary ids stay readable and unchanged.
    assert training_run_id("p", "2026-11-20", "scheduled__2026-11-20T00:00:00+00:00") == "p.2026-11-20.scheduled__2026-11-20T00:00:00+00:00"
    assert layout.run_key("ui-train") == "ui-train"


@pytest.mark.parametrize("key", ["a//b", "a/\nb", "a/b\x00", "a/./b"])
def test_store_keys_with_control_characters_or_empty_segments_are_refused(tmp_path, key):
    from twocluster.store.storage import ObjectStore, StorageError

    store = ObjectStore(tmp_path.as_uri())
    with pytest.raises(StorageError):
        store.write_bytes(key, b"x")
