"""Stable, speaker-disjoint train/validation/test assignment.

This is the Speech Commands dataset's own rule (``which_set`` in TensorFlow's
``speech_commands/input_data.py``): the part of the file name before ``_nohash_`` identifies the
speaker, and a SHA-1 of it picks the split. Every clip of a speaker lands in the same split on
every day and every machine, and the real dataset's ``validation_list.txt`` / ``testing_list.txt``
are reproduced exactly.
"""

from __future__ import annotations

import hashlib
import posixpath
import re

TRAIN, VALIDATION, TEST = "train", "validation", "test"
SPLITS = (TRAIN, VALIDATION, TEST)

_MAX_NUM_WAVS_PER_CLASS = 2**27 - 1  # ~134M, the constant of the original implementation
_NOHASH_RE = re.compile(r"_nohash_.*$")


def source_id(path: str) -> str:
    """The speaker / source id of an input path: ``<id>_nohash_<n>.wav`` -> ``<id>``; a name
    without ``_nohash_`` is its own source (its stem)."""
    name = posixpath.basename(path)
    stripped = _NOHASH_RE.sub("", name)
    if stripped == name:
        stripped = name.rsplit(".", 1)[0]
    return stripped


def split_for_source(source: str, validation_percent: float, testing_percent: float) -> str:
    digest = hashlib.sha1(source.encode("utf-8")).hexdigest()
    percentage = (int(digest, 16) % (_MAX_NUM_WAVS_PER_CLASS + 1)) * (100.0 / _MAX_NUM_WAVS_PER_CLASS)
    if percentage < validation_percent:
        return VALIDATION
    if percentage < validation_percent + testing_percent:
        return TEST
    return TRAIN


def split_for_path(path: str, validation_percent: float, testing_percent: float) -> str:
    return split_for_source(source_id(path), validation_percent, testing_percent)
