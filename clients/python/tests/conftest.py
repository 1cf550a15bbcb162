"""A real agent for the client's tests: ``$ENFORCER_BIN`` (default the
workspace's ``target/debug/enforcer``) started as root on a private socket,
state and record directory (never the node's), once for the session, and
stopped at the end, with a check that no job, shim or cgroup was left.
"""

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator, List

import pytest

from enforcer_client import Client, EnforcerError

HERE = Path(__file__).resolve().parent
CLIENT_ROOT = HERE.parent
CLIENT_SRC = CLIENT_ROOT / "src"
WORKSPACE = CLIENT_ROOT.parent.parent

#: The uid and gid a non-root caller runs as (numeric: no passwd entry needed).
NOBODY = 65534


def enforcer_bin() -> Path:
    given = os.environ.get("ENFORCER_BIN")
    return Path(given).resolve() if given else WORKSPACE / "target/debug/enforcer"


def own_cgroup_dirs() -> List[Path]:
    """This process's cgroup directory in each mounted hierarchy: where an
    agent it starts makes its jobs' cgroups."""
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = right.split()
            if len(fields) >= 3 and fields[0] in ("cgroup", "cgroup2"):
                mounts.append((Path(left.split()[4]), fields[0], set(fields[2].split(","))))
    dirs = []
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, ctrls, path = line.rstrip("\n").split(":", 2)
            for mount, fstype, opts in mounts:
                if fstype == "cgroup2" and not ctrls:
                    dirs.append(mount / path.lstrip("/"))
                elif fstype == "cgroup" and ctrls and set(ctrls.split(",")) <= opts:
                    dirs.append(mount / path.lstrip("/"))
    return dirs


def job_cgroups(name: str) -> List[Path]:
    """The cgroups of job ``name`` (its own and ``<name>.hooks``) below this
    process's cgroups."""
    found = []
    for top in own_cgroup_dirs():
        for dirpath, dirnames, _ in os.walk(top):
            for d in dirnames:
                if d in (name, f"{name}.hooks"):
                    found.append(Path(dirpath) / d)
    return found


def assert_no_cgroup_left(name: str) -> None:
    left = job_cgroups(name)
    assert not left, f"cgroups left behind for job {name}: {left}"


class Agent:
    """An agent this session started, on its own socket and directories."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self.socket = scratch / "run" / "enforcer.sock"
        self.lib = scratch / "lib"
        self.log = scratch / "agent.log"
        self.config = scratch / "enforcer.toml"
        #: The job names the tests used, checked for leftovers at the end.
        self.names: List[str] = []
        self._seq = 0
        self.config.write_text(
            f'state_dir = "{scratch / "state"}"\n'
            "max_concurrent_jobs = 4\n"
            "[agent]\n"
            f'socket = "{self.socket}"\n'
            f'lib_dir = "{self.lib}"\n'
        )
        # Root reads a config only if no one else can write it.
        self.config.chmod(0o644)
        self._spawn()

    def _spawn(self) -> None:
        env = dict(os.environ, ENFORCER_LOG="info", ENFORCER_LOG_FORMAT="json")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [str(enforcer_bin()), "agent", "--config", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
            )
        t0 = time.monotonic()
        while not self._answers():
            if self.proc.poll() is not None:
                raise RuntimeError(f"the agent exited at start ({self.proc.returncode}):\n{self.log_text()}")
            if time.monotonic() - t0 > 20:
                self.proc.kill()
                self.proc.wait()
                raise RuntimeError(f"the agent did not listen within 20 s:\n{self.log_text()}")
            time.sleep(0.05)

    def kill9_and_restart(self, down_s: float = 1.0) -> None:
        """SIGKILL (what a crash looks like), ``down_s`` without an agent,
        then a new agent on the same socket and directories."""
        self.proc.kill()
        self.proc.wait()
        time.sleep(down_s)
        self._spawn()

    def _answers(self) -> bool:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(self.socket))
            return True
        except OSError:
            return False
        finally:
            s.close()

    def name(self, prefix: str) -> str:
        """A job name unique to this session, remembered for the final check."""
        self._seq += 1
        n = f"py-{prefix}-{os.getpid()}-{self._seq}"
        self.names.append(n)
        return n

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def end_jobs(self) -> None:
        """Cancels (twice: the second kills the whole job) every job still
        running, so that a failed test leaves none."""
        try:
            with Client(str(self.socket), timeout=10) as c:
                for _ in range(2):
                    running = [j.id for j in c.status().jobs if j.state == "running"]
                    for job_id in running:
                        try:
                            c.cancel(job_id)
                        except EnforcerError:
                            pass
                    if running:
                        time.sleep(0.5)
        except EnforcerError:
            pass

    def stop(self) -> None:
        """SIGTERM to the agent (this session's child, by its pid)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"the agent did not exit on SIGTERM:\n{self.log_text()}")


@pytest.fixture(scope="session")
def agent() -> Iterator[Agent]:
    if os.geteuid() != 0:
        pytest.skip("the client's tests start a real agent, which needs root (run as root)")
    binary = enforcer_bin()
    if not binary.is_file():
        pytest.fail(f"{binary} does not exist: build it first (cargo build -p enforcer) or set ENFORCER_BIN")
    # 0755: a caller running as 65534 must reach the socket.
    scratch = Path(tempfile.mkdtemp(prefix="enforcer-pyclient-"))
    scratch.chmod(0o755)
    a = Agent(scratch)
    try:
        yield a
    finally:
        a.end_jobs()
        a.stop()
        left = {n: job_cgroups(n) for n in a.names}
        shutil.rmtree(scratch, ignore_errors=True)
        left = {n: c for n, c in left.items() if c}
        assert not left, f"cgroups left behind: {left}"


@pytest.fixture
def client(agent: Agent) -> Iterator[Client]:
    with Client(str(agent.socket), timeout=10) as c:
        yield c


@pytest.fixture
def child_env() -> dict:
    """The environment of a Python job that imports the client from this
    checkout, installed or not."""
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=f"{CLIENT_SRC}{os.pathsep}{path}" if path else str(CLIENT_SRC))
