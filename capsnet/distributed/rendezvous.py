"""Meeting the other processes before the engine joins them, in a wait that is visible, bounded and
interruptible; and a watch that ends a process blocked in a collective when it is interrupted.

The engines' own joins (TensorFlow's collective setup, `jax.distributed.initialize`, PyTorch's
`init_process_group`) block inside C++: TensorFlow's even holds Python's lock, so neither a timeout nor
Ctrl-C reaches Python until every peer has come. So the processes first meet here, in plain Python
sockets: the chief listens on the coordinator's port (which its engine binds only afterwards), every
other process connects and says who it is, and once all are there the chief says "go". Only then does
the engine join, with everyone present, and it returns at once. The chief knows exactly who is missing,
and a rank given twice is refused.

A collective later in training can block in C++ too (a peer that hangs). Python runs its signal handler
only once that call returns; `SignalWatch` sees the signal through Python's wakeup file descriptor, which
the C-level handler writes at once, and ends the process if the main thread has not within a grace.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator

from capsnet.distributed.cluster import Cluster
from capsnet.errors import EXIT_INTERRUPTED, UserError

HELLO = "capsnet-join"
POLL_S = 0.2  # how often a wait looks at the clock (and lets Python run a signal handler)
# How long the main thread has, after Ctrl-C or SIGTERM, to stop by itself before the watch ends it.
GRACE_S = 3.0


class JoinTimeoutError(Exception):
    """Some process never came within `--join_timeout`: exit code 1 (the message names it)."""


def _say(text: str) -> None:
    print(text, flush=True)


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def meet(cluster: Cluster, timeout_s: float) -> None:
    """Returns once every process of `cluster` has come to the coordinator, the chief hosting it.

    Raises:
        JoinTimeoutError: some process did not come within `timeout_s`.
        UserError: the coordinator's port is taken, or another process claims this one's rank.
        KeyboardInterrupt: Ctrl-C (or SIGTERM, through `capsulenet.main`'s handler) while waiting.
    """
    if cluster.size == 1 or cluster.gathered:
        return
    deadline = time.monotonic() + timeout_s
    if cluster.is_chief:
        _host(cluster, deadline, timeout_s)
    else:
        _visit(cluster, deadline, timeout_s)


def _missing_text(cluster: Cluster, missing: list[int]) -> str:
    return ", ".join(cluster.where(r) for r in missing)


def _listen(cluster: Cluster) -> socket.socket:
    _, port = _host_port(cluster.coordinator)
    try:
        if socket.has_dualstack_ipv6():
            return socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True)
        return socket.create_server(("", port))
    except OSError as e:
        if e.errno != errno.EADDRINUSE:
            raise
        raise UserError(f"{cluster.variable}: {cluster.name} cannot listen on port {port} of this machine, "
                        f"it is taken (another {cluster.name}, or another program); stop it, or choose "
                        "another free port on every process") from None


def _host(cluster: Cluster, deadline: float, timeout_s: float) -> None:
    """The chief: accepts every other process, then tells them all to go."""
    listener = _listen(cluster)
    arrived: dict[int, socket.socket] = {}
    pending: list[socket.socket] = []  # connected, not yet said who they are
    try:
        missing = list(range(1, cluster.size))
        _say(f"{cluster.name}: waiting for {len(missing)} of {cluster.size} {cluster.peers} to join at "
             f"{cluster.coordinator} ({_missing_text(cluster, missing)}), up to {timeout_s:g} s...")
        while len(arrived) < cluster.size - 1:
            if time.monotonic() > deadline:
                missing = [r for r in range(1, cluster.size) if r not in arrived]
                raise JoinTimeoutError(
                    f"{cluster.name} waited {timeout_s:g} s (--join_timeout) for "
                    f"{_missing_text(cluster, missing)}, which never joined; start "
                    f"{'it' if len(missing) == 1 else 'them'} with the same {cluster.variable} and flags, "
                    "or raise --join_timeout")
            readable, _, _ = select.select([listener, *pending, *arrived.values()], [], [], POLL_S)
            for sock in readable:
                if sock is listener:
                    conn, _ = listener.accept()
                    conn.settimeout(POLL_S)
                    pending.append(conn)
                    continue
                line = _read_line(sock)
                rank = next((r for r, s in arrived.items() if s is sock), None)
                if rank is not None:  # an arrived process speaks only by leaving: it died
                    del arrived[rank]
                    sock.close()
                    continue
                pending.remove(sock)
                _admit(cluster, sock, line, arrived)
        for sock in arrived.values():
            with contextlib.suppress(OSError):  # one that died just now fails the engine's join instead
                sock.sendall(b"go\n")
        # They close first, so that this port is left without a connection in TIME_WAIT for the engine.
        for sock in arrived.values():
            with contextlib.suppress(OSError):
                sock.settimeout(5)
                sock.recv(16)
    finally:
        for sock in [*pending, *arrived.values()]:
            sock.close()
        listener.close()


def _read_line(sock: socket.socket) -> str:
    """One short line from a peer ('' when it closed or said nothing readable)."""
    try:
        return sock.recv(256).decode(errors="replace").strip()
    except OSError:
        return ""


def _admit(cluster: Cluster, sock: socket.socket, line: str, arrived: dict[int, socket.socket]) -> None:
    """Records the process that said `line` (`capsnet-join RANK SIZE`), or refuses it with the reason."""
    parts = line.split()
    if len(parts) != 3 or parts[0] != HELLO or not all(p.isdigit() for p in parts[1:]):
        sock.close()  # not one of ours (a port scanner, an old run): ignore it
        return
    rank, size = int(parts[1]), int(parts[2])
    reason = None
    if size != cluster.size:
        reason = (f"{cluster.name} at {cluster.coordinator} counts {cluster.size} {cluster.peers}, this "
                  f"process {size}; give every process the same {cluster.variable} settings")
    elif not 0 < rank < cluster.size:
        reason = f"{cluster.names[0]} is at {cluster.coordinator} already; give each process its own number"
    elif rank in arrived:
        reason = (f"another process joined as {cluster.names[rank]} already; give each process its own "
                  "number")
    if reason is not None:
        with contextlib.suppress(OSError):
            sock.sendall(f"refused {reason}\n".encode())
        sock.close()
        return
    arrived[rank] = sock


def _visit(cluster: Cluster, deadline: float, timeout_s: float) -> None:
    """Any other process: connects to the chief (until it listens), says who it is, waits for "go"."""
    chief = f"{cluster.names[0]} at {cluster.coordinator}"
    _say(f"{cluster.name}: waiting for {cluster.size - 1} of {cluster.size} {cluster.peers} to join at "
         f"{cluster.coordinator} ({cluster.names[0]} first), up to {timeout_s:g} s...")
    answered = False
    while time.monotonic() < deadline:
        try:
            sock = socket.create_connection(_host_port(cluster.coordinator), timeout=min(1.0, timeout_s))
        except OSError:  # the chief does not listen yet (or its machine is unreachable)
            time.sleep(POLL_S)
            continue
        with sock:
            answered = True
            reply = _await_answer(sock, f"{HELLO} {cluster.rank} {cluster.size}\n", deadline)
        if reply.startswith("go"):
            return
        if reply.startswith("refused "):
            raise UserError(f"{cluster.variable}: {cluster.name} refused: {reply[8:].strip()}")
        time.sleep(POLL_S)  # the chief went away (or gave up): try again until the deadline
    if answered:
        raise JoinTimeoutError(f"{cluster.name} waited {timeout_s:g} s (--join_timeout): {chief} answered "
                               f"but not every one of the {cluster.size} {cluster.peers} joined; start the "
                               f"missing ones with the same {cluster.variable} and flags, or raise "
                               "--join_timeout")
    raise JoinTimeoutError(f"{cluster.name} waited {timeout_s:g} s (--join_timeout) for {chief}, which never "
                           f"answered; start it (and check {cluster.variable}), or raise --join_timeout")


def _await_answer(sock: socket.socket, hello: str, deadline: float) -> str:
    """Says `hello` to the chief and returns its answer; '' when it went away or the deadline passed."""
    try:
        sock.sendall(hello.encode())
        sock.settimeout(POLL_S)
        while time.monotonic() < deadline:
            try:
                return sock.recv(512).decode(errors="replace")
            except TimeoutError:
                continue
    except OSError:  # the chief closed the connection: reset by peer, broken pipe
        pass
    return ""


class SignalWatch:
    """While active, Ctrl-C or SIGTERM ends the process within `GRACE_S` even when the main thread is
    blocked in C++ (a collective waiting for a hung peer), printing `message`, with exit code 130.

    Python's C-level handler writes the signal's number to the wakeup file descriptor at once; a thread
    waits on it. The main thread normally turns the signal into `KeyboardInterrupt` itself: `stop()` (on
    the way out) tells the thread not to act.
    """

    def __init__(self, message: str) -> None:
        self.message = message
        self._reader, self._writer = socket.socketpair()
        self._stopped = threading.Event()
        self._previous_fd = -1

    def start(self) -> SignalWatch:
        for sock in (self._reader, self._writer):
            sock.setblocking(False)
        self._previous_fd = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        threading.Thread(target=self._watch, name="capsnet-signal-watch", daemon=True).start()
        return self

    def stop(self) -> None:
        """Gives the wakeup descriptor back first: the thread closes its sockets once stopped."""
        with contextlib.suppress(ValueError):  # not the main thread: leave the descriptor in place
            signal.set_wakeup_fd(self._previous_fd)
        self._stopped.set()

    def _watch(self) -> None:
        with self._reader, self._writer:
            while not self._stopped.is_set():
                readable, _, _ = select.select([self._reader], [], [], POLL_S)
                if not readable:
                    continue
                numbers = set(self._reader.recv(64))
                if not numbers & {signal.SIGINT, signal.SIGTERM}:
                    continue
                if self._stopped.wait(GRACE_S):
                    return
                end(EXIT_INTERRUPTED, self.message)


@contextlib.contextmanager
def watching_signals(message: str) -> Iterator[None]:
    """`SignalWatch` around a block run in the main thread."""
    watch = SignalWatch(message).start()
    try:
        yield
    finally:
        watch.stop()


def end(code: int, line: str = "") -> None:
    """Prints `line` (if any) on stderr and ends the process now with `code`, skipping the engines' exit
    handlers: they would wait for the lost or hung peers (JAX's shutdown barrier, a collective)."""
    if line:
        print(line, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
