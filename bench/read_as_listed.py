"""What reading raw inputs as listed costs (issue 33), two figures:

    read_as_listed:  a day's clips featurized by the task's own function (``featurizing_function``
                     over the Arrow listing, one process, file://), each read re-checked against
                     its listing (``ObjectStore.read_listed``: opened from the store's root with
                     O_NOFOLLOW | O_NONBLOCK, fstat size and mtime, read to one byte past the
                     listed size); baseline: the same function with the plain read it replaced
                     (``read_bytes``: no re-check). Clips per second, a run each side in turn.
    s3_listing:      listing a raw day's prefix on the local Ceph RGW with pyarrow's S3 listing
                     (what the store uses) against boto3's ``list_objects_v2`` paginator (which
                     would carry ETags). Seconds per listing.

Run alone: `.venv/bin/python bench/read_as_listed.py`.
"""

from __future__ import annotations

import datetime as dt
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DATE = dt.date(2026, 11, 5)
REPEATS = 5


def featurize_rates(workdir: Path, clips: int) -> dict:
    from twocluster.spark.io import featurizing_function, list_inputs
    from twocluster.spec import default_spec_path, load_pipeline_spec
    from twocluster.store.storage import ObjectStore
    from twocluster_demo import sample_data

    spec = load_pipeline_spec(default_spec_path("speech_commands"))
    store = ObjectStore((workdir / "store").as_uri())
    sample_data.generate_day(store, spec, DATE, clips=clips, seed=1, bad_files=0)
    inputs, _, _ = list_inputs(store, spec, DATE)
    batches = inputs.combine_chunks().to_batches(max_chunksize=256)

    def rate() -> float:
        started = time.perf_counter()
        done = sum(b.num_rows for b in featurizing_function(spec, store)(iter(batches)))
        return done / (time.perf_counter() - started)

    as_listed = ObjectStore.read_listed

    def plain(self, listed, max_bytes):  # the read before issue 33: by key, no re-check
        return self.read_bytes(listed.key)

    runs = {"as_listed": [], "plain": []}
    try:
        rate()  # warm: the featurizer, the page cache
        for _ in range(REPEATS):
            ObjectStore.read_listed = as_listed
            runs["as_listed"].append(rate())
            ObjectStore.read_listed = plain
            runs["plain"].append(rate())
    finally:
        ObjectStore.read_listed = as_listed
    return {"clips": inputs.num_rows, **runs}


def listing_seconds(workdir: Path, objects: int) -> dict | None:
    if not shutil.which("radosgw"):
        return None

    from twocluster.store.storage import ObjectStore
    from twocluster_devtools.local_s3 import LocalRGW

    with LocalRGW(workdir / "rgw") as rgw:
        rgw.create_bucket("bench")
        store = ObjectStore("s3://bench", rgw.s3_settings)
        prefix = f"raw/p/date={DATE}"
        with ThreadPoolExecutor(32) as pool:
            list(pool.map(lambda i: store.write_bytes(f"{prefix}/l{i % 12}/c{i:06d}.wav", b"x" * 100), range(objects)))

        def via_pyarrow() -> int:
            return len(store.list(prefix))

        def via_boto3() -> int:
            pages = store._s3_client.get_paginator("list_objects_v2").paginate(Bucket="bench", Prefix=prefix + "/")
            return sum(len(page.get("Contents", [])) for page in pages)

        runs = {"pyarrow": [], "boto3": []}
        assert via_pyarrow() == via_boto3() == objects
        for _ in range(REPEATS):
            for name, listing in (("pyarrow", via_pyarrow), ("boto3", via_boto3)):
                started = time.perf_counter()
                listing()
                runs[name].append(time.perf_counter() - started)
        return {"objects": objects, **runs}


def run(workdir: Path, clips: int = 2400, objects: int = 6000, with_s3: bool = True) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    return {"featurize": featurize_rates(workdir / "featurize", clips),
            "listing": listing_seconds(workdir / "listing", objects) if with_s3 else None}


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        result = run(Path(folder))
    f = result["featurize"]
    a, b = statistics.median(f["as_listed"]), statistics.median(f["plain"])
    print(f"featurize {f['clips']} clips: as listed {a:,.0f} clips/s, plain read {b:,.0f} clips/s ({a / b:.3f}x)")
    if result["listing"]:
        s = result["listing"]
        p, q = statistics.median(s["pyarrow"]), statistics.median(s["boto3"])
        print(f"list {s['objects']} objects on RGW: pyarrow {p * 1000:.0f} ms, boto3 {q * 1000:.0f} ms ({q / p:.2f}x)")
    sys.exit(0)
