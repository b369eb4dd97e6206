"""The folders are the architecture: each component imports only the store contract, its own
code and its own dependency set (the pyproject extra its image installs), and no job imports a
sibling job. Static checks over the sources; they fail on the first import that crosses a line."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "twocluster"

# The distribution that provides an import name (where the two differ).
DISTRIBUTION = {"yaml": "pyyaml", "PIL": "pillow", "google_crc32c": "google-crc32c", "airflow": "apache-airflow",
                "fastapi": "apache-airflow", "botocore": "boto3", "sklearn": "scikit-learn", "docker": "apache-airflow-providers-docker",
                "kubernetes": "apache-airflow-providers-cncf-kubernetes", "pyspark": "pyspark",
                # the OpenLineage client; attrs (its facets are attrs classes) comes with it
                "openlineage": "openlineage-python", "attr": "openlineage-python"}
# Keras backends: chosen by the image, imported only inside functions that run on that backend.
BACKENDS = {"tensorflow", "jax", "torch"}
# Which extras each part of the package may use (the core dependencies always).
COMPONENT_EXTRAS = {
    "store": [], "spec.py": [], "version.py": [], "lineage": [], "deployment.py": [], "serving.py": [], "__init__.py": [],
    "store_access.py": ["airflow"],  # Airflow inside its functions, where a configuration asks Airflow
    "features": ["spark"],
    "spark": ["spark"],
    "training": ["trainer"],
    "orchestration": ["airflow"],
    "ops": ["airflow"],
    # Beside the product package: the demo's data and the local infrastructure's launchers.
    "twocluster_demo": ["spark", "trainer", "airflow", "demo"],
    "twocluster_devtools": ["airflow"],
}
# Code of the package a component may import besides its own folder.
SHARED = {"twocluster.store", "twocluster.spec", "twocluster.version", "twocluster.deployment", "twocluster.serving", "twocluster.lineage",
          "twocluster.store_access"}
MAY_IMPORT = {
    "features": SHARED,
    "spark": SHARED | {"twocluster.features"},
    "training": SHARED,
    # The orchestration launches jobs by their entry points; the gate runs in the Airflow worker,
    # the --py-files zip is built there, and a driver beside the task is started from there.
    "orchestration": SHARED | {"twocluster.training.gate", "twocluster.training.decision", "twocluster.spark.packaging",
                               "twocluster.spark.launch"},
    "ops": SHARED | {"twocluster.orchestration.arrivals", "twocluster.orchestration.notifiers"},
}


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!\[; ]", r, maxsplit=1)[0].lower() for r in requirements}


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module level) for every import in a file."""
    source = path.read_text()
    try:
        tree = ast.parse(source)
    except SystemError:  # CPython 3.11's "AST constructor recursion depth mismatch" while another
        tree = ast.parse(source)  # thread (a dying Spark gateway's) runs meanwhile: a flake, parse again
    found = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = top and not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            if isinstance(child, ast.Import):
                found.extend((alias.name, top) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.extend(((f"{child.module}.{alias.name}" if child.module == "twocluster" else child.module), top) for alias in child.names)
            visit(child, nested if not isinstance(child, ast.ClassDef) else top)

    visit(tree, True)
    return found


def _component(path: Path) -> str:
    if not path.is_relative_to(PACKAGE):
        return path.relative_to(PACKAGE.parent).parts[0]
    return path.relative_to(PACKAGE).parts[0]


SOURCES = sorted(p for package in ("twocluster", "twocluster_demo", "twocluster_devtools") for p in (PACKAGE.parent / package).rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_each_component_imports_only_its_own_dependency_set(path):
    project = _project()
    allowed = _requirement_names(project["dependencies"])
    for extra in COMPONENT_EXTRAS[_component(path)]:
        allowed |= _requirement_names(project["optional-dependencies"][extra])
    stdlib = sys.stdlib_module_names
    for module, top in _imports(path):
        name = module.split(".")[0]
        if name in stdlib or name.startswith("twocluster") or name == "__future__":
            continue
        if name in BACKENDS and not top:
            continue
        assert DISTRIBUTION.get(name, name).lower() in allowed, (
            f"{path.relative_to(ROOT)} imports {module} ({'module level' if top else 'in a function'}), which is not in its "
            f"component's dependency set {COMPONENT_EXTRAS[_component(path)]}")


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_no_component_reaches_into_another(path):
    component = _component(path)
    if component not in MAY_IMPORT:
        return
    own = f"twocluster.{component}" if not component.endswith(".py") else ""
    for module, _ in _imports(path):
        if not module.startswith("twocluster") or module.startswith(own):
            continue
        assert any(module == ok or module.startswith(ok + ".") for ok in MAY_IMPORT[component]), (
            f"{path.relative_to(ROOT)} ({component}) imports {module}")


def test_no_job_imports_a_sibling_job():
    for job, sibling in (("preprocess", "scoring"), ("scoring", "preprocess")):
        imports = [m for m, _ in _imports(PACKAGE / "spark" / f"{job}.py")]
        assert not [m for m in imports if m.startswith(f"twocluster.spark.{sibling}")], f"spark/{job}.py imports spark/{sibling}.py"


def test_each_image_installs_only_its_components_extra():
    images = {"airflow": ROOT / "docker" / "airflow" / "Dockerfile", "spark": ROOT / "docker" / "spark" / "Dockerfile",
              "trainer": ROOT / "training_jobs" / "Dockerfile"}
    extras = _project()["optional-dependencies"]
    for component, dockerfile in images.items():
        text = dockerfile.read_text()
        assert "-r requirements.lock" not in text and "-r /opt/twocluster/requirements.lock" not in text, f"{dockerfile}: installs the whole lock"
        assert re.search(rf'pip install [^\n]*-c \S*requirements\.lock [^\n]*\[{component}\]', text), f"{dockerfile}: does not install .[{component}]"
        others = set().union(*(_requirement_names(v) for k, v in extras.items() if k not in (component, "dev", "demo", "tensorflow")))
        others -= _requirement_names(extras[component]) | _requirement_names(_project()["dependencies"])
        named = set(re.findall(r"pip install[^\n]*", text)[0].split())
        assert not (others & named - {"pyspark"} if component == "airflow" else others & named), f"{dockerfile} names {others & named}"
    assert "tensorflow" not in " ".join(extras["airflow"]) and "apache-airflow" not in " ".join(extras["trainer"] + extras["spark"])
    assert "pyspark" not in " ".join(extras["trainer"])


def test_the_dev_extra_installs_every_component():
    dev = " ".join(_project()["optional-dependencies"]["dev"])
    for extra in ("airflow", "spark", "trainer", "tensorflow", "demo"):
        assert re.search(rf"twocluster\[[^\]]*\b{extra}\b", dev), extra


def test_what_spark_python_workers_import_stays_light():
    """The modules a Spark Python worker imports to run the jobs' functions (their closures
    refer to these modules). Every run starts fresh workers, so each heavy import here is paid
    per worker per run: pandas 2+ s, librosa 4.4 s (numba, scipy.signal), TensorFlow 15 s on
    this 2-core machine (scoring imports Keras only once it loads the model)."""
    import subprocess

    code = ("import sys, twocluster.spark.io, twocluster.spark.preprocess, twocluster.spark.scoring, twocluster.store.tfrecord; "
            "print(sorted(m for m in ('pandas', 'librosa', 'numba', 'scipy.signal', 'tensorflow', 'keras', 'jax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_loading_the_plugins_does_not_build_the_ops_page():
    """Every Airflow process that loads plugins (an `airflow dags test`, a task resolving its
    operator links) imports plugins/ops_monitoring.py; building the ops page's app there imported
    the ops view, its charts and the store (~1.3 s each time). The page builds on its first request."""
    import subprocess

    code = ("import sys; sys.path.insert(0, 'plugins'); import ops_monitoring; "
            "app = ops_monitoring.TwoclusterOpsPlugin.fastapi_apps[0]['app']; "
            "print(callable(app), sorted(m for m in ('twocluster.ops.opsview', 'twocluster.ops.charts', 'twocluster.store.storage') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "True []"


def test_the_environment_carries_compiled_bytecode():
    """`make venv` compiles the installed packages: uv writes no .pyc files, and where
    PYTHONDONTWRITEBYTECODE is set (CI's machines) every process would compile every module it
    imports (`airflow version` 7.3 s instead of 3.0, `import tensorflow` 24 s instead of 8)."""
    import importlib.util

    import airflow
    import pydantic
    import pyspark

    for module in (airflow, pyspark, pydantic):
        cached = importlib.util.cache_from_source(module.__file__)
        assert Path(cached).exists(), f"{module.__name__}: no bytecode at {cached}; run `make venv`"


# Dicts the orchestration reads by key that are not ours: Airflow's task context, its
# human-in-the-loop answer, pydantic's error records.
FOREIGN_DICTS = {"context", "get_current_context()", "answer", "err"}


@pytest.mark.parametrize("name", ["dag_factory.py", "runs.py", "approval.py", "operators.py"])
def test_task_results_are_typed_not_dicts_read_by_key(name):
    """Issue 34: every task result crosses XCom as a pydantic model (orchestration/results.py); a
    string-key read (``run["date"]``) would fail only at run time, a renamed field at parse time."""
    tree = ast.parse((PACKAGE / "orchestration" / name).read_text())
    reads = [f"line {node.lineno}: {ast.unparse(node)}" for node in ast.walk(tree)
             if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str)
             and ast.unparse(node.value) not in FOREIGN_DICTS]
    assert not reads, f"orchestration/{name} reads by string key: {reads}"


@pytest.mark.parametrize("path", [p for p in SOURCES if p.is_relative_to(PACKAGE)], ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_the_product_never_imports_the_demo_or_the_local_launchers(path):
    """Issue 34: ``src/twocluster`` is the product (store / spark / training / orchestration / ops);
    the demo's data and the local infrastructure live beside it, and nothing in it leans on them."""
    leaning = [m for m, _ in _imports(path) if m.split(".")[0] in ("twocluster_demo", "twocluster_devtools")]
    assert not leaning, f"{path.relative_to(ROOT)} imports {leaning}"
