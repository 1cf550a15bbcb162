//! Workloads for the job integration tests, as one small static-friendly
//! binary (the VM initramfs has busybox sh but no python or perl):
//!
//! - `memhog TOTAL_MB STEP_MB`: touches TOTAL_MB of memory in STEP_MB steps;
//! - `forkbomb SECONDS`: forks as fast as it can for SECONDS (each child
//!   sleeps SECONDS); capped at 2000 children so a failed limit cannot take
//!   the machine down; prints how many forks succeeded and failed;
//! - `spin THREADS SECONDS`: burns THREADS CPUs for SECONDS;
//! - `daemon PIDFILE`: double-forks a setsid daemon that writes its PID to
//!   PIDFILE and sleeps forever, then sleeps forever itself;
//! - `threads N`: starts N sleeping threads, prints `ready`, sleeps forever.

use std::{
    io::Write,
    time::{Duration, Instant},
};

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
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("memhog") => memhog(arg(&args, 1, "TOTAL_MB"), arg(&args, 2, "STEP_MB")),
        Some("forkbomb") => forkbomb(arg(&args, 1, "SECONDS")),
        Some("spin") => spin(arg(&args, 1, "THREADS"), arg(&args, 2, "SECONDS")),
        Some("daemon") => daemon(args.get(1).unwrap_or_else(|| die("missing PIDFILE"))),
        Some("threads") => threads(arg(&args, 1, "N")),
        _ => die("usage: eval-workload memhog|forkbomb|spin|daemon|threads ..."),
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

fn spin(threads: usize, seconds: f64) {
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let hs: Vec<_> = (0..threads)
        .map(|_| {
            std::thread::spawn(move || {
                let mut x = 0u64;
                while Instant::now() < end {
                    for _ in 0..10_000 {
                        x = std::hint::black_box(
                            x.wrapping_mul(6364136223846793005).wrapping_add(1),
                        );
                    }
                }
                x
            })
        })
        .collect();
    for h in hs {
        let _ = h.join();
    }
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
