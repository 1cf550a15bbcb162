"""A client of the enforcer agent's socket API (version 1), standard library
only.

The agent (``enforcer agent``, one per node) runs evaluation jobs in
cgroups with hard memory, CPU and pids limits and deadlines, and holds
their CPU steal from a protected training under a budget::

    from enforcer_client import Client

    with Client() as c:
        c.protect(os.getpid(), progress_file="/run/trainer/step", budget="5%")
        report = c.run(["python", "eval.py"], memory="1000M", timeout="30m",
                       protect=os.getpid(), budget="5%").wait()
        print(report.summary())

See ``docs/api.md`` in the enforcer repository for the protocol.
"""

from .client import DEFAULT_SOCKET, Client, Job, Subscription
from .errors import (
    AgentFailed,
    AgentUnavailable,
    CannotExecute,
    EnforcerError,
    ProtocolError,
    Refused,
)
from .types import Event, JobStatus, Report, Status, TrainingStatus

__all__ = [
    "DEFAULT_SOCKET",
    "Client",
    "Job",
    "Subscription",
    "Report",
    "Event",
    "Status",
    "JobStatus",
    "TrainingStatus",
    "EnforcerError",
    "Refused",
    "AgentFailed",
    "CannotExecute",
    "AgentUnavailable",
    "ProtocolError",
]

__version__ = "0.1.0"
