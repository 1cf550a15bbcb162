//! Workloads for the job integration tests, as one small static-friendly
//! binary (the VM initramfs has busybox sh but no python or perl):
//!
//! - `memhog TOTAL_MB STEP_MB`: touches TOTAL_MB of memory in STEP_MB steps;
//! - `forkbomb SECONDS`: forks as fast as it can for SECONDS (each child
//!   sleeps SECONDS); capped at 2000 children so a failed limit cannot take
//!   the machine down; prints how many forks succeeded and failed;
//! - `spin THREADS SECONDS`: burns THREADS CPUs for SECONDS;
//! - `duty THREADS RUN_MS SLEEP_MS SECONDS`: THREADS threads that each spin
//!   RUN_MS and sleep SLEEP_MS, in turn, for SECONDS (a training that
//!   wakes, so that another task can take its CPU meanwhile);
//! - `daemon PIDFILE`: double-forks a setsid daemon that writes its PID to
//!   PIDFILE and sleeps forever, then sleeps forever itself;
//! - `threads N`: starts N sleeping threads, prints `ready`, sleeps forever;
//! - `forker COUNT SPIN_MS`: forks COUNT short-lived processes one after the
//!   other, each spinning SPIN_MS, then exits;
//! - `churn SPIN_MS SECONDS`: for SECONDS, creates one short-lived thread
//!   after the other, each spinning SPIN_MS;
//! - `policy`: prints its scheduling policy (`sched_getscheduler`) at its
//!   first instruction, starts a second thread, prints both threads'
//!   policies after a second, moves both to `SCHED_OTHER`, and prints them
//!   again a second later (busybox has no `chrt`).
//!
//! Options before the mode (for the steal tests, where busybox has no
//! `taskset`): `--cpu K` pins the process (so every thread and child) to CPU
//! K; `--cgroup DIR` first moves it into that cgroup.

use std::{
    io::Write,
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

/// The CPU given with `--cpu`, `usize::MAX` without. Spinning threads
/// re-apply it now and then: a supervisor that moves the process between
/// cgroups (into a job's leaf) resets the affinity on kernels before 6.2.
static PIN: AtomicUsize = AtomicUsize::new(usize::MAX);

/// Re-applies `--cpu` to the calling thread.
fn repin() {
    let cpu = PIN.load(Ordering::Relaxed);
    if cpu != usize::MAX {
        pin(cpu);
    }
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> T {
    args.get(i)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| die(&format!("missing or bad {what}")))
}

fn die(msg: &str) -> ! {
    eprintln!("eval-workload: {msg}");
    std::process::exit(2)
}

fn sleep_forever() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let (mut cpu, mut cgroup) = (None, None);
    while args.len() >= 2 && args[0].starts_with("--") {
        let (flag, value) = (args.remove(0), args.remove(0));
        match flag.as_str() {
            "--cpu" => cpu = Some(value.parse().unwrap_or_else(|_| die("bad --cpu"))),
            "--cgroup" => cgroup = Some(value),
            other => die(&format!("unknown option {other}")),
        }
    }
    // Join first, pin after: joining a cgroup with the cpuset controller
    // resets the affinity on kernels before 6.2.
    if let Some(dir) = cgroup
        && let Err(e) = std::fs::write(format!("{dir}/cgroup.procs"), "0")
    {
        die(&format!("joining {dir}: {e}"));
    }
    if let Some(cpu) = cpu {
        PIN.store(cpu, Ordering::Relaxed);
        pin(cpu);
    }
    match args.first().map(String::as_str) {
        Some("memhog") => memhog(arg(&args, 1, "TOTAL_MB"), arg(&args, 2, "STEP_MB")),
        Some("forkbomb") => forkbomb(arg(&args, 1, "SECONDS")),
        Some("spin") => spin(arg(&args, 1, "THREADS"), arg(&args, 2, "SECONDS")),
        Some("duty") => duty(
            arg(&args, 1, "THREADS"),
            Duration::from_millis(arg(&args, 2, "RUN_MS")),
            Duration::from_millis(arg(&args, 3, "SLEEP_MS")),
            arg(&args, 4, "SECONDS"),
        ),
        Some("daemon") => daemon(args.get(1).unwrap_or_else(|| die("missing PIDFILE"))),
        Some("threads") => threads(arg(&args, 1, "N")),
        Some("forker") => forker(arg(&args, 1, "COUNT"), arg(&args, 2, "SPIN_MS")),
        Some("churn") => churn(arg(&args, 1, "SPIN_MS"), arg(&args, 2, "SECONDS")),
        Some("policy") => policy(),
        _ => die("usage: eval-workload [--cpu K] [--cgroup DIR] \
             memhog|forkbomb|spin|duty|daemon|threads|forker|churn|policy ..."),
    }
}

fn memhog(total_mb: usize, step_mb: usize) {
    let mut held: Vec<Vec<u8>> = Vec::new();
    let mut touched = 0;
    while touched < total_mb {
        let mut chunk = vec![0u8; step_mb << 20];
        // Write every page so the memory is really charged.
        for i in (0..chunk.len()).step_by(4096) {
            chunk[i] = 1;
        }
        held.push(chunk);
        touched += step_mb;
        eprintln!("memhog: {touched} MB touched");
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!("memhog: done, {} chunks held", held.len());
}

fn forkbomb(seconds: u64) {
    let end = Instant::now() + Duration::from_secs(seconds);
    let (mut ok, mut failed) = (0u32, 0u32);
    while Instant::now() < end && ok < 2000 {
        // SAFETY: the child only sleeps and exits (async-signal-safe).
        match unsafe { libc::fork() } {
            0 => {
                unsafe {
                    libc::sleep(seconds as u32);
                    libc::_exit(0)
                };
            }
            -1 => {
                failed += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
            _ => ok += 1,
        }
    }
    // The test reads this result from stdout.
    let _ = writeln!(std::io::stdout(), "forks ok {ok} failed {failed}");
    // Reap the children.
    while unsafe { libc::wait(std::ptr::null_mut()) } > 0 {}
}

/// Runs `body` on `threads` threads, each given the instant `seconds` from
/// now to stop at, and waits for them all.
fn on_threads(threads: usize, seconds: f64, body: impl Fn(Instant) + Copy + Send + 'static) {
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let hs: Vec<_> = (0..threads)
        .map(|_| std::thread::spawn(move || body(end)))
        .collect();
    for h in hs {
        let _ = h.join();
    }
}

fn spin(threads: usize, seconds: f64) {
    on_threads(threads, seconds, |end| {
        let mut x = 0u64;
        let mut next_pin = Instant::now();
        while Instant::now() < end {
            if Instant::now() >= next_pin {
                repin();
                next_pin = Instant::now() + Duration::from_millis(100);
            }
            for _ in 0..10_000 {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
        }
    });
}

fn duty(threads: usize, run: Duration, sleep: Duration, seconds: f64) {
    on_threads(threads, seconds, move |end| {
        while Instant::now() < end {
            spin_for(run);
            std::thread::sleep(sleep);
        }
    });
}

fn daemon(pidfile: &str) {
    // SAFETY: fork/setsid/_exit in a single-threaded process.
    unsafe {
        if libc::fork() == 0 {
            libc::setsid();
            if libc::fork() == 0 {
                let _ = std::fs::write(format!("{pidfile}.tmp"), std::process::id().to_string());
                let _ = std::fs::rename(format!("{pidfile}.tmp"), pidfile);
                sleep_forever();
            }
            libc::_exit(0);
        }
        libc::wait(std::ptr::null_mut());
    }
    sleep_forever();
}

fn threads(n: usize) {
    for _ in 0..n {
        std::thread::spawn(|| sleep_forever());
    }
    let _ = writeln!(std::io::stdout(), "ready");
    sleep_forever();
}

/// The calling thread's policy (`libc::SCHED_*`), without
/// `SCHED_RESET_ON_FORK`; -1 if it cannot be read.
fn own_policy() -> i32 {
    enforcer::sched::thread_policy(0).map_or(-1, |p| p & !libc::SCHED_RESET_ON_FORK)
}

/// Moves the calling thread to SCHED_OTHER.
fn leave_own_policy() {
    if let Err(e) = enforcer::sched::set_thread_policy(0, libc::SCHED_OTHER, 0) {
        die(&format!("SCHED_OTHER: {e}"));
    }
}

fn policy() {
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{}", own_policy());
    let (to_thread, from_main) = std::sync::mpsc::channel::<()>();
    let (to_main, from_thread) = std::sync::mpsc::channel::<i32>();
    std::thread::spawn(move || {
        while from_main.recv().is_ok() {
            let _ = to_main.send(own_policy());
            leave_own_policy();
        }
    });
    for _ in 0..2 {
        std::thread::sleep(Duration::from_secs(1));
        let _ = to_thread.send(());
        let other = from_thread.recv().unwrap_or(-1);
        let _ = writeln!(out, "{} {other}", own_policy());
        leave_own_policy();
    }
}

fn pin(cpu: usize) {
    if cpu >= 1024 {
        die("--cpu beyond 1023");
    }
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET stays within
    // it (bound checked above), and sched_setaffinity only reads it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        die(&format!(
            "pinning to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        ));
    }
}

fn spin_for(d: Duration) {
    let end = Instant::now() + d;
    let mut x = 0u64;
    repin();
    while Instant::now() < end {
        for _ in 0..1000 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
    }
}

fn forker(count: u32, spin_ms: u64) {
    for _ in 0..count {
        // SAFETY: single-threaded here; the child only spins and _exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            spin_for(Duration::from_millis(spin_ms));
            // SAFETY: leaving the child without running destructors.
            unsafe { libc::_exit(0) };
        }
        if pid < 0 {
            die(&format!("fork: {}", std::io::Error::last_os_error()));
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
    }
}

fn churn(spin_ms: u64, seconds: f64) {
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let spin = Duration::from_millis(spin_ms);
    while Instant::now() < end {
        let _ = std::thread::spawn(move || spin_for(spin)).join();
    }
}
