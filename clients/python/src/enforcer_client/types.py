"""Typed views of the agent's answers: a job's report, its events, the
node's status. Each keeps the whole message in ``raw``, so that fields this
client does not name are still there."""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

__all__ = ["Report", "Event", "JobStatus", "TrainingStatus", "Status"]


def _opt_float(v: Any) -> Optional[float]:
    return None if v is None else float(v)


def _opt_int(v: Any) -> Optional[int]:
    return None if v is None else int(v)


@dataclass(frozen=True)
class Report:
    """A finished job's report (the report of ``enforcer run --report``).

    ``status`` is the exit status ``enforcer run`` gives for the job: the
    command's own, 124 after a deadline, 137 after an OOM kill, 128+N after
    signal N. A metric the node could not provide is ``None``, and
    ``unavailable`` maps its name to the reason.
    """

    job: str
    status: int
    #: ``exited``, ``deadline``, ``oom``, ``killed``, ``interrupted``, ``gpu_memory``.
    reason: str
    exit_code: Optional[int]
    signal: Optional[int]
    command: List[str]
    wall_s: float
    timeout_s: float
    uid: Optional[int]
    gid: Optional[int]
    cpu_s: Optional[float]
    cpu_throttled_s: Optional[float]
    memory_peak_bytes: Optional[int]
    memory_limit_bytes: Optional[int]
    oom_kills: Optional[int]
    pids_peak: Optional[int]
    pids_limit: Optional[int]
    #: The share of the training's CPU time the job took, and the budget.
    stolen_from_training_s: Optional[float]
    stolen_fraction: Optional[float]
    budget_fraction: Optional[float]
    budget_used: Optional[float]
    over_budget_s: Optional[float]
    training_slowdown: Optional[float]
    gpu: Optional[Dict[str, Any]]
    #: Metric name -> why it is ``None``.
    unavailable: Dict[str, str]
    #: Counts of each event kind the job emitted.
    events: Dict[str, int]
    raw: Dict[str, Any] = field(repr=False, compare=False)

    @property
    def ok(self) -> bool:
        """The command ended by itself with status 0."""
        return self.status == 0

    @property
    def timed_out(self) -> bool:
        return self.reason == "deadline"

    @property
    def oom(self) -> bool:
        return self.reason == "oom"

    @classmethod
    def from_message(cls, status: int, report: Dict[str, Any]) -> "Report":
        r = report
        return cls(
            job=str(r.get("job", "")),
            status=int(status),
            reason=str(r.get("reason", "")),
            exit_code=_opt_int(r.get("exit_code")),
            signal=_opt_int(r.get("signal")),
            command=[str(c) for c in r.get("command", [])],
            wall_s=float(r.get("wall_s", 0.0)),
            timeout_s=float(r.get("timeout_s", 0.0)),
            uid=_opt_int(r.get("uid")),
            gid=_opt_int(r.get("gid")),
            cpu_s=_opt_float(r.get("cpu_s")),
            cpu_throttled_s=_opt_float(r.get("cpu_throttled_s")),
            memory_peak_bytes=_opt_int(r.get("memory_peak_bytes")),
            memory_limit_bytes=_opt_int(r.get("memory_limit_bytes")),
            oom_kills=_opt_int(r.get("oom_kills")),
            pids_peak=_opt_int(r.get("pids_peak")),
            pids_limit=_opt_int(r.get("pids_limit")),
            stolen_from_training_s=_opt_float(r.get("stolen_from_training_s")),
            stolen_fraction=_opt_float(r.get("stolen_fraction")),
            budget_fraction=_opt_float(r.get("budget_fraction")),
            budget_used=_opt_float(r.get("budget_used")),
            over_budget_s=_opt_float(r.get("over_budget_s")),
            training_slowdown=_opt_float(r.get("training_slowdown")),
            gpu=r.get("gpu"),
            unavailable={str(k): str(v) for k, v in (r.get("unavailable") or {}).items()},
            events={str(k): int(v) for k, v in (r.get("events") or {}).items()},
            raw=report,
        )

    def summary(self) -> str:
        """One line for people: outcome, time, memory, CPU and steal."""

        def mib(b: Optional[int]) -> str:
            return "-" if b is None else f"{b / (1 << 20):.0f} MiB"

        def num(v: Optional[float], fmt: str) -> str:
            return "-" if v is None else format(v, fmt)

        steal = (
            f"stolen {num(self.stolen_fraction, '.2%')} of budget {num(self.budget_fraction, '.0%')}"
            if self.stolen_fraction is not None or self.budget_fraction is not None
            else "steal " + self.unavailable.get("stolen_fraction", "not measured")
        )
        return (
            f"job {self.job}: {self.reason}, status {self.status}, {self.wall_s:.1f} s"
            f" of {self.timeout_s:.0f} s, memory peak {mib(self.memory_peak_bytes)}"
            f" of {mib(self.memory_limit_bytes)}, cpu {num(self.cpu_s, '.1f')} s, {steal}"
        )


@dataclass(frozen=True)
class Event:
    """One event of a job, as ``subscribe`` streams it."""

    id: str
    #: ``started``, ``adopted``, ``oom``, ``deadline``, ``exited``,
    #: ``budget_exceeded``, ``budget_recovered``.
    event: str
    uid: int
    unix_ms: int
    status: Optional[int]
    raw: Dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_message(cls, m: Dict[str, Any]) -> "Event":
        return cls(
            id=str(m.get("id", "")),
            event=str(m.get("event", "")),
            uid=int(m.get("uid", -1)),
            unix_ms=int(m.get("unix_ms", 0)),
            status=_opt_int(m.get("status")),
            raw=m,
        )


@dataclass(frozen=True)
class JobStatus:
    """One job in ``status``."""

    id: str
    uid: int
    command: List[str]
    #: ``running`` or ``finished``.
    state: str
    deadline_unix_ms: int
    status: Optional[int]
    #: The training the job protects, if any.
    training: Optional[str]
    raw: Dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_message(cls, m: Dict[str, Any]) -> "JobStatus":
        return cls(
            id=str(m.get("id", "")),
            uid=int(m.get("uid", -1)),
            command=[str(c) for c in m.get("command", [])],
            state=str(m.get("state", "")),
            deadline_unix_ms=int(m.get("deadline_unix_ms", 0)),
            status=_opt_int(m.get("status")),
            training=m.get("training"),
            raw=m,
        )


@dataclass(frozen=True)
class TrainingStatus:
    """One protected training and its one budget, shared by its jobs."""

    id: str
    pid: Optional[int]
    owner_uid: Optional[int]
    #: The budget, a fraction (0.05 for 5 %).
    budget: float
    #: The stolen fraction of all its jobs together over the last 10 s /
    #: the last second (``None`` before two readings).
    used: Optional[float]
    used_recent: Optional[float]
    over_budget_s: Optional[float]
    #: From the progress file (``None`` without one).
    slowdown: Optional[float]
    #: The cores its jobs may use together (``None``: unlimited).
    quota_cores: Optional[float]
    frozen: bool
    phase: Optional[str]
    #: Per job: ``job``, ``share_cores``, ``used_cores``, ``steal_s``.
    jobs: List[Dict[str, Any]]
    raw: Dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_message(cls, m: Dict[str, Any]) -> "TrainingStatus":
        return cls(
            id=str(m.get("id", "")),
            pid=_opt_int(m.get("pid")),
            owner_uid=_opt_int(m.get("owner_uid")),
            budget=float(m.get("budget", 0.0)),
            used=_opt_float(m.get("used")),
            used_recent=_opt_float(m.get("used_recent")),
            over_budget_s=_opt_float(m.get("over_budget_s")),
            slowdown=_opt_float(m.get("slowdown")),
            quota_cores=_opt_float(m.get("quota_cores")),
            frozen=bool(m.get("frozen", False)),
            phase=m.get("phase"),
            jobs=list(m.get("jobs") or []),
            raw=m,
        )


@dataclass(frozen=True)
class Status:
    """The caller's jobs (root: every job) and the protected trainings."""

    jobs: List[JobStatus]
    trainings: List[TrainingStatus]
    raw: Dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_message(cls, m: Dict[str, Any]) -> "Status":
        budget = m.get("budget") or {}
        trainings = budget.get("trainings") if isinstance(budget, dict) else None
        return cls(
            jobs=[JobStatus.from_message(j) for j in m.get("jobs") or []],
            trainings=[TrainingStatus.from_message(t) for t in trainings or []],
            raw=m,
        )

    def job(self, job_id: str) -> Optional[JobStatus]:
        return next((j for j in self.jobs if j.id == job_id), None)

    def training(self, training_id: str) -> Optional[TrainingStatus]:
        return next((t for t in self.trainings if t.id == training_id), None)
