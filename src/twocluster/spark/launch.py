"""How a job's own Spark application starts when its driver runs beside the task (a local or a
standalone client-mode driver): what a daily job does not need is left out of its start.

Measured on two cores, an empty ``spark-submit`` (a session and one two-task Python job) took
11-13 s, almost all of it the driver JVM's own start: loading and verifying ~10,000 classes from
Spark's jars (for the session and again for the first query), compiling hot paths, and the UI.

* **Class-data sharing** (JDK 17's dynamic AppCDS): the first job's driver JVM dumps the classes
  it loaded into an archive at exit (``-XX:ArchiveClassesAtExit``, ~150 MB, ~15 s more for that one
  job); every later driver maps it (``-XX:SharedArchiveFile``) instead of loading and verifying
  the classes again. The archive is only valid for the JVM and the class path it was dumped with,
  so its name carries a digest of both (a JVM that finds it invalid anyway runs without it:
  ``-Xshare:auto``, the default). The dump goes to a name of its own and is renamed into place
  only once its job has succeeded (:meth:`DriverStart.publish`; a killed JVM's partial dump is
  removed), so a reader never maps a half-written archive and two first jobs cannot corrupt
  each other's.
* **C1 only** (``-XX:TieredStopAtLevel=1``): the driver's JVM work is planning and moving Arrow
  batches; C2's optimizations never pay back within a daily job, their compile threads compete
  with the Python workers for the two cores.
* **No UI** on a local master: a local application's UI lives as long as the job, where nobody
  looks at it (its event log is what outlives it). A cluster's driver keeps its UI.

:func:`twocluster.spark.session.stop_spark` removes the last second: PySpark's own ``stop``
waits up to a second for its accumulator server's poll loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

C1_ONLY = "-XX:TieredStopAtLevel=1"
QUIET_CDS = "-Xlog:cds=off -Xlog:cds+dynamic=off"  # the dump's warnings about classes it cannot archive


def archive_dir() -> Path:
    """Where class archives are kept: ``$TWOCLUSTER_WORK_DIR`` (a deployment's scratch space),
    else the system's temporary folder (as the shared package's zips)."""
    return Path(os.environ.get("TWOCLUSTER_WORK_DIR") or tempfile.gettempdir()) / "twocluster-jvm"


def spark_home() -> Path:
    """The Spark installation spark-submit runs: ``$SPARK_HOME``, else PySpark's own."""
    if os.environ.get("SPARK_HOME"):
        return Path(os.environ["SPARK_HOME"])
    import pyspark

    return Path(pyspark.__file__).parent


def java_binary() -> Path | None:
    """The ``java`` spark-class runs: ``$JAVA_HOME/bin/java``, else the first on PATH."""
    if os.environ.get("JAVA_HOME"):
        return Path(os.environ["JAVA_HOME"]) / "bin" / "java"
    found = shutil.which("java")
    return Path(found) if found else None


def class_path_directories() -> list[Path]:
    """The folders spark-submit's launcher puts on the driver's class path: Spark's conf folder
    (``$SPARK_CONF_DIR``, else ``$SPARK_HOME/conf``), Hadoop's and YARN's, and the folders of
    ``$SPARK_DIST_CLASSPATH``."""
    folders = [Path(os.environ.get("SPARK_CONF_DIR") or spark_home() / "conf")]
    folders += [Path(os.environ[name]) for name in ("HADOOP_CONF_DIR", "YARN_CONF_DIR") if os.environ.get(name)]
    folders += [Path(entry) for entry in os.environ.get("SPARK_DIST_CLASSPATH", "").split(os.pathsep) if entry and not entry.endswith("*")]
    return folders


def archivable() -> bool:
    """Whether JDK 17 can share classes for this class path: it refuses one holding a non-empty
    folder ("Cannot have non-empty directory in paths"), and a JVM asked to dump the archive
    then fails at its exit, after the job has run (measured on the stack's standalone cluster,
    whose ``$SPARK_CONF_DIR`` holds its spark-defaults.conf)."""
    return not any(folder.is_dir() and any(folder.iterdir()) for folder in class_path_directories())


def archive_path(directory: Path | None = None) -> Path | None:
    """The class archive for this JVM and this Spark installation's class path (None without a
    JVM): a digest of the JVM binary (its real path, size and time) and the jars' names and sizes."""
    java = java_binary()
    if java is None or not java.exists():
        return None
    real = java.resolve()
    stat = real.stat()
    digest = hashlib.sha256(f"{real}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    jars = spark_home() / "jars"
    for jar in sorted(jars.glob("*.jar")) if jars.is_dir() else ():
        digest.update(f"\0{jar.name}\0{jar.stat().st_size}".encode())
    return (directory or archive_dir()) / f"spark-driver-{digest.hexdigest()[:16]}.jsa"


@dataclass
class DriverStart:
    """The driver JVM's options for one job, and the archive it dumps (if it is the first)."""

    java_options: str
    dumping_to: Path | None = None
    archive: Path | None = None

    def publish(self) -> bool:
        """Rename the archive this job's JVM dumped into place. Call it only once that JVM has
        exited normally (the job succeeded): a JVM killed while dumping leaves a partial file,
        which :meth:`discard` removes. True when an archive was published."""
        if self.dumping_to is None or self.archive is None:
            return False
        try:
            if self.dumping_to.stat().st_size > 1 << 20:
                os.replace(self.dumping_to, self.archive)
                return True
        except FileNotFoundError:
            return False
        self.discard()
        return False

    def discard(self) -> None:
        """Remove what this job's JVM dumped (the job failed or was killed)."""
        if self.dumping_to is not None:
            self.dumping_to.unlink(missing_ok=True)


STALE_DUMP_SECONDS = 6 * 3600  # a dump older than this was left by a process killed before it could discard it


def _remove_stale_dumps(directory: Path) -> None:
    now = time.time()
    for leftover in directory.glob("*.dumping"):
        with contextlib.suppress(OSError):
            if now - leftover.stat().st_mtime > STALE_DUMP_SECONDS:
                leftover.unlink()


def driver_start(directory: Path | None = None) -> DriverStart:
    """The options for a driver JVM started beside the task: C1 only, and the class archive,
    mapped when it exists, else dumped by this job (none where the class path cannot be archived:
    :func:`archivable`) (:meth:`DriverStart.publish` once it has
    succeeded, :meth:`DriverStart.discard` if it has not)."""
    archive = archive_path(directory) if archivable() else None
    if archive is None:
        return DriverStart(C1_ONLY)
    if archive.exists():
        return DriverStart(f"{C1_ONLY} -XX:SharedArchiveFile={archive} {QUIET_CDS}", archive=archive)
    archive.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_dumps(archive.parent)
    dumping_to = archive.with_name(f"{archive.stem}.{uuid.uuid4().hex[:8]}.dumping")
    return DriverStart(f"{C1_ONLY} -XX:ArchiveClassesAtExit={dumping_to} {QUIET_CDS}", dumping_to, archive)


def is_local(master: str) -> bool:
    return master == "local" or master.startswith("local[")


DRIVER_JAVA_OPTIONS = "spark.driver.extraJavaOptions"  # the launcher applies it to a client-mode driver's JVM


def submit_conf(master: str, start: DriverStart, java_options: str | None = None) -> dict[str, str]:
    """spark-submit's ``--conf`` for a job whose driver runs beside the task on ``master``;
    ``java_options`` (the caller's own) come after the start's, so the JVM takes them."""
    conf = {DRIVER_JAVA_OPTIONS: f"{start.java_options} {java_options}" if java_options else start.java_options}
    if is_local(master):
        conf["spark.ui.enabled"] = "false"
    return conf


@contextlib.contextmanager
def quick_start(master: str, directory: Path | None = None, java_options: str | None = None) -> Iterator[dict[str, str]]:
    """spark-submit's ``--conf`` for one job started the quick way (:func:`driver_start`,
    :func:`submit_conf`); the archive its JVM dumped is published when the block ends normally
    (the job succeeded) and discarded when it raises (a failed or killed JVM's dump may be partial)."""
    start = driver_start(directory)
    try:
        yield submit_conf(master, start, java_options)
    except BaseException:
        start.discard()
        raise
    start.publish()
