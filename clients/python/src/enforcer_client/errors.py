"""The exceptions of the client.

Every error the agent answers becomes an :class:`EnforcerError` whose
``status`` is the exit status the ``enforcer`` CLI gives for it and whose
``message`` is the agent's own text, unchanged.
"""

from typing import Optional

__all__ = [
    "EnforcerError",
    "Refused",
    "AgentFailed",
    "CannotExecute",
    "AgentUnavailable",
    "ProtocolError",
    "error_for",
]

#: Refused or malformed: nothing was created.
EXIT_USAGE = 2
#: The enforcer itself failed.
EXIT_FAILURE = 125


class EnforcerError(Exception):
    """An error answered by the agent, or the agent could not be reached.

    ``status`` is the exit status ``enforcer`` would give for it;
    ``message`` is the agent's message verbatim; ``job_id`` names the job a
    ``failed`` answer was about, when there is one.
    """

    def __init__(self, status: int, message: str, job_id: Optional[str] = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.job_id = job_id

    def __str__(self) -> str:
        where = f"job {self.job_id}: " if self.job_id else ""
        return f"{where}{self.message} (status {self.status})"


class Refused(EnforcerError):
    """Status 2: the request was refused or malformed; nothing was created."""


class AgentFailed(EnforcerError):
    """Status 125: the agent failed (or a job could not be started by it)."""


class CannotExecute(EnforcerError):
    """Status 126 / 127: the job's command cannot be executed / does not exist."""


class AgentUnavailable(EnforcerError):
    """No agent answers on the socket, or it went away and did not come back.

    Its status is 2, the CLI's status when no agent answers.
    """

    def __init__(self, message: str, job_id: Optional[str] = None) -> None:
        super().__init__(EXIT_USAGE, message, job_id)


class ProtocolError(EnforcerError):
    """The agent sent something this client cannot read (status 125)."""

    def __init__(self, message: str) -> None:
        super().__init__(EXIT_FAILURE, message)


def error_for(status: int, message: str, job_id: Optional[str] = None) -> EnforcerError:
    """The exception for an ``error`` or ``failed`` answer with ``status``."""
    if status == EXIT_USAGE:
        return Refused(status, message, job_id)
    if status == EXIT_FAILURE:
        return AgentFailed(status, message, job_id)
    if status in (126, 127):
        return CannotExecute(status, message, job_id)
    return EnforcerError(status, message, job_id)
