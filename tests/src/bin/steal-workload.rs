//! Workloads for the steal tests, runnable in the VM initramfs (no shell
//! tools needed: pinning and cgroup placement are done in-process).
//!
//! ```text
//! steal-workload spin   [--threads N] [--cpu K] [--cgroup DIR] [--seconds T]
//! steal-workload forker [--count N] [--spin-ms M] [--cpu K] [--cgroup DIR]
//! steal-workload churn  [--spin-ms M] [--cpu K] [--cgroup DIR] [--seconds T]
//! ```
//! `spin`: N threads spin for T seconds (default 1 thread, 30 s).
//! `forker`: forks N short-lived processes one after the other, each spinning
//! M ms (default 200 processes, 10 ms), then exits.
//! `churn`: for T seconds, creates one short-lived thread after the other,
//! each spinning M ms (threads created and destroyed all the time).
//! `--cpu K` pins the process (and so every thread and child) to CPU K;
//! `--cgroup DIR` first moves the process into that cgroup.

use std::{
    process::ExitCode,
    time::{Duration, Instant},
};

struct Opts {
    threads: u32,
    count: u32,
    spin_ms: u64,
    seconds: f64,
    cpu: Option<usize>,
    cgroup: Option<String>,
}

fn usage(msg: &str) -> ExitCode {
    eprintln!(
        "steal-workload: {msg}\nusage: steal-workload spin|forker|churn [--threads N] [--count N] \
         [--spin-ms M] [--seconds T] [--cpu K] [--cgroup DIR]"
    );
    ExitCode::from(2)
}

fn pin(cpu: usize) -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET stays within it
    // (checked by the caller's bound), and sched_setaffinity reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn spin_for(d: Duration) {
    let end = Instant::now() + d;
    let mut x = 0u64;
    while Instant::now() < end {
        for i in 0..1000u64 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
    }
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(mode) = args.next() else {
        return usage("missing mode");
    };
    let mut o = Opts {
        threads: 1,
        count: 200,
        spin_ms: 10,
        seconds: 30.0,
        cpu: None,
        cgroup: None,
    };
    while let Some(flag) = args.next() {
        let Some(value) = args.next() else {
            return usage(&format!("{flag} needs a value"));
        };
        let bad = || usage(&format!("bad value {value:?} for {flag}"));
        match flag.as_str() {
            "--threads" => match value.parse() {
                Ok(v) => o.threads = v,
                Err(_) => return bad(),
            },
            "--count" => match value.parse() {
                Ok(v) => o.count = v,
                Err(_) => return bad(),
            },
            "--spin-ms" => match value.parse() {
                Ok(v) => o.spin_ms = v,
                Err(_) => return bad(),
            },
            "--seconds" => match value.parse() {
                Ok(v) => o.seconds = v,
                Err(_) => return bad(),
            },
            "--cpu" => match value.parse::<usize>() {
                Ok(v) if v < 1024 => o.cpu = Some(v),
                _ => return bad(),
            },
            "--cgroup" => o.cgroup = Some(value),
            _ => return usage(&format!("unknown flag {flag}")),
        }
    }
    if let Some(dir) = &o.cgroup
        && let Err(e) = std::fs::write(format!("{dir}/cgroup.procs"), "0")
    {
        eprintln!("steal-workload: joining {dir}: {e}");
        return ExitCode::FAILURE;
    }
    if let Some(cpu) = o.cpu
        && let Err(e) = pin(cpu)
    {
        eprintln!("steal-workload: pinning to CPU {cpu}: {e}");
        return ExitCode::FAILURE;
    }
    match mode.as_str() {
        "spin" => {
            let d = Duration::from_secs_f64(o.seconds);
            let threads: Vec<_> = (0..o.threads)
                .map(|_| std::thread::spawn(move || spin_for(d)))
                .collect();
            for t in threads {
                let _ = t.join();
            }
        }
        "forker" => {
            for _ in 0..o.count {
                // SAFETY: single-threaded here; the child only spins and
                // calls _exit, both async-signal-safe in spirit (no locks).
                let pid = unsafe { libc::fork() };
                if pid == 0 {
                    spin_for(Duration::from_millis(o.spin_ms));
                    // SAFETY: leaving the child without running destructors.
                    unsafe { libc::_exit(0) };
                }
                if pid < 0 {
                    eprintln!("steal-workload: fork: {}", std::io::Error::last_os_error());
                    return ExitCode::FAILURE;
                }
                let mut status = 0;
                // SAFETY: waiting for our own child.
                unsafe { libc::waitpid(pid, &mut status, 0) };
            }
        }
        "churn" => {
            let end = Instant::now() + Duration::from_secs_f64(o.seconds);
            let spin = Duration::from_millis(o.spin_ms);
            while Instant::now() < end {
                let _ = std::thread::spawn(move || spin_for(spin)).join();
            }
        }
        other => return usage(&format!("unknown mode {other}")),
    }
    ExitCode::SUCCESS
}
