"""What a worker does when its connection budget (``CE_HTTP_MAX_CONNECTIONS``) is full.

Granian takes a permit per connection before it accepts the next one; with none left it stops accepting,
and new connections wait in the kernel's listen queue until a held one closes: an idle keep-alive
connection after ``CE_HTTP_HEADER_TIMEOUT``, a busy one perhaps never. Nothing in Granian closes idle
connections early or refuses the queued ones, so a worker whose budget is full of idle keep-alive
connections left new clients waiting up to the header timeout, and one full of busy connections left them
waiting for as long as those lasted.

``ConnectionGuard`` is a thread in each worker that watches the listening socket (the worker inherits it
from Granian's main process). It costs nothing while the worker accepts: it sleeps in ``poll`` with the GIL
released, and when the listen queue is not empty it waits ``SETTLE`` seconds and looks again. A queue that
is still not empty while the worker holds its whole budget is pressure, and then:

1. idle connections go first: those that have sent nothing for ``MIN_IDLE`` seconds since they were last
   answered (or since they opened), with nothing unread or unsent, are shut down longest-idle first, as
   many as connections are queued plus a tenth of the budget (a scan is not cheap: 0.45-0.9 s of one core
   for 9,000 held connections on a loaded machine, so each frees room for many). Granian sees the end of
   the stream, drops the connection and its permit, and accepts a queued one. ``shutdown`` leaves the file
   descriptor to Granian (it closes it), and each descriptor is checked again, by its peer address, just
   before;
2. with no idle connection to close, the queued connections are accepted here and refused at once:
   ``503`` with ``Retry-After: 1`` and ``Connection: close``, rather than left waiting. The connections the
   worker holds are untouched and keep being answered. When some connections were answered less than
   ``MIN_IDLE`` ago (and nothing older is idle), the queue waits for them, up to ``MIN_IDLE``, then is
   refused: a keep-alive client between two requests is not cut off for a newcomer.

Which connections are idle comes from the kernel (``TCP_INFO``: time since data was last sent and received,
bytes not yet acknowledged; ``FIONREAD``: bytes not yet read), not from Granian, so a connection whose
request is being answered (the client spoke last, or bytes are in flight) is never taken for idle.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import select
import socket
import struct
import termios
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

log = logging.getLogger(__name__)

SETTLE = 0.05  # seconds a non-empty listen queue is given to drain before it counts as pressure
MIN_IDLE = 1.0  # seconds without a request before a connection may be closed under pressure
DUTY = 4  # after a scan of the held connections, sleep this many times as long as it took
LOG_INTERVAL = 10.0
LISTENER_WAIT = 60.0  # seconds to wait for Granian to listen
REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
    b"Connection: close\r\nContent-Length: 59\r\n\r\n"
    b'{"reason": "this worker holds all the connections it can"}\n'
)
_TCP_ESTABLISHED, _TCP_INFO_BYTES = 1, 160
_INET = (socket.AF_INET, socket.AF_INET6)
# struct tcp_info (linux/tcp.h): 8 one-byte fields, then 32-bit ones; the few read here.
_UNACKED, _LAST_DATA_SENT, _LAST_DATA_RECV = 8 + 4 * 4, 8 + 9 * 4, 8 + 11 * 4
_DATA_SEGS_IN = 152  # then _DATA_SEGS_OUT (Linux 4.6)


@dataclass(frozen=True)
class Held:
    fd: int
    peer: object
    idle: float  # seconds since the connection was last answered or opened; -1 when busy


def tcp_info(sock: socket.socket) -> tuple[int, int, float, float, int, int]:
    """(state, unacknowledged segments, s since data sent, s since data received, data segments received,
    data segments sent) for a TCP socket; for a listening one the second is its accept queue's length."""
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_BYTES)
    (unacked,) = struct.unpack_from("I", raw, _UNACKED)
    (sent,) = struct.unpack_from("I", raw, _LAST_DATA_SENT)
    (received,) = struct.unpack_from("I", raw, _LAST_DATA_RECV)
    segments_in, segments_out = struct.unpack_from("II", raw, _DATA_SEGS_IN)
    return raw[0], unacked, sent / 1000, received / 1000, segments_in, segments_out


def _unread(fd: int) -> int:
    buf = bytearray(4)
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return int.from_bytes(buf, "little")


@contextlib.contextmanager
def _borrowed(fd: int) -> Iterator[socket.socket]:
    """A socket object on someone else's descriptor, never closing it."""
    sock = socket.socket(fileno=fd)
    try:
        yield sock
    finally:
        sock.detach()


def find_listener() -> tuple[int, int] | None:
    """(descriptor, port) of this worker's listening socket, if there is exactly one: the listening TCP
    socket bound to the address of the socket the worker inherited from Granian's main process (a Granian
    worker listens on a socket of its own, bound to the same address as the main process's)."""
    inherited = set(_socket_fds(os.getppid()).values())
    addresses, listening = set(), []
    for fd, inode in _socket_fds().items():
        with contextlib.suppress(OSError), _borrowed(fd) as sock:
            if sock.type != socket.SOCK_STREAM or sock.family not in _INET:
                continue
            if inode in inherited:
                addresses.add(sock.getsockname())
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                listening.append((fd, sock.getsockname()))
    found = [(fd, int(address[1])) for fd, address in listening if address in addresses]
    return found[0] if len(found) == 1 else None


def _descriptors() -> int:
    """How many descriptors this process has open: st_size of /proc/self/fd on Linux 6.2+ (one call),
    else a listing (about 30 ms at 18,000)."""
    return os.stat("/proc/self/fd").st_size or len(os.listdir("/proc/self/fd"))


def _socket_fds(pid: int | str = "self") -> dict[int, str]:
    """A process's socket descriptors and the socket each is (its inode)."""
    fds = {}
    with contextlib.suppress(OSError):
        for name in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{name}")
                if link.startswith("socket:"):
                    fds[int(name)] = link
    return fds


class ConnectionGuard:
    def __init__(self, budget: int) -> None:
        self.budget, self.listener, self.port = budget, -1, -1
        self.closed_idle = self.refused = 0
        self.pressed_since: float | None = None  # when the queue last started waiting on a full budget
        self.refuse_until = 0.0  # until then, the last scan showed that no held connection can be idle
        self.other_fds = 0  # this worker's descriptors that are not client connections, at the last scan
        self.look_again = 0.0  # no scan before then
        self._logged = 0.0

    @classmethod
    def start(cls, budget: int) -> ConnectionGuard | None:
        """Start the guard thread for this worker; None (and a log line) where it cannot run."""
        if not os.path.isdir("/proc/self/fd"):
            log.warning("connection guard off: no /proc/self/fd on this system")
            return None
        guard = cls(budget)
        threading.Thread(target=guard.run, name="ce-connection-guard", daemon=True).start()
        return guard

    def run(self) -> None:
        # The worker builds its app before Granian starts listening on the socket it inherited.
        for _ in range(int(LISTENER_WAIT / 0.1)):
            found = find_listener()
            if found is not None:
                break
            time.sleep(0.1)
        else:
            log.warning("connection guard off: no listening socket shared with the main process")
            return
        self.listener, self.port = found
        log.debug("connection guard on: listening socket %d (port %d), budget %d", *found, self.budget)
        poller = select.poll()
        poller.register(self.listener, select.POLLIN)
        while True:
            events = poller.poll(1000)
            if not events:
                continue
            if events[0][1] & (select.POLLNVAL | select.POLLERR | select.POLLHUP):
                return  # the worker closed its listener: it is shutting down
            time.sleep(SETTLE)  # Granian accepts what it has permits for
            descriptors = _descriptors()
            if descriptors - self.other_fds < self.budget:
                self.pressed_since = None  # not full (any more): the worker is just slow to accept
                continue
            if not poller.poll(0):
                continue  # drained
            try:
                if time.monotonic() < self.refuse_until:  # no held connection can be idle enough yet
                    self._refuse_queued()
                    continue
                began = time.monotonic()
                self.relieve(descriptors)
            except OSError:
                log.exception("connection guard: could not relieve pressure")
                continue
            ended = time.monotonic()
            # the scan holds the GIL: bound its share; and when waiting for young idle ones, look again
            # only once they could be idle enough
            time.sleep(max(DUTY * (ended - began), self.look_again - ended))

    def queued(self) -> int:
        with _borrowed(self.listener) as sock:
            return tcp_info(sock)[1]

    def held(self) -> list[Held]:
        """This worker's client connections (TCP sockets on the listening port), idle or busy."""
        connections = []
        for fd in _socket_fds():
            if fd == self.listener:
                continue
            with contextlib.suppress(OSError), _borrowed(fd) as sock:
                if sock.type != socket.SOCK_STREAM or sock.family not in _INET:
                    continue
                if sock.getsockname()[1] != self.port:
                    continue
                connections.append(Held(fd, sock.getpeername(), _idle(sock)))
        return connections

    def relieve(self, descriptors: int) -> None:
        """Look at every held connection: close idle ones for the queued, or refuse the queued."""
        if self.queued() == 0:
            return
        scanned = time.monotonic()
        held = self.held()
        self.other_fds = max(0, descriptors - len(held))
        if len(held) < self.budget:
            return  # the worker is slow to accept, not full
        idle = sorted((c for c in held if c.idle >= MIN_IDLE), key=lambda c: -c.idle)
        self.pressed_since = self.pressed_since or scanned
        if idle:
            closed = sum(self._close_idle(c) for c in idle[: self.queued() + self.budget // 10])
            self.closed_idle += closed
            self._log(f"closed {closed} idle connections")
            self.pressed_since = None
            return
        youngest = max((c.idle for c in held if c.idle >= 0), default=None)
        if youngest is not None and scanned - self.pressed_since < MIN_IDLE:
            self.look_again = self.pressed_since + MIN_IDLE
            return  # some were answered just now: they are the ones to close if they stay silent
        # None of the held connections can have been idle MIN_IDLE before this: refuse without a scan.
        self.refuse_until = scanned + MIN_IDLE - (youngest or 0.0)
        self._refuse_queued()

    def _refuse_queued(self) -> None:
        refused = self._refuse(self.queued())
        self.refused += refused
        self._log(f"refused {refused} new connections with 503")

    def _close_idle(self, conn: Held) -> bool:
        with contextlib.suppress(OSError), _borrowed(conn.fd) as sock:
            if sock.getsockname()[1] != self.port or sock.getpeername() != conn.peer:
                return False  # the descriptor now belongs to another connection
            if _idle(sock) < MIN_IDLE:
                return False
            sock.shutdown(socket.SHUT_RDWR)
            return True
        return False

    def _refuse(self, count: int) -> int:
        refused = 0
        with _borrowed(self.listener) as listener:
            for _ in range(count):
                try:
                    fd, _ = listener._accept()  # type: ignore[attr-defined]  # raw fd: no blocking wrapper
                except OSError as exc:
                    if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                        break  # Granian took the rest
                    raise
                with socket.socket(fileno=fd) as conn:
                    conn.setblocking(False)
                    with contextlib.suppress(OSError):
                        conn.send(REFUSAL)
                        conn.shutdown(socket.SHUT_WR)
                        while conn.recv(65536):  # what the client sent already: closing with it unread
                            pass  # would reset the connection and could discard the 503
                refused += 1
        return refused

    def _log(self, what: str) -> None:
        now = time.monotonic()
        if now - self._logged >= LOG_INTERVAL:
            self._logged = now
            log.warning(
                "connection budget full (CE_HTTP_MAX_CONNECTIONS=%d): %s (%d idle closed, %d refused so far)",
                self.budget,
                what,
                self.closed_idle,
                self.refused,
            )


def _idle(sock: socket.socket) -> float:
    """Seconds since the connection was last answered (or opened); -1 when it is not idle: closing, bytes
    in flight or unread, or the client spoke last (a request is under way)."""
    state, unacked, sent, received, segments_in, segments_out = tcp_info(sock)
    if state != _TCP_ESTABLISHED or unacked or _unread(sock.fileno()):
        return -1.0
    if segments_in and (not segments_out or sent > received):  # times are in ms: a tie is "answered"
        return -1.0
    return sent
