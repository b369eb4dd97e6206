"""SparkSession settings that matter for these jobs, set in one place, and the two ways a job
gets its session: its own Spark application (spark-submit, or ``master`` for tests and scripts),
or a session on a long-lived Spark Connect server (``SPARK_REMOTE``, as PySpark reads it), whose
JVM and Python workers stay warm between jobs.

* Arrow batches are small (``arrow_batch_rows``): a featurized row carries ~16 KB of float32
  features, so the default 10,000-row batches would hold ~160 MB per batch per worker.
* Python workers are reused across tasks, so each pays the featurizer's start-up (librosa's
  filterbank, numba) once, not once per task.
* Shuffle partitions follow the cores instead of the default 200, which is far too many for
  the few-MB shuffles these jobs do.
* Object-store IO happens in Python (pyarrow.fs), so no Hadoop S3A configuration is needed.
"""

from __future__ import annotations

import logging
import os

# Settings of the session: a Spark Connect session sets these itself, on any server.
SESSION_SETTINGS = {
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.sql.adaptive.enabled": "true",
}

# Settings of the application: given to a job's own application, and to a local Spark Connect
# server when it starts (twocluster.devtools.spark_connect); a deployment's server sets them in
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


def get_spark(app_name: str, arrow_batch_rows: int = 64, master: str | None = None):
    """The active SparkSession, or a new one with this project's settings. Under spark-submit
    the master comes from the command line; ``master`` is for tests and scripts. With
    ``$SPARK_REMOTE`` set, a session on that Spark Connect server (:func:`connect_session`)."""
    from pyspark.sql import SparkSession

    # py4j logs every connection close at INFO, including from __del__ at interpreter exit.
    logging.getLogger("py4j").setLevel(logging.WARNING)
    if os.environ.get(REMOTE_ENV) and not master:
        return connect_session(os.environ[REMOTE_ENV], app_name, arrow_batch_rows)

    builder = SparkSession.builder.appName(app_name)
    if master:
        builder = builder.master(master)
    for key, value in SPARK_SETTINGS.items():
        builder = builder.config(key, value)
    cores = os.cpu_count() or 2
    builder = builder.config("spark.sql.shuffle.partitions", str(2 * cores))
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(arrow_batch_rows))
    return spark


def connect_session(url: str, app_name: str, arrow_batch_rows: int = 64, package_cache: str | os.PathLike[str] | None = None):
    """A new session on the Spark Connect server at ``url``, with this project's session
    settings and the shared package as a session artifact: the server's Python workers import
    this exact code, whatever the server has installed (as ``--py-files`` gives a submitted job).
    The caller stops it (``spark.stop()``), which releases the session and its artifacts."""
    from pyspark.sql import SparkSession

    from twocluster.spark.packaging import default_cache_dir, package_zip

    spark = SparkSession.builder.remote(url).appName(app_name).create()
    for key, value in {**SESSION_SETTINGS, "spark.sql.execution.arrow.maxRecordsPerBatch": str(arrow_batch_rows)}.items():
        spark.conf.set(key, value)
    spark.addArtifacts(str(package_zip(package_cache or default_cache_dir())), pyfile=True)
    return spark


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

