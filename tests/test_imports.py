"""What the modules import: the standard library only, and the house's rule.

The rule makes the architecture visible in the file list. The app's process types
(`webapp`, `worker`, `clock`) never import each other: they meet only in the backing
services (`session_store`, `job_queue` with its Redis scripts in `job_scripts` and its
lease watch in `leases`) and the plumbing beside them (`database`, `tasks`, the web
process's HTTP in `web_input`, `web_receiver` and `web_server`, and `redis_client`, a
leaf that imports nothing of the project). The platform (`launcher`, `formation`,
`health`, `router`, `logs`) and the app never import each other: the platform runs the
app's commands from the Procfile, as Heroku runs anyone's.
"""
import ast
import sys

from conftest import REPO

PROCESSES = {"webapp", "worker", "clock"}
SHARED = {  # the backing services and the plumbing the processes share
    "session_store", "job_queue", "job_scripts", "leases", "database", "tasks", "web_input",
    "web_receiver", "web_server", "redis_client", "page"}
PLATFORM = {"launcher", "router", "formation", "logs", "health"}


def imports_of(module: str) -> set[str]:
    """The top-level names a module imports (absolute imports; the project uses no others)."""
    path = REPO / f"{module}.py"
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def modules() -> set[str]:
    return {path.stem for path in REPO.glob("*.py")}


def test_every_app_module_imports_only_the_standard_library():
    allowed = set(sys.stdlib_module_names) | modules() | {"__future__"}
    outside = [f"{module}.py: {name}" for module in sorted(modules())
               for name in sorted(imports_of(module) - allowed)]
    assert len(modules()) >= 2
    assert outside == []


def test_every_module_has_a_place_in_the_house():
    assert modules() == PROCESSES | SHARED | PLATFORM


def test_process_types_meet_only_in_backing_services():
    for module in PROCESSES:
        assert imports_of(module) & (PROCESSES | PLATFORM) <= {module}, module


def test_what_the_processes_share_imports_no_process_and_no_platform():
    for module in SHARED:
        assert not imports_of(module) & (PROCESSES | PLATFORM), module


def test_the_platform_imports_nothing_of_the_app():
    for module in PLATFORM:
        assert not imports_of(module) & (PROCESSES | SHARED), module


def test_the_redis_client_is_a_leaf():
    assert not imports_of("redis_client") & modules()
