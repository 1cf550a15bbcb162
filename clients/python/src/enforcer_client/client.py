"""The client of the agent's socket API v1 (docs/api.md).

A :class:`Client` keeps one connection for the short requests (``status``,
``report``, ``cancel``, ``protect``). The agent serves one request at a time
per connection, so every job (``run``, ``game``) and every subscription has
a connection of its own: a job's connection waits for its end while the
client goes on.
"""

import json
import os
import subprocess
import threading
import time
from typing import IO, Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from ._conn import Connection, Message, expect_type
from .errors import AgentUnavailable, ProtocolError
from .types import Event, Report, Status

__all__ = ["Client", "Job", "Subscription", "DEFAULT_SOCKET"]

#: The agent's socket when neither the argument nor ``ENFORCER_SOCKET`` names one.
DEFAULT_SOCKET = "/run/enforcer/enforcer.sock"
#: Seconds an answer to a short request (and a connect) may take.
DEFAULT_TIMEOUT = 30.0
#: Slack past a job's deadline and kill grace before a waiting client gives
#: up on an agent that does not answer (the CLI waits as long).
WAIT_SLACK_S = 60.0
#: The longest kill grace a job may have (1 h), for waits that do not know
#: the job's own.
MAX_KILL_GRACE_S = 3600.0

#: A flag value: a string with a unit (``"1000M"``, ``"30m"``, ``"5%"``), a
#: number (bytes, seconds, CPUs, a fraction) or a switch.
FlagValue = Union[str, int, float, bool]
#: Where a job's standard stream goes: ``None`` for the caller's own, a
#: descriptor, a file object, or ``subprocess.DEVNULL``.
Stream = Union[None, int, IO[Any]]

# The flags of `enforcer run` the agent takes (docs/api.md, `run`).
RUN_FLAGS = frozenset(
    """memory memory_high cpu cpu_weight no_idle pids timeout kill_grace user group
    on_event no_wait config gpu_util_limit gpu_memory_limit duty_cycle protect
    follow_children budget measure_only no_placement progress job""".split()
)
# The flags of `enforcer game` the agent takes.
GAME_FLAGS = frozenset("timeout kill_grace memory cpu pids config".split())


def _flags(given: Mapping[str, Any], allowed: frozenset, what: str) -> Dict[str, Any]:
    """The flags of a request: ``None`` and ``False`` left out (the agent's
    defaults), paths the agent reads made absolute."""
    out: Dict[str, Any] = {}
    for name, value in given.items():
        if name not in allowed:
            raise TypeError(f"{what}() got an unknown flag {name!r} (known: {', '.join(sorted(allowed))})")
        if value is None or value is False:
            continue
        if name == "config":
            value = os.path.abspath(os.fspath(value))
        out[name] = value
    return out


class _Fds:
    """The three descriptors a job gets, and the ones opened for it here
    (closed once they are sent: the agent holds its own copies)."""

    def __init__(self, streams: Tuple[Stream, Stream, Stream]) -> None:
        self.fds: List[int] = []
        self._opened: List[int] = []
        for default, s in enumerate(streams):
            if s is None:
                self.fds.append(default)
            elif s == subprocess.DEVNULL:
                fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
                self._opened.append(fd)
                self.fds.append(fd)
            elif isinstance(s, int):
                self.fds.append(s)
            else:
                self.fds.append(s.fileno())

    def close(self) -> None:
        for fd in self._opened:
            os.close(fd)
        self._opened = []


class Job:
    """A job (or a game) the agent accepted. Its connection waits for its end:
    :meth:`wait` returns its :class:`Report`."""

    def __init__(self, client: "Client", conn: Connection, accepted: Message, report_path: Optional[str]) -> None:
        self._client = client
        self._conn: Optional[Connection] = conn
        #: The job's id (``job-<ms>-<n>`` unless named; a game's is ``<job>.game-<n>``).
        self.id = str(accepted["id"])
        #: The job's absolute deadline, Unix seconds.
        self.deadline = float(accepted.get("deadline_unix_ms", 0)) / 1000.0
        #: The kill grace after the deadline, seconds.
        self.kill_grace_s = float(accepted.get("kill_grace_ms", 0)) / 1000.0
        self._report_path = report_path
        self._report: Optional[Report] = None

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def __enter__(self) -> "Job":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stops listening for the job's end; the job itself goes on (it can
        still be waited for with :meth:`Client.report`)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def wait(self, timeout: Optional[float] = None) -> Report:
        """Waits for the job's end and returns its report.

        ``timeout``: seconds to wait at most (default: until the job's
        deadline and kill grace have passed, plus a minute); past it,
        :class:`TimeoutError` and the job goes on. If the agent restarts
        meanwhile, the client reconnects and waits for the job by id.
        A job that ended without a report (its command could not be run,
        the agent stopped before starting it) raises its error.
        """
        if self._report is not None:
            return self._report
        if timeout is None:
            give_up = self.deadline + self.kill_grace_s + WAIT_SLACK_S
        else:
            give_up = time.time() + timeout
        backoff = 0.1
        while True:
            conn = self._conn
            answer: Optional[Message] = None
            if conn is not None:
                try:
                    answer = conn.recv(timeout=max(0.0, give_up - time.time()))
                except AgentUnavailable:
                    answer = None
            if answer is not None:
                if answer.get("type") == "accepted":
                    continue
                try:
                    finished = expect_type(answer, "finished")
                except BaseException:
                    self.close()
                    raise
                self._report = Report.from_message(int(finished["status"]), finished["report"])
                self.close()
                if self._report_path is not None:
                    with open(self._report_path, "w") as f:
                        json.dump(self._report.raw, f, indent=2)
                return self._report
            # The agent went away after accepting the job: the job goes on
            # (its shim holds it); wait for it by id once the agent is back.
            self.close()
            if time.time() > give_up:
                raise AgentUnavailable(
                    "the agent did not come back before the job's deadline; its outcome is unknown",
                    self.id,
                )
            time.sleep(backoff)
            backoff = min(backoff * 2, 2.0)
            try:
                c = self._client._connect()
                c.send({"type": "wait", "id": self.id})
            except AgentUnavailable:
                continue
            self._conn = c
            backoff = 0.1

    def cancel(self) -> None:
        """Ends the job as SIGTERM to ``enforcer run`` would (exit 143); a
        second cancel kills the whole job."""
        self._client.cancel(self.id)


class Subscription(Iterator[Event]):
    """The events of the caller's jobs (root: all), in order, until closed.

    Iterate over it, or call :meth:`next_event` with a timeout.
    """

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def __enter__(self) -> "Subscription":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._conn.close()

    def __iter__(self) -> "Subscription":
        return self

    def __next__(self) -> Event:
        e = self.next_event(timeout=None)
        if e is None:
            raise StopIteration
        return e

    def next_event(self, timeout: Optional[float] = None) -> Optional[Event]:
        """The next event; ``None`` when the agent closed the stream.
        ``timeout``: seconds to wait (``None``: until one comes); past it,
        :class:`TimeoutError`."""
        if self._conn.closed:
            return None
        m = self._conn.recv(timeout=timeout)
        if m is None:
            return None
        return Event.from_message(expect_type(m, "event"))


class Client:
    """A client of the enforcer agent.

    ``socket_path``: the agent's socket (default ``$ENFORCER_SOCKET``, else
    ``/run/enforcer/enforcer.sock``). ``timeout``: seconds a connect or the
    answer to a short request may take. Connects and says hello at once:
    :class:`AgentUnavailable` when no agent answers. Thread-safe.
    """

    def __init__(self, socket_path: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.socket_path = socket_path or os.environ.get("ENFORCER_SOCKET") or DEFAULT_SOCKET
        self.timeout = timeout
        self._lock = threading.Lock()
        self._conn: Optional[Connection] = self._connect()
        #: The agent's version, from its hello.
        self.agent_version = self._conn.agent_version

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the client's connection; jobs go on."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _connect(self) -> Connection:
        return Connection(self.socket_path, self.timeout)

    def _ask(self, msg: Message, expect: str, read_only: bool = False) -> Message:
        """One short request on the client's connection. A connection the
        agent dropped (it restarted) is opened again; a read-only request
        that met a dropped connection is sent once more on a new one."""
        with self._lock:
            fresh = False
            if self._conn is None or self._conn.closed:
                self._conn, fresh = self._connect(), True
            conn = self._conn
            try:
                return conn.ask(msg, expect)
            except TimeoutError:
                # A late answer would be taken for the next request's.
                conn.close()
                raise
            except AgentUnavailable:
                conn.close()
                if fresh or not read_only:
                    raise
            self._conn = self._connect()
            return self._conn.ask(msg, expect)

    # --- jobs ---------------------------------------------------------------

    def _submit(
        self,
        msg: Message,
        streams: Tuple[Stream, Stream, Stream],
        report_path: Optional[str],
    ) -> Job:
        fds = _Fds(streams)
        conn = self._connect()
        try:
            try:
                conn.send(msg, fds.fds)
            finally:
                fds.close()
            answer = conn.recv()
            if answer is None:
                raise AgentUnavailable("the agent closed the connection before accepting the job")
            accepted = expect_type(answer, "accepted")
        except BaseException:
            conn.close()
            raise
        return Job(self, conn, accepted, report_path)

    def run(
        self,
        cmd: Sequence[str],
        memory: Optional[FlagValue] = "1000M",
        timeout: Optional[FlagValue] = "30m",
        budget: Optional[FlagValue] = None,
        protect: Optional[int] = None,
        *,
        stdin: Stream = None,
        stdout: Stream = None,
        stderr: Stream = None,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        report: Optional[str] = None,
        **flags: Any,
    ) -> Job:
        """Starts ``cmd`` as a job under hard limits and returns once the
        agent has accepted it; :meth:`Job.wait` gives its report.

        ``memory``, ``timeout``, ``budget`` and every other flag of
        ``enforcer run`` (``cpu``, ``pids``, ``kill_grace``, ``job`` for its
        name, ``follow_children``, ``measure_only``, ``no_idle``, ...) take
        the CLI's units: ``"1000M"``, ``"30m"``, ``"5%"``. ``protect``: the
        pid of the training the job must not slow down beyond ``budget``.
        The job gets the caller's stdin/stdout/stderr unless others are
        given, the caller's environment and directory unless ``env`` /
        ``cwd`` say otherwise. ``report``: a file to write the report's JSON
        to once :meth:`Job.wait` has it. A refusal (a bad value, a job name
        in use) raises :class:`Refused` with the agent's message; nothing
        was created then.
        """
        job = _flags(
            dict(flags, memory=memory, timeout=timeout, budget=budget, protect=protect),
            RUN_FLAGS,
            "run",
        )
        msg = {
            "type": "run",
            "job": job,
            "command": [os.fspath(c) for c in cmd],
            "env": _environment(env),
            "cwd": os.path.abspath(cwd) if cwd is not None else os.getcwd(),
        }
        return self._submit(msg, (stdin, stdout, stderr), report)

    def game(
        self,
        cmd: Sequence[str],
        timeout: Optional[FlagValue] = "300s",
        *,
        memory: Optional[FlagValue] = None,
        cpu: Optional[FlagValue] = None,
        pids: Optional[int] = None,
        kill_grace: Optional[FlagValue] = None,
        stdin: Stream = None,
        stdout: Stream = None,
        stderr: Stream = None,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        report: Optional[str] = None,
        **flags: Any,
    ) -> Job:
        """Starts one game inside the job this process runs in, under its own
        deadline (default 300 s; the whole game is killed then: status 124)
        and optional ``memory`` / ``cpu`` / ``pids`` limits within the job's.
        Returns once accepted, like :meth:`run`. Outside a job of the
        caller's, :class:`Refused`.
        """
        game = _flags(
            dict(flags, timeout=timeout, memory=memory, cpu=cpu, pids=pids, kill_grace=kill_grace),
            GAME_FLAGS,
            "game",
        )
        msg = {
            "type": "game",
            "game": game,
            "command": [os.fspath(c) for c in cmd],
            "env": _environment(env),
            "cwd": os.path.abspath(cwd) if cwd is not None else os.getcwd(),
        }
        return self._submit(msg, (stdin, stdout, stderr), report)

    def protect(
        self,
        pid: Optional[int] = None,
        progress_file: Optional[str] = None,
        budget: Optional[FlagValue] = "5%",
        *,
        follow_children: bool = False,
        cgroup: Optional[str] = None,
    ) -> str:
        """Registers a training: the jobs that protect it (``run(...,
        protect=pid)``) share its one budget, the share of its CPU time they
        may take together. ``progress_file``: a file the training rewrites
        with its step count, from which the agent measures its slowdown.
        ``cgroup`` instead of ``pid``: root only. Returns the training's id
        (``pid-<pid>``)."""
        msg: Message = {"type": "protect", "follow_children": follow_children}
        if pid is not None:
            msg["pid"] = pid
        if cgroup is not None:
            msg["cgroup"] = cgroup
        if progress_file is not None:
            msg["progress_file"] = os.path.abspath(os.fspath(progress_file))
        if budget is not None:
            msg["budget"] = budget
        return str(self._ask(msg, "protected")["training"])

    # --- the node -------------------------------------------------------------

    def status(self) -> Status:
        """The caller's jobs (root: every job) and the protected trainings."""
        return Status.from_message(self._ask({"type": "status"}, "status", read_only=True))

    def report(self, job_id: str, wait: bool = False, timeout: Optional[float] = None) -> Report:
        """The report of job ``job_id``. A running job is :class:`Refused`
        unless ``wait``; then this waits for its end, at most ``timeout``
        seconds (default: until its deadline, the longest kill grace and a
        minute have passed). Another user's job is answered like a missing
        one."""
        if not wait:
            return _report(self._ask({"type": "report", "id": job_id}, "finished", read_only=True))
        if timeout is None:
            job = self.status().job(job_id)
            deadline = job.deadline_unix_ms / 1000.0 if job else time.time()
            timeout = max(0.0, deadline - time.time()) + MAX_KILL_GRACE_S + WAIT_SLACK_S
        with self._connect() as conn:
            conn.send({"type": "report", "id": job_id, "wait": True})
            answer = conn.recv(timeout=timeout)
        if answer is None:
            raise AgentUnavailable("the agent closed the connection before the job's end", job_id)
        return _report(expect_type(answer, "finished"))

    def cancel(self, job_id: str) -> None:
        """Ends job ``job_id`` as SIGTERM to ``enforcer run`` would: the command
        gets SIGTERM (status 143); a second cancel kills the whole job."""
        self._ask({"type": "cancel", "id": job_id}, "cancelled")

    def subscribe(self) -> Subscription:
        """Streams the events of the caller's jobs (root: every job):
        started, adopted, oom, deadline, exited, budget_exceeded,
        budget_recovered. Returns once the subscription is in place: no
        event after that is missed (a subscriber more than 1024 events
        behind loses the oldest)."""
        conn = self._connect()
        try:
            conn.ask({"type": "subscribe"}, "status")
        except BaseException:
            conn.close()
            raise
        return Subscription(conn)


def _environment(env: Optional[Mapping[str, str]]) -> List[Tuple[str, str]]:
    source = os.environ if env is None else env
    return [(str(k), str(v)) for k, v in source.items()]


def _report(answer: Message) -> Report:
    if "report" not in answer:
        raise ProtocolError(f"a finished answer without a report: {answer!r}")
    return Report.from_message(int(answer["status"]), answer["report"])

