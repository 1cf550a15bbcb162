"""One connection to the agent: the framing of docs/api.md (one JSON object
per line, at most 1 MiB), descriptors as SCM_RIGHTS, and ``hello``."""

import json
import socket
import time
from typing import Any, Dict, Optional, Sequence, Union

from .errors import AgentUnavailable, ProtocolError, error_for

#: The API version this client speaks.
API_VERSION = 1
#: The largest message either side sends, newline included.
MAX_MESSAGE = 1 << 20

Message = Dict[str, Any]


class _Own:
    """The connection's own timeout, for :meth:`Connection.recv`."""


OWN = _Own()


class Connection:
    """A connection that said ``hello``. Not thread-safe: one request at a
    time, as the agent serves them."""

    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        #: Seconds one answer may take where the API has no long wait.
        self.timeout = timeout
        self._buf = bytearray()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as e:
            sock.close()
            raise AgentUnavailable(f"no enforcer agent answers on {path}: {e.strerror or e}") from e
        self._sock: Optional[socket.socket] = sock
        try:
            self.send({"type": "hello", "api": API_VERSION})
            answer = self.recv()
        except BaseException:
            self.close()
            raise
        if answer is None:
            self.close()
            raise AgentUnavailable(f"the agent on {path} closed the connection before its hello")
        if answer.get("type") == "error":
            self.close()
            raise error_for(int(answer.get("status", 125)), str(answer.get("message", "")))
        if answer.get("type") != "hello" or answer.get("api") != API_VERSION:
            self.close()
            raise ProtocolError(f"unexpected answer to hello from {path}: {answer!r}")
        #: The agent's version, from its hello.
        self.agent_version = str(answer.get("version", ""))

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    @property
    def closed(self) -> bool:
        return self._sock is None

    def _socket(self) -> socket.socket:
        if self._sock is None:
            raise AgentUnavailable(f"the connection to {self.path} is closed")
        return self._sock

    def send(self, msg: Message, fds: Sequence[int] = ()) -> None:
        """Sends one message, with ``fds`` attached to its first byte."""
        sock = self._socket()
        line = json.dumps(msg, separators=(",", ":")).encode() + b"\n"
        try:
            sent = socket.send_fds(sock, [line], list(fds)) if fds else 0
            sock.sendall(line[sent:])
        except OSError as e:
            self.close()
            raise AgentUnavailable(f"sending to the agent on {self.path}: {e}") from e

    def recv(self, timeout: Union[float, None, _Own] = OWN) -> Optional[Message]:
        """The next message; ``None`` when the agent closed the connection.

        ``timeout``: seconds to wait for it (the default: the connection's
        own; ``None``: as long as it takes). Past it, :class:`TimeoutError`.
        """
        sock = self._socket()
        limit = self.timeout if isinstance(timeout, _Own) else timeout
        give_up = None if limit is None else time.monotonic() + limit
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line = bytes(self._buf[:nl])
                del self._buf[: nl + 1]
                try:
                    msg = json.loads(line)
                except ValueError as e:
                    raise ProtocolError(f"the agent sent a line that is not JSON: {e}") from e
                if not isinstance(msg, dict) or "type" not in msg:
                    raise ProtocolError(f"the agent sent a message without a type: {msg!r}")
                return msg
            if len(self._buf) >= MAX_MESSAGE:
                self.close()
                raise ProtocolError(f"the agent sent a message longer than {MAX_MESSAGE} bytes")
            if give_up is None:
                sock.settimeout(None)
            else:
                left = give_up - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no answer from the agent on {self.path} within {limit} s")
                sock.settimeout(left)
            try:
                chunk = sock.recv(64 * 1024)
            except socket.timeout:
                continue
            except OSError as e:
                self.close()
                raise AgentUnavailable(f"reading from the agent on {self.path}: {e}") from e
            if not chunk:
                # A partial line at the end is the agent dying mid-message.
                self.close()
                return None
            self._buf += chunk

    def ask(self, msg: Message, expect: str) -> Message:
        """Sends ``msg`` and returns the answer of type ``expect``; an
        ``error`` answer raises its exception."""
        self.send(msg)
        answer = self.recv()
        if answer is None:
            raise AgentUnavailable(f"the agent on {self.path} closed the connection")
        return expect_type(answer, expect)


def expect_type(answer: Message, expect: str) -> Message:
    """``answer`` if it has type ``expect``; raises for an error answer."""
    kind = answer.get("type")
    if kind == expect:
        return answer
    if kind in ("error", "failed"):
        raise error_for(
            int(answer.get("status", 125)),
            str(answer.get("message", "")),
            answer.get("id"),
        )
    raise ProtocolError(f"expected a {expect!r} answer, got {answer!r}")
