"""The pipeline's two operators, each with the surface of the provider it builds on.

* :class:`PipelineSparkOperator`: a Spark job (``spark_jobs/<job>.py``) through the Spark
  provider: ``spark-submit`` to whatever master the ``spark_default`` connection names, or a
  Spark Connect server when that connection is one.
* :class:`TrainingJobOperator`: a training job on the GPU cluster, on the backend the
  ``twocluster_training_backend`` variable names when the task runs
  (:mod:`twocluster.orchestration.backends`: local process, Docker, Kubernetes).

The DAG factory (:mod:`twocluster.orchestration.dag_factory`) only wires them with the tasks of
:mod:`twocluster.orchestration.runs`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
from typing import Any

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.sdk import BaseOperator

from twocluster.deployment import SPARK_JOBS_DIR
from twocluster.orchestration import backends
from twocluster.orchestration.arrivals import ArrivalDecision
from twocluster.orchestration.backends import BACKEND_VARIABLE, JobState, TrainingBackendConfig
from twocluster.orchestration.results import RunSettings, SparkJob, TrainingOutcome
from twocluster.store_access import SPARK_STORE_CONNECTION, STORE_CONNECTION, store_settings


class PipelineSparkOperator(SparkSubmitOperator):
    """A Spark job of the pipeline (``spark_jobs/<job>.py``), run where the ``spark_default``
    connection says:

    * a Spark master (type ``spark``: ``local[2]``, ``spark://...``, YARN, Kubernetes): the
      provider's spark-submit, a Spark application of its own per job, with the shared package
      zipped for ``--py-files`` (built once per code version);
    * a Spark Connect server (type ``spark_connect``, the provider's): the job's script runs as
      a Spark Connect client in a child process of the task (its URL, token included, in the
      child's ``SPARK_REMOTE``, never on a command line), on the server's warm JVM and Python
      workers: the jobs of one code version share a session (``connect_session``), whose
      artifact is the shared package. What a daily run pays for a Spark application of its
      own, ~8-10 s per job on two cores, and for cold Python workers is gone (bench: dag_run).

    Either way the job's driver gets the store's credentials in its process environment (never
    in the rendered, logged command line), and killing the task kills the job's driver (the
    provider's ``on_kill``, or the child here) before it reaches the commit, so a killed task
    leaves no job that could commit later (tests/dags/test_spark_task_kill.py). A Spark Connect
    client that is terminated interrupts its operation on the server, whose tasks stop; what
    they wrote stays in staging, which garbage collection removes."""

    template_fields = (*SparkSubmitOperator.template_fields, "run_settings", "arrivals")
    _connect_job: subprocess.Popen | None = None
    _lineage: tuple[list, list] | None = None

    def __init__(self, *, job: SparkJob | None = None, spec_path: str | None = None, run_settings: Any = None,
                 arrivals: Any = None, **kwargs):
        """``job``, ``spec_path``, ``run_settings`` (check_params' result) and, for preprocessing,
        ``arrivals`` (the arrivals sensor's): the pipeline's job for this run, its arguments made
        when the task runs. Without them, a plain ``SparkSubmitOperator`` with the routing below."""
        if job is not None:
            kwargs.setdefault("application", str(SPARK_JOBS_DIR / f"{job}.py"))
        super().__init__(**kwargs)
        self.job, self.spec_path, self.run_settings, self.arrivals = job, spec_path, run_settings, arrivals

    def execute(self, context):
        if self.run_settings is not None:
            run = RunSettings.from_xcom(self.run_settings)
            incomplete = self.arrivals is not None and not ArrivalDecision.model_validate(self.arrivals).complete
            self.application_args = run.spark_args(self.job, self.spec_path, incomplete=incomplete)
        url = self.spark_connect_url
        lineage_env = self.lineage_environment(context)
        if url is not None:
            self._run_on_spark_connect(url, lineage_env)
        else:
            from twocluster.spark.packaging import default_cache_dir, package_zip

            self.py_files = str(package_zip(default_cache_dir()))
            self.env_vars = {**(self.env_vars or {}), **self.driver_environment(), **lineage_env}
            with self._quick_driver_start():
                super().execute(context)
        self._read_lineage()

    @contextlib.contextmanager
    def _quick_driver_start(self):
        """For a client-mode driver beside this task, start its JVM the quick way
        (:func:`twocluster.spark.launch.quick_start`: the class archive, C1 only, no UI on a
        local master) for the block's job. The DAG's own ``conf`` wins, and its driver Java
        options come after these (the JVM takes the last)."""
        from twocluster.spark.launch import DRIVER_JAVA_OPTIONS, quick_start

        if not self._driver_beside_task:
            yield
            return
        own = dict(self.conf or {})
        with quick_start(self._get_hook()._connection.get("master", ""), java_options=own.pop(DRIVER_JAVA_OPTIONS, None)) as conf:
            self.conf = {**conf, **own}
            self._hook = None  # the provider's hook reads conf when it is made
            yield

    @functools.cached_property
    def spark_connect_url(self) -> str | None:
        """The Spark Connect URL when the connection is a Spark Connect server, else None
        (looked up once: both the dispatch and the driver's environment need it)."""
        from airflow.providers.apache.spark.hooks.spark_connect import SparkConnectHook
        from airflow.sdk import BaseHook

        if BaseHook.get_connection(self._conn_id).conn_type != SparkConnectHook.conn_type:
            return None
        return SparkConnectHook(self._conn_id).get_connection_url()

    def driver_environment(self) -> dict[str, str]:
        """What the Spark driver is told about the store. The driver writes datasets and
        predictions with the Spark side's credentials (its connection, where the deployment
        separates identities) only where they reach it as a process environment: a local or
        standalone client-mode driver, or the Spark Connect client this operator starts. On YARN
        and Kubernetes the provider would turn them into ``--conf spark.yarn.appMasterEnv.*`` /
        ``spark.kubernetes.driverEnv.*`` on the command line (visible in ``ps``, logs and the
        Spark UI): there the driver and executors use their own identity (instance profile, IRSA,
        a Kubernetes secret) and get only the endpoint and region. Executors never get
        credentials from here (storage.ObjectStore pickles without them)."""
        settings = store_settings(SPARK_STORE_CONNECTION, STORE_CONNECTION)
        if settings is None:
            return {}
        return settings.as_env() if self._driver_beside_task else settings.without_credentials().as_env()

    @functools.cached_property
    def _driver_beside_task(self) -> bool:
        """Whether the job's driver runs where this task does (a Spark Connect client, or a
        local / standalone client-mode driver), so a process environment reaches it (looked up
        once: the driver's environment, its lineage and its start all ask)."""
        if self.spark_connect_url is not None:
            return True
        hook = self._get_hook()
        return not (hook._is_yarn or hook._is_kubernetes or hook._connection.get("deploy_mode") == "cluster")

    def lineage_environment(self, context) -> dict[str, str]:
        """The OpenLineage parent (this task run) and, for a driver beside the task, the transport,
        so the job reports its own run under this task (:mod:`twocluster.lineage`). Never fails the task."""
        if self.job is None:
            return {}
        from twocluster.orchestration import lineage

        try:
            return lineage.job_driver_environment(context["ti"], with_transport=self._driver_beside_task)
        except Exception:  # noqa: BLE001 - lineage is a report on the job, never a reason to fail it
            self.log.warning("could not tell the job its OpenLineage parent", exc_info=True)
            return {}

    def _run_on_spark_connect(self, url: str, lineage_env: dict[str, str]) -> None:
        import sys

        from airflow.sdk.exceptions import AirflowException

        command = [sys.executable, self.application, *(str(a) for a in self.application_args or [])]
        env = {**os.environ, **(self.env_vars or {}), **self.driver_environment(), **lineage_env, "SPARK_REMOTE": url}  # PySpark's own
        self.log.info("Spark Connect job (server %s): %s", url.split("/;")[0], " ".join(command))
        self._connect_job = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in self._connect_job.stdout:
            self.log.info("%s", line.rstrip())
        returncode = self._connect_job.wait()
        if returncode:
            raise AirflowException(f"Cannot execute: {' '.join(command)}. Error code is: {returncode}.")

    def _read_lineage(self) -> None:
        """What this run's job read and wrote, from the version it committed, for the OpenLineage
        provider (:mod:`twocluster.lineage`): read here, in the task, where the
        store's connection is at hand. Never fails the task."""
        from twocluster.orchestration import lineage

        if self.run_settings is None or self.job is None or not lineage.enabled():
            return
        try:
            from twocluster.lineage.datasets import preprocess_lineage, scoring_lineage
            from twocluster.spec import load_pipeline_spec
            from twocluster.store_access import store_for

            spec = load_pipeline_spec(self.spec_path)
            date = RunSettings.from_xcom(self.run_settings).date
            read = preprocess_lineage if self.job == "preprocess" else scoring_lineage
            self._lineage = read(store_for(spec), spec.name, date)
        except Exception:  # noqa: BLE001 - lineage is a report on the job, never a reason to fail it
            self.log.warning("could not read what the job committed for OpenLineage", exc_info=True)

    def get_openlineage_facets_on_complete(self, task_instance):
        from twocluster.orchestration import lineage

        return lineage.operator_lineage(*(self._lineage or ([], [])))

    def on_kill(self) -> None:
        job = self._connect_job
        if job is None:
            return super().on_kill()
        job.terminate()
        try:
            job.wait(timeout=10)
        except subprocess.TimeoutExpired:
            job.kill()


class TrainingJobOperator(BaseOperator):
    """Run one training job (its spec's URI) on the backend the ``twocluster_training_backend``
    variable names when the task runs (:mod:`twocluster.orchestration.backends`), the same way on
    every backend: the job's external id comes from the DAG, task and run (the same for every
    try); a job of that name still running is followed (a retry, or a worker that restarted,
    re-attaches), a finished leftover is removed and the job submitted. The log is streamed into
    the task's; ``on_kill`` kills the job. Returns a :class:`TrainingOutcome` (the trainer's JSON
    result, the backend and the job's external id)."""

    template_fields = ("job_spec_uri",)
    ui_color = "#f3e6ff"

    def __init__(self, *, job_spec_uri: str, **kwargs):
        super().__init__(**kwargs)
        self.job_spec_uri = job_spec_uri
        self._running: tuple[backends.TrainingBackend, str] | None = None
        self._lineage: tuple[list, list] | None = None

    @staticmethod
    def backend_config() -> TrainingBackendConfig:
        from airflow.sdk import Variable

        return TrainingBackendConfig.from_json(Variable.get(BACKEND_VARIABLE, default=None))

    def execute(self, context: Any) -> dict:
        from airflow.sdk.exceptions import AirflowException

        config = self.backend_config()
        backend = backends.backend_for(config)
        ti = context.get("ti")
        job = backend.external_id(ti.dag_id, ti.task_id, ti.run_id) if ti is not None else \
            backend.external_id(self.dag_id if self.has_dag() else "no-dag", self.task_id, os.urandom(6).hex())
        state = backend.status(job)
        if state is JobState.RUNNING:
            self.log.info("training backend %s: re-attaching to %s, started by an earlier try", config.kind, job)
        else:
            if state is not JobState.MISSING:
                self.log.info("training backend %s: removing %s, left %s by an earlier try", config.kind, job, state)
                backend.remove(job)
            self.log.info("training backend %s (variable %s): submitting %s", config.kind, BACKEND_VARIABLE, job)
            backend.submit(job, self.job_spec_uri)
        self._running = (backend, job)
        result = ""
        for line in backend.follow(job):
            self.log.info("trainer: %s", line)
            if line.startswith("{"):
                result = line
        code = backend.exit_code(job)
        self._running = None
        if code != 0:
            raise AirflowException(f"the trainer exited with {code} ({config.kind} job {job}); see the log above")
        backend.remove(job)  # a failed job stays for inspection until the next try
        if not result:
            raise AirflowException(f"the trainer ({config.kind} job {job}) exited 0 without its JSON result")
        outcome = TrainingOutcome(backend=config.kind, job=job, **json.loads(result))
        self._read_lineage(outcome)
        return outcome.to_xcom()

    def _read_lineage(self, outcome: TrainingOutcome) -> None:
        """The job spec's dataset versions -> the model version, for the OpenLineage provider."""
        from twocluster.orchestration import lineage

        if not lineage.enabled():
            return
        try:
            from twocluster.lineage.datasets import training_lineage
            from twocluster.store.jobspec import load_job_spec
            from twocluster.store_access import store_for

            datasets = load_job_spec(self.job_spec_uri, store_for(None)).datasets
            self._lineage = training_lineage(datasets, outcome.manifest_uri, outcome.version)
        except Exception:  # noqa: BLE001 - lineage is a report on the job, never a reason to fail it
            self.log.warning("could not read the training job's lineage for OpenLineage", exc_info=True)

    def get_openlineage_facets_on_complete(self, task_instance):
        from twocluster.orchestration import lineage

        return lineage.operator_lineage(*(self._lineage or ([], [])))

    def on_kill(self) -> None:
        if self._running is not None:
            backend, job = self._running
            backend.kill(job)
