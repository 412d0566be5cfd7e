"""Hosts for the drill: machines made on this one, so that one of them can die whole (VI).

Factor VI says that a process keeps nothing it cannot lose. It is tested for real the day
a whole machine goes: its launcher, every copy and its disk at once, or only its network
cable, while another machine carries on. `drill.py --hosts 2` needs two such machines;
this module makes them, strikes them on cue, and removes every trace of them afterwards.

As root on Linux each host is a network namespace (`ip netns`), `tfp-a` and `tfp-b`: a
network stack of its own, its own loopback included, joined to this machine by a virtual
cable (a veth pair: `tfp-a0` on this side, `tfp-a1` inside) on a private subnet of its
own: host a is 10.213.1.2, and 10.213.1.1 is this side of its cable. Its launcher runs
inside (`ip netns exec`), with every copy it starts; router.py runs on this side and
reaches each host's front port over its cable. Without root, where namespaces cannot be
made, or off Linux, the hosts share this machine's loopback instead, on ports of their
own (`Loopback`), and the drill says so.

What a host can suffer:
* `kill_whole`: a power cut. The launcher is stopped first (SIGSTOP), so that it restarts
  nothing; then every process of the host gets SIGKILL, the launcher last, so that no
  copy is told to stop (the launcher's death would send its copies SIGTERM): nobody
  finishes a request, hands a job back or says goodbye.
* `cut` and `heal`: a partition. The cable is unplugged inside the host (`ip link set
  tfp-b1 down`) and plugged in again. router.py's health checks get no answer, so it
  takes the host out of its rotation, and back once they answer again. The host's copies
  cannot reach Redis: a command already sent waits (TCP keeps resending it) and goes
  through once the cable is back, well within the copy's reply timeout; a new connection
  fails at once, which a worker or a clock logs in one line and waits out (`keep_trying`).
  Either way they carry on by themselves. On loopback there is no cable to pull: the host
  freezes instead (SIGSTOP to its every process, SIGCONT after), a host that stops
  answering, which the router and Redis see the same way.

A Redis on 127.0.0.1, as a newcomer's DATABASE_URL names it, cannot be reached from inside
a namespace, whose 127.0.0.1 is its own. So each host's URL names a `RedisRelay` on this
side of its cable (the same URL, password included, with the relay's address), which
passes bytes both ways to the Redis the user named.

`made_hosts` removes all of it, however the drill ends (Ctrl-C and SIGTERM included):
every process in a namespace is SIGKILLed, the namespace deleted, its cable with it, the
relays closed; on loopback, every copy a host's launcher started that still runs. It
removes only what it made: a namespace or a link of the drill's names that exists already
is neither reused nor removed, and the drill refuses to start (`HostsTaken`).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union

from bench import end_leftover_copies, free_port, is_ours, started_copies

PREFIX = "tfp-"       # of every namespace and link the drill makes: obviously its own
SUBNET = "10.213.{}"  # host a on 10.213.1.0/24, b on 10.213.2.0/24: private (RFC 1918)
HOST_PORT = 5000      # each launcher's front port inside its namespace: a machine of its own
CHUNK = 65536         # bytes a relay passes on at once
GONE_WITHIN = 5.0     # seconds for a namespace's processes to die of SIGKILL
CUT_MOST = 3.0        # seconds: the longest a host is cut off, however long the lease


class HostsTaken(Exception):
    """A namespace or link of the drill's names exists: another drill runs, or one was
    SIGKILLed before it could clean up. Not ours to reuse or remove."""


@dataclass
class Host:
    """One machine: its launcher and copies, its address, its disk (`folder`)."""
    name: str                  # "a": its launcher's --name, so its copies are a.web.1...
    folder: Path               # its launcher's log, and its SQLite file if it has one
    address: str               # where router.py reaches its front port
    port: int
    namespace: str | None = None  # "tfp-a"; None on loopback
    launcher: subprocess.Popen | None = None

    @property
    def log(self) -> Path:
        return self.folder / "launcher.log"

    def command(self, args: list[str]) -> list[str]:
        """`args` as run on this host: inside its namespace, if it has one."""
        return ["ip", "netns", "exec", self.namespace, *args] if self.namespace else args


# --- Two ways to make hosts ----------------------------------------------------------------

class Namespaces:
    """Each host a network namespace on a veth cable of its own."""

    def __init__(self) -> None:
        self.hosts: list[Host] = []
        self.made: list[tuple[str, str]] = []  # ("netns" or "link", name), as made
        self.relays: dict[str, RedisRelay] = {}  # host's name -> its relay

    def add_host(self, name: str, folder: Path) -> Host:
        namespace, outside, inside = f"{PREFIX}{name}", f"{PREFIX}{name}0", f"{PREFIX}{name}1"
        if namespace in ip("netns", "list").split() or link_exists(outside):
            raise HostsTaken(f"the network namespace {namespace} or the link {outside} exists "
                             f"already: another drill runs, or one was killed before it could "
                             f"clean up (then: ip netns pids {namespace} | xargs -r kill -9; "
                             f"ip netns del {namespace}; ip link del {outside})")
        subnet = SUBNET.format(ord(name) - ord("a") + 1)
        ip("netns", "add", namespace)
        self.made.append(("netns", namespace))
        ip("link", "add", outside, "type", "veth", "peer", "name", inside, "netns", namespace)
        self.made.append(("link", outside))
        ip("addr", "add", f"{subnet}.1/24", "dev", outside)
        ip("link", "set", outside, "up")
        ip("-n", namespace, "addr", "add", f"{subnet}.2/24", "dev", inside)
        ip("-n", namespace, "link", "set", inside, "up")
        ip("-n", namespace, "link", "set", "lo", "up")  # the copies listen on its 127.0.0.1
        ip("netns", "exec", namespace, "true")  # where exec is refused, loopback it is
        folder.mkdir()
        self.hosts.append(Host(name, folder, f"{subnet}.2", HOST_PORT, namespace))
        return self.hosts[-1]

    def describe(self) -> str:
        hosts = ", ".join(f"{host.namespace} ({host.address})" for host in self.hosts)
        first = self.hosts[0].namespace
        return (f"network namespaces {hosts}, each joined to this machine by a veth link "
                f"({first}0 here, {first}1 inside, for {first})")

    def reach_redis(self, url: str, host: Host) -> str:
        """The URL that `host` reaches Redis by: a relay on this side of its cable."""
        relay = self.relays[host.name] = RedisRelay((gateway(host), 0), redis_address(url))
        return relayed(url, relay.server_address)

    def how_redis_is_reached(self) -> str:
        relays = ", ".join(f"{name} at {relay.server_address[0]}:{relay.server_address[1]}"
                           for name, relay in self.relays.items())
        return f"through the drill's relay on this side of each host's link: {relays}"

    def processes(self, host: Host) -> list[int]:
        return [int(pid) for pid in ip("netns", "pids", host.namespace).split()]

    def cut(self, host: Host) -> str:
        ip("-n", host.namespace, "link", "set", f"{host.namespace}1", "down")
        return f"cut off (link {host.namespace}1 down)"

    def heal(self, host: Host) -> None:
        ip("-n", host.namespace, "link", "set", f"{host.namespace}1", "up")

    def close(self) -> None:
        """The relays, then what we made, in the reverse order of its making: a link (its
        end inside goes with it), then every process in the namespace (a namespace lives
        on while a process is in it), then the namespace."""
        for relay in self.relays.values():
            relay.shutdown()
            relay.server_close()
        for kind, name in reversed(self.made):
            if kind == "netns":
                end_every_process(name)
                removed = subprocess.run(["ip", "netns", "del", name], capture_output=True,
                                         text=True)
            elif link_exists(name):
                removed = subprocess.run(["ip", "link", "del", name], capture_output=True,
                                         text=True)
            else:  # gone with its namespace
                continue
            if removed.returncode:  # said, and the rest is removed all the same
                print(f"drill.py: could not remove {name}: {removed.stderr.strip()}",
                      file=sys.stderr)


class Loopback:
    """Every host on this machine's loopback, on ports of its own: no root needed, but no
    cable to pull either."""

    def __init__(self, why: str) -> None:
        self.why = why  # why not namespaces, for the report
        self.hosts: list[Host] = []

    def add_host(self, name: str, folder: Path) -> Host:
        folder.mkdir()
        self.hosts.append(Host(name, folder, "127.0.0.1", free_port()))
        return self.hosts[-1]

    def describe(self) -> str:
        ports = ", ".join(f"host {host.name} on 127.0.0.1:{host.port}" for host in self.hosts)
        return f"loopback, shared by every host ({self.why}): {ports}"

    def reach_redis(self, url: str, host: Host) -> str:
        return url

    def how_redis_is_reached(self) -> str:
        return "directly: the hosts share this machine's loopback"

    def processes(self, host: Host) -> list[int]:
        """Its launcher, and every copy it started that still runs (each leads a process
        group of its own, so the launcher's group alone would miss them)."""
        copies = [pid for _, pid in started_copies(host.log) if is_ours(pid, host.folder)]
        return [host.launcher.pid, *copies]

    def cut(self, host: Host) -> str:
        # The launcher first, so that it cannot see its copies miss their health checks.
        for pid in self.processes(host):
            signal_if_alive(pid, signal.SIGSTOP)
        return "frozen (SIGSTOP to every process of it: on loopback there is no link to cut)"

    def heal(self, host: Host) -> None:
        for pid in reversed(self.processes(host)):  # the copies first, for the same reason
            signal_if_alive(pid, signal.SIGCONT)

    def close(self) -> None:
        for host in self.hosts:
            end_leftover_copies(host.log, host.folder)


Network = Union[Namespaces, Loopback]


def kill_whole(network: Network, host: Host) -> int:
    """A power cut (see the module's docstring); how many processes died."""
    os.kill(host.launcher.pid, signal.SIGSTOP)  # it can restart nothing now
    copies = [pid for pid in network.processes(host) if pid != host.launcher.pid]
    for pid in copies:
        signal_if_alive(pid, signal.SIGKILL)
    os.killpg(host.launcher.pid, signal.SIGKILL)
    return len(copies) + 1


def cut_seconds(lease: float) -> float:
    """How long a host is cut off: a quarter of a lease, at most CUT_MOST.

    Its workers cannot renew their jobs' leases meanwhile, and the other host's workers
    rightly take over a job whose renewals stop for longer than its lease. Up to a third
    of a lease passes between two renewals; then the cut; then, once the cable is back,
    the next renewal may wait about as long again (TCP's retransmission timer backed off
    during the cut), or up to a second (the Redis client's backoff before it connects
    anew): from a lease of 3 s, both stay under one lease. A longer cut would have two
    workers run one job at once (the one cut off still runs it), and the drill would say
    so: the fence keeps only one result, but the task ran twice (tried: a 4 s cut with
    3 s leases ran 2 jobs twice)."""
    return min(CUT_MOST, lease / 4)


def signal_if_alive(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


# --- Making them, and removing them whatever happens ---------------------------------------

@contextlib.contextmanager
def made_hosts(names: tuple[str, ...], folder: Path, url: str | None) -> Iterator[Network]:
    """Hosts named `names`, their folders in `folder`, removed when the block ends."""
    network = None
    try:
        with signals_deferred():
            network = make_hosts(names, folder, url)
        yield network
    finally:
        if network is not None:
            with signals_deferred():
                network.close()


def make_hosts(names: tuple[str, ...], folder: Path, url: str | None) -> Network:
    """Namespaces if this machine can make them, else loopback, saying why."""
    why = why_not_namespaces(url)
    if why is None:
        network = Namespaces()
        try:
            for name in names:
                network.add_host(name, folder / name)
            return network
        except subprocess.CalledProcessError as error:  # a container without the rights
            network.close()
            why = f"`{' '.join(error.cmd)}` failed: {error.stderr.strip()}"
        except BaseException:
            network.close()
            raise
    network = Loopback(why)
    for name in names:
        network.add_host(name, folder / name)
    return network


def why_not_namespaces(url: str | None) -> str | None:
    if not sys.platform.startswith("linux"):
        return f"network namespaces are Linux's, this is {sys.platform}"
    if os.geteuid() != 0:
        return "not root: making network namespaces needs root"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2) to make network namespaces with"
    if url is not None and url.startswith("rediss://"):
        return ("a rediss:// certificate names Redis's host, not the relay's address that "
                "a namespaced host would reach it by")
    return None


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Run the block to its end, Ctrl-C or not: a namespace half made or half removed would
    outlive the drill. A SIGINT or SIGTERM that came meanwhile is acted on after it."""
    received: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, frame: received.append(signum))
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if received:
            signal.raise_signal(received[0])


def end_every_process(namespace: str) -> None:
    """SIGKILL whatever runs in the namespace, until nothing does (a launcher may be in the
    middle of starting a copy), for at most GONE_WITHIN seconds."""
    deadline = time.monotonic() + GONE_WITHIN
    while (pids := ip("netns", "pids", namespace).split()) and time.monotonic() < deadline:
        for pid in pids:
            signal_if_alive(int(pid), signal.SIGKILL)
        time.sleep(0.02)


def ip(*args: str) -> str:
    """Run `ip ARGS`; its output. A failure raises CalledProcessError, with ip's message."""
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout


def link_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", name], capture_output=True).returncode == 0


def gateway(host: Host) -> str:
    """This side of the host's cable: 10.213.1.1 for host a at 10.213.1.2."""
    return host.address.rsplit(".", 1)[0] + ".1"


# --- The relay to Redis ---------------------------------------------------------------------

def redis_address(url: str) -> tuple[str, int]:
    """Where the Redis of a redis:// URL listens (the password is no one's business here)."""
    parts = urllib.parse.urlsplit(url)
    return parts.hostname, parts.port or 6379


def relayed(url: str, relay: tuple[str, int]) -> str:
    """The same URL, password and database as written, at the relay's address."""
    parts = urllib.parse.urlsplit(url)
    credentials, at, _ = parts.netloc.rpartition("@")
    return parts._replace(netloc=f"{credentials}{at}{relay[0]}:{relay[1]}").geturl()


class RedisRelay(socketserver.ThreadingTCPServer):
    """Listens on this side of a host's cable and passes each connection's bytes both ways
    to Redis, unread: a thread per direction, a few dozen connections in all.

    Not router.py's `Router`, though it relays TCP too: where it must answer in a copy's
    place (no copy, one that hung up) it answers in HTTP, which a Redis client must never
    read. Here a Redis that cannot be reached is a connection closed at once, which the
    host's client reads for what it is: Redis unavailable.
    """
    daemon_threads = True  # a copy's idle connection must not keep the drill from exiting
    request_queue_size = 128  # a copy opens several connections at once: 5 would overflow

    def __init__(self, address: tuple[str, int], redis: tuple[str, int]):
        super().__init__(address, RelayedConnection)
        self.redis = redis
        threading.Thread(target=self.serve_forever, args=(0.1,), daemon=True).start()


class RelayedConnection(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        try:
            upstream = socket.create_connection(self.server.redis, timeout=5)
        except OSError:
            return  # the host's connection closes: Redis unavailable, as it is
        with upstream:
            upstream.settimeout(None)
            for sock in (upstream, self.request):  # each command one write: no Nagle delay
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            back = threading.Thread(target=pass_on, args=(upstream, self.request), daemon=True)
            back.start()
            pass_on(self.request, upstream)
            back.join()


def pass_on(source: socket.socket, target: socket.socket) -> None:
    """Bytes from `source` to `target` until the source ends, or fails (a killed host's
    connection is reset); then the target hears the end (a half-close), so that the other
    direction ends too."""
    with contextlib.suppress(OSError):
        while data := source.recv(CHUNK):
            target.sendall(data)
    with contextlib.suppress(OSError):
        target.shutdown(socket.SHUT_WR)
