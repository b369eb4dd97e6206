"""The Airflow side: the DAG factory, the run-time decisions its tasks make (arrivals, retrain policy, run summary), the training backends and the notifiers."""

import importlib.util
import sys


def _import_lazily(name: str) -> None:
    """Put module ``name`` in ``sys.modules`` unexecuted (``importlib.util.LazyLoader``): it runs
    on first attribute access.

    Why: the Spark provider's hook imports the Kubernetes provider's ``kube_client`` at module
    level (kubernetes_asyncio and aiohttp: ~5 s of the pipeline DAG file's ~6 s parse here, paid
    again by every task, which parses the file anew), but uses it only for a ``k8s://`` master,
    where it still loads, on first use. Done here, in the package's ``__init__``, so that it runs
    before :mod:`twocluster.orchestration.dag_factory` imports the provider."""
    if name in sys.modules:
        return
    try:
        spec = importlib.util.find_spec(name)
    except ImportError:
        return
    if spec is None or spec.loader is None:
        return
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    # `from package import module` then finds it as the package's attribute, without looking
    # into it (the import system's check of a sys.modules entry reads ``__spec__``, which
    # would load it).
    parent, _, child = name.rpartition(".")
    setattr(sys.modules[parent], child, module)


_import_lazily("airflow.providers.cncf.kubernetes.kube_client")
