"""Shared fixtures: a real S3 server (Ceph RGW on 127.0.0.1) and stores on both backends."""

from __future__ import annotations

import json
import os
import secrets
import uuid
from pathlib import Path

import pytest

from twocluster.spec import PipelineSpec, default_spec_path, load_pipeline_spec
from twocluster.store.storage import ObjectStore
from twocluster_devtools.local_s3 import LocalRGW

TEST_BUCKET = "twocluster-tests"
# The test RGW's keys, chosen before anything starts: Spark executors never receive credentials
# from the driver (issue 14, item 5), they read their own environment, which a local Spark's
# Python workers inherit from the test process that launched the JVM.
RGW_KEYS = ("LOCALRGW" + secrets.token_hex(6).upper(), secrets.token_urlsafe(30))
os.environ.setdefault("AWS_ACCESS_KEY_ID", RGW_KEYS[0])
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", RGW_KEYS[1])


@pytest.fixture(scope="session")
def rgw(tmp_path_factory: pytest.TempPathFactory):
    """One Ceph RGW for the whole session, stopped at the end. Not skipped when Ceph is
    missing: `make test` installs it, and a silently skipped S3 suite would hide breakage."""
    with LocalRGW(tmp_path_factory.mktemp("rgw"), access_key=os.environ["AWS_ACCESS_KEY_ID"],
                  secret_key=os.environ["AWS_SECRET_ACCESS_KEY"]) as server:
        server.create_bucket(TEST_BUCKET)
        yield server


@pytest.fixture
def s3_store(rgw: LocalRGW) -> ObjectStore:
    """A fresh prefix in the test bucket."""
    return ObjectStore(f"s3://{TEST_BUCKET}/{uuid.uuid4().hex}", rgw.s3_settings)


@pytest.fixture
def file_store(tmp_path: Path) -> ObjectStore:
    return ObjectStore((tmp_path / "store").as_uri())


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.s3)])
def store(request: pytest.FixtureRequest) -> ObjectStore:
    """Each test using this runs once on a local folder and once on the RGW S3 server."""
    return request.getfixturevalue(f"{request.param}_store")


@pytest.fixture(scope="session")
def spark():
    """One local Spark for the session (2 cores, like the machine). Failed tasks are retried
    (``local[2,3]``), as on a cluster: a job must survive a failed task attempt."""
    import os
    import sys

    # Executors' Python workers must be this interpreter (the venv), whatever PATH says.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from twocluster.spark.session import get_spark

    session = get_spark("twocluster-tests", master="local[2,3]")
    yield session
    session.stop()


@pytest.fixture(scope="session")
def spark_connect_server(tmp_path_factory: pytest.TempPathFactory):
    """One Spark Connect server (local[2]) for the tests that run jobs on a long-lived Spark
    application, started the first time one asks for it and stopped at the end."""
    from twocluster_devtools.spark_connect import LocalSparkConnect

    with LocalSparkConnect(tmp_path_factory.mktemp("spark-connect"), cores=2) as server:
        yield server


@pytest.fixture(scope="session")
def speech_spec() -> PipelineSpec:
    return load_pipeline_spec(default_spec_path("speech_commands"))


CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture
def airflow_page():
    """A function that opens Debian's headless Chromium signed in to an Airflow API server
    through its login form: ``with airflow_page(url, user, password) as page: ...``."""
    import contextlib

    @contextlib.contextmanager
    def signed_in(url: str, user: str, password: str, viewport: dict | None = None):
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport=viewport or {"width": 1280, "height": 900})
                page.goto(f"{url}/auth/login", wait_until="networkidle")
                page.fill("input[name=username]", user)
                page.fill("input[name=password]", password)
                page.click("button[type=submit]")
                # Signed in once the app has left the login page (its own redirect to "/"): the
                # login URL matches "{url}/**" too, and a test's goto raced that redirect ("/"
                # interrupted the navigation to the DAG page: a CI failure).
                page.wait_for_url(lambda u: u.startswith(url) and "/auth/" not in u, timeout=30_000)
                page.wait_for_load_state("networkidle")
                yield page
            finally:
                browser.close()

    return signed_in


# -- the page cache (tests of reading ahead) ------------------------------------------------------


def evicted_from_page_cache(paths) -> bool:
    """Write back and drop ``paths``' pages from the kernel's page cache; whether they left it
    (not on tmpfs, where files live in memory: there is nothing to read ahead)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return all(cached_share(p) == 0.0 for p in paths)


def cached_share(path) -> float:
    """The share of ``path``'s pages in the page cache (``mincore`` over a mapping that touches
    none of them)."""
    import ctypes
    import mmap

    size = os.path.getsize(path)
    pages = -(-size // mmap.PAGESIZE)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as mapped:
        start = ctypes.c_char.from_buffer(mapped)
        vector = (ctypes.c_ubyte * pages)()
        rc = libc.mincore(ctypes.addressof(start), size, vector)
        del start  # the mapping cannot close while a pointer into it lives
        if rc != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
    return sum(v & 1 for v in vector) / pages


def cached_within(paths, seconds: float = 10.0) -> bool:
    """Whether all of ``paths`` are wholly in the page cache within ``seconds`` (the kernel reads
    ahead in the background)."""
    import time

    deadline = time.monotonic() + seconds
    while not all(cached_share(p) == 1.0 for p in paths):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


OPENLINEAGE_SPEC = Path(__file__).parent / "openlineage_spec"  # OpenLineage's own JSON schemas (see its README)


def openlineage_validator():
    """A function validating one RunEvent against OpenLineage's schemas: the event against
    ``OpenLineage.json``'s RunEvent, each facet against the facet schema its ``_schemaURL`` names
    (the local copy of that facet, whatever its version), and facets of other producers (Airflow's,
    ours) against the spec's base facet or their own published schema."""
    import jsonschema
    from referencing import Registry, Resource

    documents = {p.name: json.loads(p.read_text()) for p in [OPENLINEAGE_SPEC / "OpenLineage.json", *sorted((OPENLINEAGE_SPEC / "facets").glob("*.json")),
                                                             Path(__file__).parents[1] / "docs" / "lineage" / "RejectsDatasetFacet.json"]}
    registry = Registry().with_resources((doc["$id"], Resource.from_contents(doc)) for doc in documents.values())

    def check(schema_url: str, instance: dict) -> None:
        nonlocal registry
        base, _, fragment = schema_url.partition("#")
        name = base.rsplit("/", 1)[-1]
        if base not in registry and name in documents:  # another version of a facet we have: ours is the reference
            registry = registry.with_resource(base, Resource.from_contents(documents[name]))
        assert base in registry, f"no schema for {schema_url}"
        validator = jsonschema.Draft202012Validator({"$ref": schema_url}, registry=registry,
                                                    format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
        validator.validate(instance)

    def validate(event: dict) -> None:
        check(event["schemaURL"], event)
        facets = [*(event["run"].get("facets") or {}).values(), *(event["job"].get("facets") or {}).values()]
        for dataset in [*event.get("inputs", []), *event.get("outputs", [])]:
            facets += [*(dataset.get("facets") or {}).values(), *(dataset.get("outputFacets") or {}).values(),
                       *(dataset.get("inputFacets") or {}).values()]
        for facet in facets:
            check(facet["_schemaURL"], facet)

    return validate
