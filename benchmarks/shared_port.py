"""Run webapp.py as one of several copies on ONE port, with no router: for bench.py only.

Issue 12 asks what the launcher's router costs against the way gunicorn spreads requests:
there is no proxy at all, every worker accepts connections on the same port, and the
kernel hands each connection to one of them. This script lets bench.py measure that with
the very same webapp.py, in two ways:

    python benchmarks/shared_port.py reuseport    # PORT, DYNO... from the environment
    python benchmarks/shared_port.py inherit FD   # FD: a listening socket it inherited

* `reuseport`: each copy binds its own socket to the port with SO_REUSEPORT (Linux 3.9+,
  the BSDs); the kernel picks a socket for each new connection by a hash of its addresses
  and ports. A copy that is busy still gets its share of new connections.
* `inherit`: bench.py binds and listens once and passes the socket to every copy, which
  accepts from it: one queue, and whichever copy is idle first takes the next connection.
  That is gunicorn's model (its arbiter binds, its workers inherit the socket by fork).

How, without a line of webapp.py changed: in this process only, before webapp.py runs,
`socketserver.TCPServer.server_bind` (which web_server.Server, an HTTPServer, calls from
its constructor) is replaced by one that sets SO_REUSEPORT before binding, or that swaps
the server's fresh socket for the inherited one. Then webapp.py runs as `__main__`,
exactly as `python webapp.py` would: same configuration, same log, same SIGTERM. The
inherited socket is non-blocking, as gunicorn makes its own (and as the Server makes its
own listening socket): every idle copy wakes for a new connection, and those that lose
the race get "nothing to accept" and wait again, rather than block in accept().

What the lesson would lose by running copies so (bench.py measures only what it gains):
the router's round-robin that you can watch in `X-Served-By`, and taking one copy out of
the rotation before its restart; the kernel knows nothing of either.
"""
import runpy
import socket
import socketserver
import sys
from pathlib import Path

WEBAPP = Path(__file__).resolve().parent.parent / "webapp.py"
USAGE = "usage: shared_port.py reuseport | shared_port.py inherit FD"
bind_alone = socketserver.TCPServer.server_bind


def bind_with_reuseport(server: socketserver.TCPServer) -> None:
    server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    bind_alone(server)


def adopt_socket(fd: int):
    """A server_bind that takes the listening socket `fd` instead of binding its own."""
    def bind(server: socketserver.TCPServer) -> None:
        server.socket.close()
        server.socket = socket.socket(fileno=fd)
        server.socket.setblocking(False)
        server.server_address = server.socket.getsockname()
    return bind


def main(argv: list[str]) -> None:
    if argv[:1] == ["reuseport"] and len(argv) == 1:
        socketserver.TCPServer.server_bind = bind_with_reuseport
    elif argv[:1] == ["inherit"] and len(argv) == 2 and argv[1].isdecimal():
        socketserver.TCPServer.server_bind = adopt_socket(int(argv[1]))
    else:
        print(f"shared_port.py: {USAGE}", file=sys.stderr)
        sys.exit(2)
    sys.argv = [str(WEBAPP)]
    sys.path.insert(0, str(WEBAPP.parent))  # webapp.py imports its neighbours
    runpy.run_path(str(WEBAPP), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
