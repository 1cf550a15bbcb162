#!/usr/bin/env python3
"""A toy training loop that protects itself with the enforcer agent and runs
periodic evaluations through it, with the original system's SLAs: 30 min per
evaluation, 300 s per game, 1000 MB per evaluation, and a 5 % budget of the
training's CPU time that evaluations may take.

    python3 train_loop.py                   # the SLAs, a long run
    python3 train_loop.py --steps 30 --eval-every 10 --games 2 \
        --step-seconds 0.05 --game-seconds 0.2   # a few seconds

The same file is the evaluation (``evaluate``: plays games, each as a game
of its job with its own deadline) and a game (``play``). Standard library
and ``enforcer_client`` only.
"""

import argparse
import concurrent.futures
import os
import random
import sys
import tempfile
import threading
import time
from typing import List, Optional

from enforcer_client import Client, EnforcerError, Job, Report

HERE = os.path.abspath(__file__)


def write_progress(path: str, step: int) -> None:
    """The step count, replaced atomically: the agent never reads half a number."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{step}\n")
    os.replace(tmp, path)


def train_step(seconds: float) -> float:
    """Busy work standing in for one optimiser step."""
    end = time.monotonic() + seconds
    x = 0.0
    while time.monotonic() < end:
        for i in range(1000):
            x = (x + i * 1e-6) % 1.0
    return x


def train(args: argparse.Namespace) -> int:
    progress = args.progress_file or os.path.join(tempfile.gettempdir(), f"train_loop-{os.getpid()}.step")
    write_progress(progress, 0)
    with Client() as client:
        training = client.protect(os.getpid(), progress_file=progress, budget=args.budget)
        print(f"training {training}: budget {args.budget}, progress in {progress}", flush=True)
        running: Optional[threading.Thread] = None
        results: List[Report] = []
        errors: List[str] = []

        def collect(n: int, job: Job) -> None:
            try:
                report = job.wait()
            except EnforcerError as e:
                errors.append(f"evaluation {n}: {e}")
                print(f"evaluation {n}: failed: {e}", flush=True)
                return
            results.append(report)
            print(f"evaluation {n}: {report.summary()}", flush=True)

        for step in range(1, args.steps + 1):
            train_step(args.step_seconds)
            write_progress(progress, step)
            if step % args.eval_every != 0:
                continue
            n = step // args.eval_every
            if running is not None and running.is_alive():
                # One evaluation at a time, as the original manager ran them.
                print(f"evaluation {n}: skipped, the previous one is still running", flush=True)
                continue
            cmd = [
                sys.executable,
                HERE,
                "evaluate",
                f"--games={args.games}",
                f"--workers={args.workers}",
                f"--game-seconds={args.game_seconds}",
                f"--game-timeout={args.game_timeout}",
            ]
            job = client.run(
                cmd,
                memory=args.memory,
                timeout=args.eval_timeout,
                protect=os.getpid(),
                budget=args.budget,
                job=f"eval-{os.getpid()}-{n}",
                no_idle=args.no_idle,
            )
            print(f"evaluation {n}: job {job.id} started at step {step}", flush=True)
            running = threading.Thread(target=collect, args=(n, job), daemon=True)
            running.start()
        if running is not None:
            running.join()
    if not args.progress_file:
        os.unlink(progress)
    failures = len(errors) + sum(1 for r in results if not r.ok)
    print(f"training done: {args.steps} steps, {len(results)} evaluations, {failures} failed", flush=True)
    return 1 if failures else 0


def evaluate(args: argparse.Namespace) -> int:
    """Plays the games, a few at a time, each under its own deadline."""
    client = Client()

    def one(i: int) -> str:
        cmd = [sys.executable, HERE, "play", f"--seconds={args.game_seconds}", f"--seed={i}"]
        try:
            r = client.game(cmd, timeout=args.game_timeout).wait()
        except EnforcerError as e:
            return f"error ({e})"
        if r.timed_out:
            return "timeout"
        return {0: "win", 1: "loss"}.get(r.status, f"status {r.status}")

    with concurrent.futures.ThreadPoolExecutor(max_workers=args.workers) as pool:
        outcomes = list(pool.map(one, range(args.games)))
    client.close()
    wins = outcomes.count("win")
    print(f"evaluation: {wins}/{len(outcomes)} won: {', '.join(outcomes)}", flush=True)
    return 0 if all(o in ("win", "loss") for o in outcomes) else 1


def play(args: argparse.Namespace) -> int:
    """One toy game: thinks for a while, then wins or loses."""
    rng = random.Random(args.seed)
    train_step(args.seconds)
    return 0 if rng.random() < 0.5 else 1


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode")
    p.add_argument("--steps", type=int, default=100_000, help="training steps (default 100000)")
    p.add_argument("--eval-every", type=int, default=10_000, help="steps between evaluations (default 10000)")
    p.add_argument("--step-seconds", type=float, default=0.5, help="work per step, seconds (default 0.5)")
    p.add_argument("--progress-file", help="where the step count goes (default: a file in the temp dir)")
    p.add_argument("--budget", default="5%", help="share of the training's CPU time evaluations may take (default 5%%)")
    p.add_argument("--eval-timeout", default="30m", help="deadline of one evaluation (default 30m)")
    p.add_argument("--memory", default="1000M", help="memory of one evaluation (default 1000M)")
    p.add_argument(
        "--no-idle",
        action="store_true",
        help="run evaluations in the normal CPU class (default: the idle class, where they use only spare CPU)",
    )
    p.add_argument("--game-timeout", default="300s", help="deadline of one game (default 300s)")
    p.add_argument("--games", type=int, default=100, help="games per evaluation (default 100)")
    p.add_argument("--workers", type=int, default=2, help="games played at once (default 2)")
    p.add_argument("--game-seconds", type=float, default=30.0, help="length of one toy game (default 30)")
    e = sub.add_parser("evaluate", help="(internal) one evaluation: plays the games")
    e.add_argument("--games", type=int, required=True)
    e.add_argument("--workers", type=int, required=True)
    e.add_argument("--game-seconds", type=float, required=True)
    e.add_argument("--game-timeout", required=True)
    g = sub.add_parser("play", help="(internal) one game")
    g.add_argument("--seconds", type=float, required=True)
    g.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.mode == "evaluate":
        return evaluate(args)
    if args.mode == "play":
        return play(args)
    return train(args)


if __name__ == "__main__":
    sys.exit(main())
