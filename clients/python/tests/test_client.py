"""The Python client against a real agent: jobs run under their limits and
their reports come back, refusals raise with the agent's own message,
cancel and subscribe work, a game gets its own deadline inside a job, a
protected training's jobs share its budget, a non-root caller's jobs run as
that caller, and the example training loop runs end to end."""

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import List, Optional

import pytest
from conftest import CLIENT_ROOT, CLIENT_SRC, NOBODY, Agent, assert_no_cgroup_left, job_cgroups

from enforcer_client import (
    AgentUnavailable,
    CannotExecute,
    Client,
    Event,
    Refused,
    Subscription,
)

MIB = 1 << 20


def has_btf() -> bool:
    return Path("/sys/kernel/btf/vmlinux").exists()


def next_event_of(sub: Subscription, job_id: str, kinds: List[str], within: float = 20.0) -> Event:
    """The next event of ``job_id`` whose kind is in ``kinds``."""
    give_up = time.monotonic() + within
    while True:
        left = give_up - time.monotonic()
        assert left > 0, f"no {kinds} event of {job_id} within {within} s"
        e = sub.next_event(timeout=left)
        assert e is not None, "the agent closed the subscription"
        if e.id == job_id and e.event in kinds:
            return e


def test_a_job_runs_and_its_report_comes_back_with_its_exit_code_and_limits(
    client: Client, agent: Agent, tmp_path: Path
) -> None:
    name = agent.name("exit")
    out = tmp_path / "out"
    with open(out, "w") as f:
        job = client.run(["/bin/sh", "-c", "echo hello; exit 3"], job=name, stdout=f, stdin=subprocess.DEVNULL)
    assert job.id == name
    assert job.deadline > time.time() + 29 * 60, "the default deadline is 30 min"
    r = job.wait()
    assert (r.status, r.reason, r.exit_code) == (3, "exited", 3), r
    assert r.memory_limit_bytes == 1000 * MIB, "the default memory is 1000M"
    # Counted from the job's acceptance: a little less than its 30 min.
    assert 1790 < r.timeout_s <= 1800, r.timeout_s
    assert r.raw["job"] == name
    assert out.read_text() == "hello\n"
    assert_no_cgroup_left(name)
    # Kept by the agent after the end: asked again, the same report.
    again = client.report(name)
    assert (again.status, again.wall_s) == (r.status, r.wall_s)


def test_a_memory_hog_is_oom_killed_at_its_limit_and_gets_137(client: Client, agent: Agent) -> None:
    name = agent.name("oom")
    hog = "b = b'x' * (400 << 20); print(len(b))"
    # The normal CPU class, so that the hog reaches its limit soon even on a
    # busy machine.
    r = client.run(
        [sys.executable, "-c", hog],
        memory="100M",
        timeout="120s",
        no_idle=True,
        job=name,
        stdout=subprocess.DEVNULL,
    ).wait()
    assert (r.status, r.reason, r.oom) == (137, "oom", True), r.summary()
    assert r.memory_limit_bytes == 100 * MIB
    assert r.memory_peak_bytes is None or r.memory_peak_bytes <= 100 * MIB
    assert_no_cgroup_left(name)


def test_a_refused_request_raises_with_the_agents_message_and_creates_nothing(
    client: Client, agent: Agent, tmp_path: Path
) -> None:
    name = agent.name("refused")
    marker = tmp_path / "ran"
    with pytest.raises(Refused) as e:
        client.run(["touch", str(marker)], memory="100K", job=name)
    assert e.value.status == 2
    assert "--memory" in e.value.message and "100K" in e.value.message, e.value.message
    with pytest.raises(Refused) as e:
        client.run(["touch", str(marker)], timeout="soon", job=name)
    assert "soon" in e.value.message, e.value.message
    with pytest.raises(Refused) as e:
        client.report("py-no-such-job")
    assert 'no job "py-no-such-job"' in e.value.message, e.value.message
    assert not marker.exists(), "a refused job ran"
    assert_no_cgroup_left(name)
    # The client's connection is still good after refusals.
    assert client.status() is not None
    # A command that does not exist: 127, as `enforcer run` gives it.
    with pytest.raises(CannotExecute) as e:
        client.run(["/no/such/command"], job=agent.name("enoent"), timeout="30s").wait()
    assert e.value.status == 127, e.value


def test_no_agent_on_the_socket_raises_agent_unavailable(tmp_path: Path) -> None:
    with pytest.raises(AgentUnavailable) as e:
        Client(str(tmp_path / "none.sock"), timeout=2)
    assert str(tmp_path / "none.sock") in e.value.message


def test_cancel_ends_a_running_job_with_143(client: Client, agent: Agent, tmp_path: Path) -> None:
    name = agent.name("cancel")
    running = tmp_path / "running"
    job = client.run(["/bin/sh", "-c", f"touch {running}; exec sleep 120"], timeout="150s", job=name)
    # Cancelled once its command runs (the `started` event comes when the
    # job's shim is spawned, before it forwards signals).
    give_up = time.monotonic() + 60
    while not running.exists():
        assert time.monotonic() < give_up, "the job's command never ran"
        time.sleep(0.05)
    job.cancel()
    r = job.wait(timeout=60)
    assert (r.status, r.signal) == (143, 15), r.summary()
    assert_no_cgroup_left(name)
    with pytest.raises(Refused) as e:
        client.cancel(name)
    assert "already ended" in e.value.message, e.value.message


def test_a_job_waited_for_across_an_agent_crash_still_gives_its_report(
    client: Client, agent: Agent, tmp_path: Path
) -> None:
    name = agent.name("crash")
    running = tmp_path / "running"
    job = client.run(["/bin/sh", "-c", f"touch {running}; sleep 3; exit 7"], timeout="120s", job=name)
    give_up = time.monotonic() + 60
    while not running.exists():
        assert time.monotonic() < give_up, "the job's command never ran"
        time.sleep(0.05)
    agent.kill9_and_restart()
    r = job.wait(timeout=90)
    assert (r.status, r.reason) == (7, "exited"), r.summary()
    # The client's own connection went with the old agent: a read-only
    # request reconnects.
    seen = client.status().job(name)
    assert seen is not None and seen.status == 7, client.status().raw
    assert_no_cgroup_left(name)


def test_subscribe_sees_started_deadline_and_exited_events(client: Client, agent: Agent) -> None:
    name = agent.name("events")
    with client.subscribe() as sub:
        ended = client.run(["/bin/sh", "-c", "exit 4"], job=name, timeout="30s").wait()
        assert ended.status == 4
        started = next_event_of(sub, name, ["started"])
        exited = next_event_of(sub, name, ["exited"])
        assert started.unix_ms <= exited.unix_ms
        assert exited.status == 4 and exited.uid == 0
        late = agent.name("deadline")
        r = client.run(["sleep", "30"], job=late, timeout="1s").wait()
        assert r.status == 124 and r.timed_out
        assert next_event_of(sub, late, ["deadline"]).status == 124
        assert next_event_of(sub, late, ["exited"]).status == 124


def test_a_game_past_its_deadline_gets_124_inside_its_job(
    client: Client, agent: Agent, tmp_path: Path, child_env: dict
) -> None:
    # The job plays two games through the client: one past its deadline,
    # one that ends by itself; it prints what their reports said.
    script = textwrap.dedent(
        """
        import json
        from enforcer_client import Client
        with Client() as c:
            late = c.game(["sleep", "30"], timeout="1s").wait()
            quick = c.game(["/bin/sh", "-c", "exit 5"]).wait()
        print(json.dumps([[late.status, late.reason, late.timeout_s], [quick.status, quick.reason, quick.timeout_s]]))
        """
    )
    name = agent.name("games")
    out = tmp_path / "games.json"
    env = dict(child_env, ENFORCER_SOCKET=str(agent.socket))
    with open(out, "w") as f:
        # The normal CPU class: the test is about the game's deadline, not
        # about the job waiting for idle CPU on a busy machine.
        r = client.run(
            [sys.executable, "-c", script], job=name, timeout="120s", no_idle=True, stdout=f, env=env
        ).wait()
    assert r.status == 0, f"{r.summary()}\n{out.read_text()}"
    late, quick = json.loads(out.read_text())
    assert late[:2] == [124, "deadline"] and 0.5 < late[2] <= 1.0, late
    assert quick[:2] == [5, "exited"] and 290 < quick[2] <= 300, quick
    assert_no_cgroup_left(name)
    # Outside a job there is no game to run.
    with pytest.raises(Refused) as e:
        client.game(["true"])
    assert e.value.message.startswith("game: "), e.value.message


def test_protect_then_run_with_a_budget_joins_the_trainings_one_budget(client: Client, agent: Agent) -> None:
    if not has_btf():
        pytest.skip("the kernel has no BTF: the agent cannot meter a training")
    trainer = subprocess.Popen(["sleep", "120"])
    try:
        training = client.protect(trainer.pid, budget="5%")
        assert training == f"pid-{trainer.pid}"
        with pytest.raises(Refused) as e:
            client.protect(trainer.pid, budget="10%")
        assert "already protected with budget 5.0%" in e.value.message, e.value.message
        name = agent.name("budget")
        job = client.run(["sleep", "3"], timeout="60s", protect=trainer.pid, budget="5%", job=name)
        seen = None
        give_up = time.monotonic() + 10
        while seen is None and time.monotonic() < give_up:
            st = client.status()
            t = st.training(training)
            j = st.job(name)
            if t is not None and j is not None and j.state == "running":
                jobs = [x.get("job") for x in t.jobs] + list(t.raw.get("pending_jobs") or [])
                if name in jobs:
                    seen = (t, j)
            time.sleep(0.1)
        assert seen is not None, f"the job never showed in its training's budget: {client.status().raw}"
        t, j = seen
        assert t.budget == pytest.approx(0.05) and t.pid == trainer.pid
        assert j.training == training
        r = job.wait()
        assert r.status == 0, r.summary()
        for field in ("budget_fraction", "budget_used", "stolen_fraction", "training_slowdown"):
            assert field in r.raw, field
        # The agent meters a training for all its jobs together: a job's own
        # steal fields say where to look, or carry the budget.
        assert r.budget_fraction == pytest.approx(0.05) or "node agent" in r.unavailable.get(
            "budget_fraction", ""
        ), r.raw
        assert_no_cgroup_left(name)
    finally:
        trainer.kill()
        trainer.wait()


def world_python() -> Optional[str]:
    """An interpreter uid 65534 can run: every directory on its real path
    searchable by others and the file executable by them."""
    for candidate in (os.path.realpath(sys.executable), "/usr/bin/python3"):
        p = Path(os.path.realpath(candidate))
        if not p.is_file() or not p.stat().st_mode & stat.S_IXOTH:
            continue
        if all(d.stat().st_mode & stat.S_IXOTH for d in p.parents):
            return str(p)
    return None


def as_nobody() -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def test_a_non_root_callers_jobs_run_as_that_caller(agent: Agent, tmp_path: Path) -> None:
    python = world_python()
    if python is None:
        pytest.skip("no Python interpreter that uid 65534 may run")
    # The client's source where 65534 can read it.
    pkg = Path(tempfile.mkdtemp(prefix="enforcer-pyclient-src-"))
    try:
        pkg.chmod(0o755)
        shutil.copytree(CLIENT_SRC / "enforcer_client", pkg / "enforcer_client")
        for d, _, files in os.walk(pkg):
            os.chmod(d, 0o755)
            for f in files:
                os.chmod(os.path.join(d, f), 0o644)
        name = agent.name("nobody")
        script = textwrap.dedent(
            f"""
            import json, os, subprocess
            from enforcer_client import Client
            with Client() as c:
                r = c.run(["id", "-u"], job={name!r}, timeout="30s", cwd="/",
                          stdin=subprocess.DEVNULL).wait()
                mine = [j.id for j in c.status().jobs]
            print(json.dumps({{"uid": r.uid, "gid": r.gid, "status": r.status, "me": os.getuid(), "jobs": mine}}))
            """
        )
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(pkg), "ENFORCER_SOCKET": str(agent.socket)}
        out = subprocess.run(
            [python, "-c", script],
            env=env,
            cwd="/",
            preexec_fn=as_nobody,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        shutil.rmtree(pkg, ignore_errors=True)
    assert out.returncode == 0, f"{out.stdout}\n{out.stderr}\n{agent.log_text()[-3000:]}"
    lines = out.stdout.splitlines()
    # The job's own output (its stdout is the caller's), then the summary.
    assert lines[0] == str(NOBODY), out.stdout
    summary = json.loads(lines[-1])
    assert summary["me"] == NOBODY
    assert (summary["uid"], summary["gid"], summary["status"]) == (NOBODY, NOBODY, 0), summary
    assert name in summary["jobs"]
    assert_no_cgroup_left(name)


def test_the_example_training_loop_protects_itself_and_reports_each_evaluation(
    agent: Agent, tmp_path: Path, child_env: dict
) -> None:
    if not has_btf():
        pytest.skip("the kernel has no BTF: the agent cannot meter a training")
    example = CLIENT_ROOT / "examples" / "train_loop.py"
    progress = tmp_path / "step"
    args = [
        sys.executable,
        str(example),
        "--steps=20",
        "--eval-every=10",
        "--step-seconds=0.1",
        "--no-idle",
        "--games=3",
        "--workers=2",
        "--game-seconds=0.1",
        f"--progress-file={progress}",
    ]
    env = dict(child_env, ENFORCER_SOCKET=str(agent.socket))
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=240)
    text = out.stdout + out.stderr
    assert out.returncode == 0, f"{text}\n{agent.log_text()[-3000:]}"
    assert progress.read_text().strip() == "20"
    started = [line for line in out.stdout.splitlines() if " started at step " in line]
    reports = [line for line in out.stdout.splitlines() if ": job eval-" in line and "exited, status 0" in line]
    assert started and len(reports) == len(started), text
    games = [line for line in out.stdout.splitlines() if line.startswith("evaluation: ")]
    assert len(games) == len(started) and all("/3 won" in g for g in games), text
    assert "training done: 20 steps" in out.stdout, text
    for line in started:
        job_id = line.split(" job ")[1].split()[0]
        assert not job_cgroups(job_id), f"cgroups left behind for {job_id}"
