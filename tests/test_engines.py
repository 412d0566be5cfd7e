"""The formation on real engines: the image (`Dockerfile`, `entrypoint.sh`), Kubernetes
(`k8s/`) and Docker Compose (`compose.yaml`) agree with what the app reads and does.

No engine runs here, so the tests check what the standard library can. The files parse:
they are plain YAML, read by a strict reader that refuses anything outside its subset
(`plain_yaml.py`). What they say matches the code: the probe path and port are the ones
a copy serves, every variable they set is one its process reads, DATABASE_URL comes from
the Secret and names the Redis they run, each engine kills a copy only after its
STOP_TIMEOUT. And the image's entrypoint and commands run, in a folder holding only what
the Dockerfile copies into the image, and each copy names itself from what its engine
provides. (`kubernetes-validate --strict` and `docker compose config` were run by hand:
docs/engines.md says how.)
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import sys
import urllib.parse
from pathlib import Path

import pytest

import clock
import webapp
import worker
from conftest import REPO, free_port, get, responds, wait_until
from database import database_from_env
from launcher import read_procfile
from plain_yaml import NotPlainYaml, Reader, read_document, read_documents, split_documents
from session_store import store_from_env

PROCESSES = {"web": webapp, "worker": worker, "clock": clock}  # the Procfile's types
FORMATION = {"web": 4, "worker": 2, "clock": 1}                 # launcher.py web=4 worker=2
DOCKER_STOP_WAITS = 10  # seconds from docker stop's SIGTERM to its SIGKILL, by default
KUBERNETES_WAITS = 30   # terminationGracePeriodSeconds, by default
EXIT_TAKES = 2          # seconds a copy may need after its STOP_TIMEOUT to be gone
HOSTNAME = "3f2a1b9c0d1e"  # what Docker sets: the container's id, short
POD_NAME = "web-7d9f8c6b5-x2k4q"


# --- What the files say --------------------------------------------------------------

def procfile() -> dict[str, list[str]]:
    """Process type -> its command, as an engine's args (the launcher's reading)."""
    return {name: shlex.split(command)
            for name, command in read_procfile(REPO / "Procfile").items()}


def dockerfile_instructions() -> dict[str, list[str]]:
    """Instruction -> its arguments, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            instruction, _, rest = line.strip().partition(" ")
            found.setdefault(instruction, []).append(rest.strip())
    return found


def image_files() -> list[str]:
    """What COPY puts in the image (each COPY's last word is where to)."""
    return [name for line in dockerfile_instructions()["COPY"] for name in line.split()[:-1]]


def image_env() -> dict[str, str]:
    return dict(pair.split("=", 1)
                for pair in shlex.split(" ".join(dockerfile_instructions()["ENV"])))


def k8s_objects() -> dict[tuple[str, str], dict]:
    """(kind, name) -> the object, from every file `kubectl apply -f k8s/` reads."""
    found = {}
    for path in sorted((REPO / "k8s").glob("*.yaml")):
        for document in read_documents(path):
            key = (document["kind"], document["metadata"]["name"])
            assert key not in found, f"{path.name}: {key} twice"
            found[key] = document
    return found


def pod_spec(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]


def only_container(deployment: dict) -> dict:
    containers = pod_spec(deployment)["containers"]
    assert len(containers) == 1
    return containers[0]


def k8s_env(container: dict) -> dict[str, dict]:
    """Variable name -> its entry ({"value": ...} or {"valueFrom": ...})."""
    return {entry["name"]: entry for entry in container.get("env", [])}


def compose_services() -> dict[str, dict]:
    return read_document(REPO / "compose.yaml")["services"]


def seconds(duration: str) -> int:
    """Compose's "1m30s" in seconds (the forms compose.yaml uses)."""
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert match and duration, f"not a duration: {duration!r}"
    return int(match.group(1) or 0) * 60 + int(match.group(2) or 0)


class RecordingEnviron(dict):
    """An environment that notes every variable the code looks up, set or not."""

    def __init__(self, values: dict):
        super().__init__(values)
        self.looked_up: set[str] = set()

    def get(self, name, default=None):
        self.looked_up.add(name)
        return super().get(name, default)

    def __getitem__(self, name):
        self.looked_up.add(name)
        return super().__getitem__(name)

    def __contains__(self, name):
        self.looked_up.add(name)
        return super().__contains__(name)


def variables_read(process: str, tmp_path: Path) -> set[str]:
    """The variables a process type reads: what its main() reads before it starts, by
    running the same calls on an environment that records them."""
    environ = RecordingEnviron({"DATABASE_URL": f"sqlite:///{tmp_path}/{process}.db"})
    PROCESSES[process].config_from_env(environ)
    db = database_from_env(environ)
    if process != "clock":  # the clock keeps no sessions, and opens no store
        store_from_env(environ, db)
    db.close()
    return environ.looked_up


# --- The reader: the subset, and nothing else ----------------------------------------

def read_text(text: str) -> list[dict]:
    return [Reader("test.yaml", lines).document() for lines in split_documents(text)]


def test_the_reader_reads_the_subset_as_yaml_does():
    text = ("# a comment\nkind: Pod  # another\nspec:\n  replicas: 4\n  on_call: true\n"
            "  args: [\"python\", \"webapp.py\"]\n  empty: {}\n  ports:\n"
            "    - name: http\n      containerPort: 5000\n    - \"127.0.0.1:5000:5000\"\n"
            "---\nkind: Service\npath: /healthz\n")
    assert read_text(text) == [
        {"kind": "Pod", "spec": {"replicas": 4, "on_call": True, "args": ["python", "webapp.py"],
                                 "empty": {}, "ports": [{"name": "http", "containerPort": 5000},
                                                        "127.0.0.1:5000:5000"]}},
        {"kind": "Service", "path": "/healthz"}]


@pytest.mark.parametrize("text", [
    "appendonly: yes",           # true to YAML 1.1, "yes" to 1.2: must be quoted
    "enabled: True",
    "value: null",
    "mode: 0755",                # 493 or 755, depending on the parser
    "ports: 5000:5000",          # once a base-60 number
    "every: 1.5",
    "grace: 30s",                # fine as YAML; the subset wants it quoted, as it is a string
    "name: two words",
    "name: 'single'",
    'name: "tab\\tbelow"',       # escapes differ between YAML 1.1 and JSON
    "a: 1\na: 2",                # duplicate keys: the last wins, or an error
    "a: &anchor 1\nb: *anchor",
    "a: !!str 1",
    "a: |\n  text",
    "a:\n\tb: 1",
    "a:",                        # null
    "a:\n- b",                   # a sequence must be indented under its key
    "a: 1\n  b: 2",
    "a: [1.5]",
    'a: {"b": 1}',
    "a: [1,\n  2]",
    "a:\n  - - b",
    "- a",
])
def test_the_reader_refuses_what_parsers_read_differently_or_it_does_not_know(text):
    with pytest.raises(NotPlainYaml):
        read_text(text)


def test_every_engine_file_is_in_the_plain_subset():
    objects = k8s_objects()
    assert set(objects) == {("Deployment", "web"), ("Deployment", "worker"),
                            ("Deployment", "clock"), ("Deployment", "redis"),
                            ("Service", "web"), ("Service", "redis"),
                            ("Secret", "twelve-factor"), ("PersistentVolumeClaim", "redis-data")}
    assert set(compose_services()) == {"router", "web", "worker", "clock", "redis"}


# --- Kubernetes ------------------------------------------------------------------------

def test_k8s_runs_each_procfile_type_at_its_formation_through_the_image_entrypoint():
    objects = k8s_objects()
    for process, command in procfile().items():
        deployment = objects["Deployment", process]
        container = only_container(deployment)
        assert deployment["spec"]["replicas"] == FORMATION[process]
        # `args` is the image's CMD; `command` would replace its entrypoint.sh.
        assert container["args"] == command and "command" not in container
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"] == labels


def test_k8s_probes_ask_the_web_copy_for_healthz_on_the_port_it_binds():
    objects = k8s_objects()
    container = only_container(objects["Deployment", "web"])
    image = image_env()
    port = int(k8s_env(container).get("PORT", {}).get("value", image["PORT"]))
    assert image["HOST"] == "0.0.0.0"
    assert "HOST" not in k8s_env(container)
    named_ports = {entry["name"]: entry["containerPort"] for entry in container["ports"]}
    for probe in ("readinessProbe", "livenessProbe"):
        check = container[probe]["httpGet"]
        assert check["path"] == "/healthz"
        assert named_ports[check["port"]] == port
    # Out of the Service after 3 missed seconds, as our launcher does; restarted only
    # after much longer.
    readiness, liveness = container["readinessProbe"], container["livenessProbe"]
    assert (readiness["periodSeconds"], readiness["failureThreshold"]) == (1, 3)
    assert (liveness["periodSeconds"] * liveness["failureThreshold"]
            > 3 * readiness["periodSeconds"] * readiness["failureThreshold"])
    service = objects["Service", "web"]
    pods = objects["Deployment", "web"]["spec"]["selector"]["matchLabels"]
    assert service["spec"]["selector"] == pods
    assert [named_ports[entry["targetPort"]] for entry in service["spec"]["ports"]] == [port]
    assert service["spec"]["sessionAffinity"] == "None"


def test_k8s_database_url_comes_from_the_secret_and_names_the_redis_service():
    objects = k8s_objects()
    secret = objects["Secret", "twelve-factor"]["stringData"]
    for process in procfile():
        entry = k8s_env(only_container(objects["Deployment", process]))["DATABASE_URL"]
        assert entry == {"name": "DATABASE_URL", "valueFrom": {
            "secretKeyRef": {"name": "twelve-factor", "key": "DATABASE_URL"}}}
    url = urllib.parse.urlsplit(secret["DATABASE_URL"])
    service = objects["Service", "redis"]
    assert url.scheme == "redis" and url.hostname == service["metadata"]["name"]
    assert [url.port] == [entry["port"] for entry in service["spec"]["ports"]]
    # The Redis that Service reaches asks for the password that the URL carries.
    redis = objects["Deployment", "redis"]
    assert service["spec"]["selector"] == redis["spec"]["selector"]["matchLabels"]
    container = only_container(redis)
    password = k8s_env(container)["REDISCLI_AUTH"]["valueFrom"]["secretKeyRef"]
    assert password == {"name": "twelve-factor", "key": "REDIS_PASSWORD"}
    assert url.password == secret["REDIS_PASSWORD"]
    args = container["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDISCLI_AUTH)"
    assert args[args.index("--appendonly") + 1] == "yes"
    assert {mount["mountPath"] for mount in container["volumeMounts"]} == {"/data"}


def test_k8s_sets_only_variables_its_processes_read(tmp_path):
    objects = k8s_objects()
    for process in procfile():
        pod = pod_spec(objects["Deployment", process])
        assert pod["enableServiceLinks"] is False  # no REDIS_PORT=tcp://... from Kubernetes
        names = set(k8s_env(only_container(objects["Deployment", process])))
        assert names <= variables_read(process, tmp_path), process
        assert "DYNO" in names


def test_k8s_sends_sigkill_only_after_each_copys_stop_timeout(tmp_path):
    objects = k8s_objects()
    for process in procfile():
        if "STOP_TIMEOUT" not in variables_read(process, tmp_path):
            continue  # the clock stops at once
        deployment = objects["Deployment", process]
        container = only_container(deployment)
        stop_timeout = float(k8s_env(container).get("STOP_TIMEOUT", {}).get(
            "value", image_env()["STOP_TIMEOUT"]))
        # The grace period counts from the start of preStop, which runs before SIGTERM.
        pre_stop = container.get("lifecycle", {}).get("preStop", {"sleep": {"seconds": 0}})
        kill_at = pod_spec(deployment).get("terminationGracePeriodSeconds", KUBERNETES_WAITS)
        assert kill_at >= pre_stop["sleep"]["seconds"] + stop_timeout + EXIT_TAKES, process


# --- Docker Compose ------------------------------------------------------------------

def test_compose_runs_each_procfile_type_at_its_formation_from_the_one_image():
    services = compose_services()
    for process, command in procfile().items():
        service = services[process]
        assert service["command"] == command and "entrypoint" not in service
        assert service["deploy"]["replicas"] == FORMATION[process]
    built = {name: (service["build"], service["image"])
             for name, service in services.items() if name != "redis"}
    assert len(set(built.values())) == 1 and next(iter(built.values()))[0] == "."


def test_compose_router_listens_on_loopback_and_reaches_the_web_copies_port():
    router = compose_services()["router"]
    arguments = router["command"]
    assert arguments[:2] == ["python", "router.py"]
    port = arguments[arguments.index("--port") + 1]
    assert router["ports"] == [f"127.0.0.1:5000:{port}"]
    assert arguments[-1] == f"web:{image_env()['PORT']}"
    assert "--sticky" not in arguments
    assert "router.py" in image_files()


def test_compose_database_url_names_the_redis_service_and_its_password():
    services = compose_services()
    redis = services["redis"]
    arguments = redis["command"]
    password = arguments[arguments.index("--requirepass") + 1]
    assert arguments[arguments.index("--appendonly") + 1] == "yes"
    assert redis["environment"]["REDISCLI_AUTH"] == password
    assert any(volume.endswith(":/data") for volume in redis["volumes"])
    assert "ports" not in redis
    for process in procfile():
        url = urllib.parse.urlsplit(services[process]["environment"]["DATABASE_URL"])
        assert url.scheme == "redis" and url.hostname == "redis" and url.port == 6379
        assert url.password == password
        assert services[process]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_compose_sets_only_variables_its_processes_read(tmp_path):
    services = compose_services()
    for process in procfile():
        assert set(services[process]["environment"]) <= variables_read(process, tmp_path), process


def test_compose_sends_sigkill_only_after_each_copys_stop_timeout(tmp_path):
    services = compose_services()
    for process in procfile():
        if "STOP_TIMEOUT" not in variables_read(process, tmp_path):
            continue
        service = services[process]
        stop_timeout = float(service["environment"].get("STOP_TIMEOUT",
                                                        image_env()["STOP_TIMEOUT"]))
        kill_at = seconds(service.get("stop_grace_period", f"{DOCKER_STOP_WAITS}s"))
        assert kill_at >= stop_timeout + EXIT_TAKES, process


# --- The image -----------------------------------------------------------------------

def test_the_image_sets_only_variables_the_app_reads_and_fits_docker_stop(tmp_path):
    read = set().union(*(variables_read(process, tmp_path) for process in procfile()))
    assert set(image_env()) <= read | {"PYTHONUNBUFFERED"}  # that one Python reads itself
    assert float(image_env()["STOP_TIMEOUT"]) + EXIT_TAKES <= DOCKER_STOP_WAITS


def wait_for_output(proc, text: str) -> None:
    """Until the process has printed `text`; if it exits first, fail with what it printed."""
    def printed() -> bool:
        if text in proc.output():
            return True
        if proc.popen.poll() is not None:
            pytest.fail(f"exited with code {proc.popen.returncode} before printing {text!r}:\n"
                        f"{proc.output()}")
        return False

    wait_until(printed, what=repr(text))


def image_folder(tmp_path: Path) -> Path:
    """A folder holding only what COPY puts in the image, as its WORKDIR does."""
    folder = tmp_path / "app"
    folder.mkdir()
    for name in image_files():
        shutil.copy(REPO / name, folder)
    return folder


def image_process(tmp_path: Path, command: list[str] | None = None, **env) -> tuple[list, dict]:
    """The image's ENTRYPOINT and CMD (or `command`, as an engine's args), and its ENV with
    what the engine adds: HOSTNAME, a free PORT, a database of the test's own."""
    dockerfile = dockerfile_instructions()
    entrypoint = json.loads(dockerfile["ENTRYPOINT"][0])
    environ = {**image_env(), "HOSTNAME": HOSTNAME, "PORT": str(free_port()),
               "DATABASE_URL": f"sqlite:///{tmp_path}/data/app.db",
               # `python` as the image has it: this interpreter, whatever PATH holds
               "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]]),
               **env}
    return entrypoint + (command or json.loads(dockerfile["CMD"][0])), environ


def test_the_image_runs_the_web_process_on_its_exposed_port(tmp_path, spawn):
    dockerfile = dockerfile_instructions()
    assert json.loads(dockerfile["CMD"][0]) == procfile()["web"]
    assert dockerfile["EXPOSE"] == [image_env()["PORT"]]
    args, env = image_process(tmp_path)
    proc = spawn(args, env, cwd=image_folder(tmp_path))
    url = f"http://127.0.0.1:{env['PORT']}"
    wait_for_output(proc, f"web.{HOSTNAME} listening on")
    assert get(url + "/healthz").status == 200
    session = get(url + "/session").json()
    # Named by the container's HOSTNAME; and python itself is the process the engine
    # started (the entrypoint exec'd it), so docker stop's SIGTERM reaches it.
    assert session["served_by"] == f"web.{HOSTNAME}" and session["pid"] == proc.pid


@pytest.mark.parametrize("process", sorted(FORMATION))
def test_each_container_names_itself_and_stops_on_sigterm(process, tmp_path, spawn):
    args, env = image_process(tmp_path, procfile()[process])
    proc = spawn(args, env, cwd=image_folder(tmp_path))
    wait_for_output(proc, f"{process}.{HOSTNAME} ")
    assert f"(pid {proc.pid}" in proc.output()  # python is the process the engine started
    assert proc.stop(signal.SIGTERM, timeout=float(env["STOP_TIMEOUT"])) == 0, proc.output()
    assert f"{process}.{HOSTNAME} stopped" in proc.output()


def test_the_image_runs_compose_s_router_in_front_of_the_web_copies(tmp_path, spawn):
    """Everything router.py imports is in the image, and it stops on SIGTERM as PID 1."""
    folder = image_folder(tmp_path)
    web_args, web_env = image_process(tmp_path)
    spawn(web_args, web_env, cwd=folder)
    front = free_port()
    arguments = compose_services()["router"]["command"]
    arguments[arguments.index("--port") + 1] = str(front)
    arguments[-1] = f"127.0.0.1:{web_env['PORT']}"  # here, what Docker's DNS calls `web`
    router = spawn(*image_process(tmp_path, arguments), cwd=folder)
    wait_until(lambda: responds(f"http://127.0.0.1:{front}/healthz"),
               what="the router to pass a request to the web copy")
    assert get(f"http://127.0.0.1:{front}/session").json()["served_by"] == f"web.{HOSTNAME}"
    assert router.stop(signal.SIGTERM, timeout=DOCKER_STOP_WAITS) == 0, router.output()


def test_a_name_the_engine_gives_is_kept(tmp_path, spawn):
    """Kubernetes passes the pod's name in DYNO; the entrypoint does not replace it."""
    args, env = image_process(tmp_path, DYNO=POD_NAME)
    proc = spawn(args, env, cwd=image_folder(tmp_path))
    url = f"http://127.0.0.1:{env['PORT']}"
    wait_for_output(proc, f"{POD_NAME} listening on")
    assert get(url + "/session").json()["served_by"] == POD_NAME
