"""SparkSession settings that matter for these jobs, set in one place, and the two ways a job
gets its session: its own Spark application (spark-submit, or ``master`` for tests and scripts),
or a session on a long-lived Spark Connect server (``SPARK_REMOTE``, as PySpark reads it), whose
JVM and Python workers stay warm between jobs.

* Arrow batches are small (``ARROW_BATCH_ROWS``): a featurized row carries ~16 KB of float32
  features, so the default 10,000-row batches would hold ~160 MB per batch per worker. The jobs
  chunk their own listings (``map_listing``'s ``batch_rows``), so the session's settings are the
  same for every job and both jobs of a run share one Spark Connect session.
* Python workers are reused across tasks, so each pays the featurizer's start-up (librosa's
  filterbank, numba) once, not once per task.
* Shuffle partitions follow the cores instead of the default 200, which is far too many for
  the few-MB shuffles these jobs do.
* Object-store IO happens in Python (pyarrow.fs), so no Hadoop S3A configuration is needed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import threading
import uuid

log = logging.getLogger(__name__)

ARROW_BATCH_ROWS = 64  # rows of ~16 KB of features: ~1 MB a batch

# Settings of the session: a Spark Connect session sets these itself, on any server. They are the
# same for every job: a job's own batch sizes travel with its functions, never in the session,
# so the preprocessing and scoring jobs join one shared session and its warm Python workers.
SESSION_SETTINGS = {
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.sql.adaptive.enabled": "true",
    "spark.sql.execution.arrow.maxRecordsPerBatch": str(ARROW_BATCH_ROWS),
}

# Settings of the application: given to a job's own application, and to a local Spark Connect
# server when it starts (twocluster_devtools.spark_connect); a deployment's server sets them in
# its spark-defaults.conf.
SPARK_SETTINGS = {
    **SESSION_SETTINGS,
    "spark.python.worker.reuse": "true",
    "spark.ui.showConsoleProgress": "false",
    # Not spark.sql.execution.pandas.udf.buffer.size = 1 MB (set here until 2026-12): its two
    # 1 MB stream buffers per Python task are "humongous" objects for G1 (1 MB heap regions), and
    # each forced a collection (44 for 20 tasks); G1 then grew the driver's heap to cut their
    # rate, by a varying amount: the driver JVM peaked at 413-515 MB for the same job. What
    # crosses the JVM here is the listing's task ids and the tasks' small outcome rows.
    # A persisted DataFrame is cached in column batches of this many rows. A featurized row is
    # ~16 KB, so the default 10,000 rows would be a 160 MB column buffer per batch; 512 rows is
    # ~8 MB. (Caching 38,400 featurized clips still ran out of a 1 GB local heap with it: open.)
    "spark.sql.inMemoryColumnarStorage.batchSize": "512",
}


REMOTE_ENV = "SPARK_REMOTE"  # PySpark's own: a Spark Connect URL, sc://host:port[/;token=...]
CONNECT_MODE_ENV = "SPARK_CONNECT_MODE_ENABLED"  # PySpark sets it in a process that opens a Connect session


@contextlib.contextmanager
def connect_mark_left_as_it_was():
    """PySpark marks a process that opens a Connect session (``SPARK_CONNECT_MODE_ENABLED``):
    its later classic Spark calls (a DDL string's parsing, the functions) then go to Connect,
    and its children inherit the mark (a spark-submit driver refuses to start without a remote
    URL). For a process that runs classic Spark and opens a Connect session on the side."""
    marked = os.environ.get(CONNECT_MODE_ENV)
    try:
        yield
    finally:
        if marked is None:
            os.environ.pop(CONNECT_MODE_ENV, None)


def get_spark(app_name: str, master: str | None = None):
    """The active SparkSession, or a new one with this project's settings. Under spark-submit
    the master comes from the command line; ``master`` is for tests and scripts. With
    ``$SPARK_REMOTE`` set, a session on that Spark Connect server (:func:`connect_session`)."""
    from pyspark.sql import SparkSession

    # py4j logs every connection close at INFO, including from __del__ at interpreter exit.
    logging.getLogger("py4j").setLevel(logging.WARNING)
    if os.environ.get(REMOTE_ENV) and not master:
        # The task's on_kill terminates this client. The session outlives it (it is shared),
        # so SIGTERM raises KeyboardInterrupt, which PySpark's client answers by interrupting
        # its running operation: the killed job's tasks stop instead of running on.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.default_int_handler)
        return connect_session(os.environ[REMOTE_ENV], app_name)

    builder = SparkSession.builder.appName(app_name)
    if master:
        builder = builder.master(master)
    for key, value in SPARK_SETTINGS.items():
        builder = builder.config(key, value)
    cores = os.cpu_count() or 2
    builder = builder.config("spark.sql.shuffle.partitions", str(2 * cores))
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark


def stop_spark(spark) -> None:
    """Stop a job's session: its own application's JVM, or, on a Spark Connect server, this
    client only (the shared session stays for the next job).

    PySpark's ``SparkContext.stop`` then shuts its accumulator server down and waits for it: the
    server's one connection (from the JVM, now stopped) is polled once a second, so that wait was
    ~1 s of every job (0.9 s measured, 2026-12-07). Marking the server shut down lets the poll
    loop end on its own in a daemon thread that nothing has to wait for."""
    context = getattr(spark, "_sc", None)
    server = getattr(context, "_accumulatorServer", None)
    if server is not None:
        server.server_shutdown = True  # the handler's loop condition: it returns within its 1-s poll
        context._accumulatorServer = None  # so stop() does not wait for it
    spark.stop()


# How many closed shared sessions a client steps over before it gives up (the server keeps a
# tombstone of each closed session, 1,000 by default: spark.connect.session.manager.
# closedSessionsTombstonesSize; a step is a new client and one config call). A daily pipeline
# on a server with the default 60-min idle timeout adds a step a day, until tombstones age out
# of the server's cache: a deployment sets the timeout above its runs' spacing.
SESSION_GENERATIONS = 1000


def shared_session_id(package: str, settings: dict[str, str], generation: int = 0) -> str:
    """The Spark Connect session that every job of this code (``package``: the shared
    package's content-addressed name) and these session ``settings`` joins: a UUID derived from
    both, so jobs that could not run differently share one session (and its warm Python
    workers), and a code or settings change starts another. ``generation`` steps past a
    session the server has closed (its idle timeout)."""
    material = json.dumps([package, sorted(settings.items()), generation]).encode()
    return str(uuid.UUID(bytes=hashlib.sha256(material).digest()[:16], version=4))


def connect_session(url: str, app_name: str, package_cache: str | os.PathLike[str] | None = None):
    """A session on the Spark Connect server at ``url`` with this project's session settings and
    the shared package as a session artifact: the server's Python workers import this exact
    code, whatever the server has installed (as ``--py-files`` gives a submitted job).

    The session is shared (:func:`shared_session_id`): Spark starts Python workers per session
    (their key carries the session's artifact UUID), so a session per job paid ~3-4 s of fresh
    workers on two cores each time, the featurizer's set-up and the model load included, where
    a job on the warm workers of the same code's session pays ~0.2 s (measured on the local
    server). A session's settings are part of its id, so jobs sharing it set the same values.
    ``spark.stop()`` closes this client and leaves the session to the next job; the server
    ends it after its idle timeout (``spark.connect.session.manager.defaultSessionTimeout``,
    60 min by default), and the next job then steps to the next generation's session.
    A ``session_id`` given in ``url`` is used as it is. Python workers themselves last a minute
    idle (Spark's worker factory stops them then; the session's daemon stays and forks new ones)."""
    from pyspark.errors import PySparkException
    from pyspark.sql import SparkSession

    from twocluster.spark.packaging import default_cache_dir, package_zip

    package = package_zip(package_cache or default_cache_dir())
    given = ";session_id=" in url
    for generation in range(1 if given else SESSION_GENERATIONS):
        joined = url if given else _with_session_id(url, shared_session_id(package.name, SESSION_SETTINGS, generation))
        spark = None
        try:
            spark = SparkSession.builder.remote(joined).create()
            spark.release_session_on_close = False
            for key, value in {**SESSION_SETTINGS, "spark.app.name": app_name}.items():
                spark.conf.set(key, value)
        except PySparkException as e:
            if spark is not None:
                spark.stop()
            if e.getCondition() == "INVALID_HANDLE.SESSION_CLOSED" and not given:
                continue
            raise
        spark.addArtifacts(str(package), pyfile=True)
        # Which session a job ran on, for its log: the server's UI and logs name sessions by id.
        log.info("Spark Connect session %s (%s)", spark.client._session_id,
                 "given in the URL" if given else f"shared by this code's jobs, generation {generation}")
        return spark
    raise RuntimeError(f"every one of {SESSION_GENERATIONS} shared sessions on {url.split('/;')[0]} was closed; "
                       "restart the Spark Connect server")


def release_shared_session(url: str, package_cache: str | os.PathLike[str] | None = None) -> str:
    """Close the shared session that jobs of this code join on ``url``, as the server's idle
    timeout would (the bench starts a daily run's jobs on a new session this way); the next job
    steps to the next generation's. Returns the closed session's id.
    Callable from a process that runs classic Spark (:func:`connect_mark_left_as_it_was`)."""
    with connect_mark_left_as_it_was():
        spark = connect_session(url, "release", package_cache)
        spark.release_session_on_close = True
        session_id = spark.client._session_id
        spark.stop()
    return session_id


def _with_session_id(url: str, session_id: str) -> str:
    return f"{url};session_id={session_id}" if "/;" in url else f"{url.rstrip('/')}/;session_id={session_id}"


def is_connect(spark) -> bool:
    return type(spark).__module__.startswith("pyspark.sql.connect")


def parallelism(spark) -> int:
    """How many tasks the session's cluster runs at once: ``defaultParallelism``. A Spark Connect
    client has no SparkContext to ask, so it counts the partitions Spark gives a range, which it
    sizes by that number (unless ``spark.sql.leafNodeDefaultParallelism`` says otherwise)."""
    if not is_connect(spark):
        return spark.sparkContext.defaultParallelism
    from pyspark.sql import functions as F

    return int(spark.range(0, 1 << 16).select(F.spark_partition_id().alias("p")).agg(F.max("p")).first()[0]) + 1


def gpu_executor_settings(gpus_per_executor: int = 1, gpus_per_task: float = 1.0,
                          discovery_script: str = "/opt/twocluster/tools/get_gpus_resources.sh") -> dict[str, str]:
    """Spark settings for GPU executors (standalone/Kubernetes/YARN): Spark assigns GPU addresses
    to tasks, and the scoring UDF pins TensorFlow to them (``TaskContext.resources()``). Pass as
    ``--conf`` to spark-submit. Not runnable without GPUs."""
    return {
        "spark.executor.resource.gpu.amount": str(gpus_per_executor),
        "spark.executor.resource.gpu.discoveryScript": discovery_script,
        "spark.task.resource.gpu.amount": f"{gpus_per_task:g}",
    }

