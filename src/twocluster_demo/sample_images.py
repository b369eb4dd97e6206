"""Sample images: real handwritten digits arriving day by day in the folder-per-label layout.

No dataset can be downloaded here; scikit-learn ships one inside its wheel: the 1,797 scanned
handwritten digits of the UCI "Optical Recognition of Handwritten Digits" set (8x8, 17 grey
levels; ``sklearn.datasets.load_digits``). Each is written as the PNG a scanner would produce,
upscaled to 32x32 with bicubic interpolation, in the layout Keras' ``image_dataset_from_directory``
and torchvision's ``ImageFolder`` read, so that a real image set drops in unchanged::

    raw/<pipeline>/date=<YYYY-MM-DD>/<label>/digit_<n>.png

The images are dealt out over the dates in a fixed shuffled order (a date gets the next
``images_per_day``; past the end of the set the order starts again, so later dates repeat earlier
images rather than inventing new ones). A few broken arrivals per day (empty, truncated, not an
image, a JPEG named .png, an unknown label folder) exercise the rejects. The set has no writer
ids, so every image is its own source for the split (held-out test images come from writers
also seen in training; say so when quoting accuracy).

Deterministic: the same seed, dates and size give byte-identical files; a finished date gets
the create-only ``_ARRIVED.json`` marker and is skipped by later calls.
"""

from __future__ import annotations

import datetime as dt
import io
import json
from collections import Counter
from dataclasses import asdict
from functools import lru_cache

import numpy as np
from PIL import Image

from twocluster.spec import PipelineSpec
from twocluster.store import layout
from twocluster.store.storage import ObjectStore
from twocluster_demo.sample_data import DayReport, SampleDataError

BAD_KINDS = ("empty", "truncated", "not_image", "jpeg_named_png", "unknown_label")
SIZE = 32


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images, digits.target


def _png(image_8x8: np.ndarray) -> bytes:
    pixels = np.clip(image_8x8 * (255.0 / 16.0), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels, mode="L").resize((SIZE, SIZE), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _order(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(len(_digits()[1]))


def day_indices(dates: list[dt.date], date: dt.date, per_day: int, seed: int) -> np.ndarray:
    """Which images arrive on ``date``: the ``per_day`` after those of the earlier dates."""
    order = _order(seed)
    start = sorted(dates).index(date) * per_day
    return order[np.arange(start, start + per_day) % len(order)]


def render_bad_files(spec: PipelineSpec, date: dt.date, count: int, seed: int) -> dict[str, bytes]:
    rng = np.random.default_rng([seed, date.toordinal(), 77])
    label = spec.labels.keywords[0]
    good = _png(_digits()[0][0])
    jpeg = io.BytesIO()
    Image.open(io.BytesIO(good)).save(jpeg, format="JPEG")
    made = {"empty": (label, b""), "truncated": (label, good[: len(good) // 2]), "not_image": (label, rng.bytes(2048)),
            "jpeg_named_png": (label, jpeg.getvalue()), "unknown_label": ("letters", good)}
    files: dict[str, bytes] = {}
    for i in range(count):
        kind = BAD_KINDS[(date.toordinal() + i) % len(BAD_KINDS)]
        folder, data = made[kind]
        files[f"{folder}/bad{i:02d}{kind.replace('_', '')}.png"] = data
    return files


def generate_day(store: ObjectStore, spec: PipelineSpec, dates: list[dt.date], date: dt.date, images: int, seed: int,
                 bad_files: int = 0, force: bool = False) -> DayReport:
    prefix = layout.raw_date_prefix(spec.name, date)
    marker = f"{prefix}/{layout.ARRIVED_MARKER}"
    if store.exists(marker) and not force:
        return DayReport(**{**json.loads(store.read_bytes(marker)), "skipped": True})
    if spec.featurizer.kind != "image":
        raise SampleDataError(f"pipeline {spec.name!r} is not an image pipeline")
    vocabulary = spec.labels.keywords
    pictures, targets = _digits()
    files, per_label = {}, Counter()
    for index in day_indices(dates, date, images, seed):
        label = str(targets[index])
        if label not in vocabulary:
            raise SampleDataError(f"digit {label} is not a label of pipeline {spec.name!r} ({vocabulary})")
        files[f"{label}/digit_{index:04d}.png"] = _png(pictures[index])
        per_label[label] += 1
    files.update(render_bad_files(spec, date, bad_files, seed))
    for rel, data in sorted(files.items()):
        store.write_bytes(f"{prefix}/{rel}", data)
    report = DayReport(date=date.isoformat(), prefix=prefix, clips=len(files) - bad_files, bad_files=bad_files,
                       per_label=dict(sorted(per_label.items())), bytes=sum(len(d) for d in files.values()))
    if force:
        store.delete(marker)
    store.put_if_absent(marker, json.dumps({k: v for k, v in asdict(report).items() if k != "skipped"}, indent=2).encode())
    return report


def generate(store: ObjectStore, spec: PipelineSpec, dates: list[dt.date], images_per_day: int, seed: int = 0,
             bad_files_per_day: int = 0, force: bool = False) -> list[DayReport]:
    return [generate_day(store, spec, dates, d, images_per_day, seed, bad_files_per_day, force) for d in dates]
