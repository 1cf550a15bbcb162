//! `cargo xtask vm-test`: the root integration suite on pure cgroup v2, in
//! QEMU (TCG) VMs booting the Debian kernels that `scripts/setup` caches.
//!
//! Builds static (musl) `enforcer` and `enforcer-tests` binaries, packs them
//! with busybox and `init.sh` into a reproducible initramfs, boots each kernel,
//! follows the serial console live, and reports per kernel and in a summary.

mod console;
mod cpio;
pub mod systemd;

use std::{
    io::{BufRead, BufReader, Read, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Args;

use console::{BinaryRun, Console, Event, REQUIRED_CONTROLLERS, tail};
use cpio::{Archive, Node};

const MUSL: &str = "x86_64-unknown-linux-musl";
/// The kernel matrix: series and the Debian suite `scripts/setup` takes it from.
const KERNELS: [(&str, &str); 3] = [
    ("5.10", "bullseye"),
    ("6.1", "bookworm"),
    ("6.12", "trixie"),
];
/// How long a VM may take to power off once its tests are done.
const POWEROFF_GRACE: Duration = Duration::from_secs(60);
const TAIL_LINES: usize = 60;

#[derive(Debug, Args)]
pub struct VmTestArgs {
    /// Kernel series to boot: 5.10, 6.1, 6.12, or all (comma-separated list allowed).
    #[arg(long, default_value = "all")]
    kernel: String,
    /// Per-kernel limit from boot to power-off, e.g. 20m, 900s, 1h. A VM
    /// still running then is killed and counts as failed.
    #[arg(long, default_value = "20m", value_parser = parse_duration)]
    timeout: Duration,
    /// A VM whose console prints nothing for this long has hung (the longest
    /// test prints within about 100 s under TCG): it is killed, and the
    /// kernel booted once more to run the suite again.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    silence: Duration,
    /// Only run tests whose name contains this (passed to every test binary).
    #[arg(long)]
    filter: Option<String>,
    /// Only run these test binaries (the file names in tests/tests/ without
    /// `.rs`); repeat for several. Default: all of them.
    #[arg(long = "test")]
    tests: Vec<String>,
    /// Where the kernels are cached (default: $ENFORCER_CACHE/kernels, else
    /// .cache/kernels in the workspace).
    #[arg(long)]
    kernels_dir: Option<PathBuf>,
    /// Extra kernel command-line arguments, appended after the harness's own
    /// (e.g. "loglevel=7" to see every boot message on the console).
    #[arg(long, default_value = "")]
    kernel_args: String,
    /// vCPUs of each VM (1–64). Tests that need more than the default 2
    /// (placement at scale) skip, visibly, in a smaller VM; `scripts/test`
    /// boots one 8-vCPU VM for them. Logs and the summary of a run with
    /// other than 2 go to target/vm-test-smpN/.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    smp: u32,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 90s, 20m or 1h"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("unknown unit {unit:?} in {s:?} (use s, m or h)")),
    };
    Ok(Duration::from_secs(secs))
}

/// One kernel's result.
struct KernelReport {
    series: String,
    console: Console,
    seconds: f64,
    /// Why the run failed beyond what the console shows (timeout, exit).
    problems: Vec<String>,
    log: PathBuf,
    /// The console went silent for `--silence`: where the tests were.
    hung: Option<String>,
    /// This is the second boot: the first one's guest panicked or hung.
    after_stop: Option<EarlierStop>,
}

/// A boot whose guest kernel panicked or hung, kept for the report when the
/// kernel was booted again.
struct EarlierStop {
    /// "panicked" or "hung".
    how: &'static str,
    /// The panic line from the console, or the silence the harness saw.
    line: String,
    /// Where the tests were when it came.
    at: String,
    /// The first boot's console log, renamed so the second boot keeps it.
    log: PathBuf,
}

impl KernelReport {
    /// Where in the tests a VM that did not finish them stopped.
    fn stopped_at(&self) -> String {
        let c = &self.console;
        match c.binaries.last() {
            Some(b) if b.rc.is_none() => match c.running_test() {
                Some(t) => format!("in test binary {} while {t} ran", b.name),
                None => format!("in test binary {}", b.name),
            },
            _ => "before the tests finished".to_owned(),
        }
    }

    fn failures(&self, expected: &[String]) -> Vec<String> {
        let c = &self.console;
        let mut out = self.problems.clone();
        if let Some(p) = &c.panic {
            out.push(format!("kernel panic: {p}"));
        }
        if !c.done {
            out.push(format!("the VM stopped {}", self.stopped_at()));
        }
        match &c.subtree_control {
            Some(sc) => {
                let enabled: Vec<&str> = sc.split_whitespace().collect();
                for r in REQUIRED_CONTROLLERS {
                    if !enabled.contains(&r) {
                        out.push(format!(
                            "controller {r} not enabled in the root subtree_control ({sc})"
                        ));
                    }
                }
            }
            None => out.push("init did not report the root subtree_control".to_owned()),
        }
        out.extend(
            c.notes
                .iter()
                .filter(|n| n.starts_with("setup-error"))
                .cloned(),
        );
        match &c.doctor {
            Some(d) => out.extend(d.failures()),
            None => out.push("enforcer doctor did not run".to_owned()),
        }
        for b in &c.binaries {
            if !b.ok() {
                let still = b.still_failed();
                out.push(format!(
                    "{}: exit {}, failed: {}",
                    b.name,
                    b.rc.map_or("none".to_owned(), |r| r.to_string()),
                    if still.is_empty() {
                        "-".to_owned()
                    } else {
                        still.join(", ")
                    }
                ));
            }
        }
        if c.done {
            for name in expected {
                if !c.binaries.iter().any(|b| &b.name == name) {
                    out.push(format!("test binary {name} did not run"));
                }
            }
        }
        out
    }
}

pub fn run(root: &Path, args: &VmTestArgs) -> Result<()> {
    let series = select_kernels(&args.kernel)?;
    let kernels_dir = args
        .kernels_dir
        .clone()
        .unwrap_or_else(|| cache_dir(root).join("kernels"));
    let mut kernels = Vec::new();
    for s in &series {
        let vmlinuz = kernels_dir.join(s).join("vmlinuz");
        if !vmlinuz.is_file() {
            let suite = KERNELS
                .iter()
                .find(|(k, _)| k == s)
                .map_or("?", |(_, suite)| suite);
            bail!(
                "kernel {s} (Debian {suite}) is not cached at {} — run scripts/setup",
                vmlinuz.display()
            );
        }
        kernels.push((s.clone(), vmlinuz));
    }
    let qemu = "qemu-system-x86_64";
    if Command::new(qemu)
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        bail!("{qemu} not found — run scripts/setup (Debian package qemu-system-x86)");
    }

    let out_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root.join("target"), PathBuf::from)
        .join(if args.smp == 2 {
            "vm-test".to_owned()
        } else {
            format!("vm-test-smp{}", args.smp)
        });
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let summary_path = out_dir.join("summary.tsv");
    let _ = std::fs::remove_file(&summary_path);

    let started = Instant::now();
    progress(&format!(
        "building enforcer and the enforcer-tests binaries for {MUSL}"
    ));
    let enforcer = build_enforcer(root)?;
    let (mut tests, helpers) = build_tests(root)?;
    if !args.tests.is_empty() {
        for wanted in &args.tests {
            if !tests.iter().any(|a| &a.name == wanted) {
                bail!(
                    "no test binary {wanted}; there are: {}",
                    tests
                        .iter()
                        .map(|a| a.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
        }
        tests.retain(|a| args.tests.contains(&a.name));
    }
    if tests.is_empty() {
        bail!("enforcer-tests has no test binaries to run");
    }
    let names: Vec<String> = tests.iter().map(|a| a.name.clone()).collect();
    progress(&format!(
        "built in {:.0} s; test binaries: {}",
        started.elapsed().as_secs_f64(),
        names.join(" ")
    ));

    let initramfs = out_dir.join("initramfs.cpio.gz");
    let size = build_initramfs(
        &out_dir,
        &initramfs,
        &enforcer,
        &tests,
        &helpers,
        args.filter.as_deref(),
    )?;
    progress(&format!(
        "initramfs {} ({:.1} MiB)",
        initramfs.display(),
        size as f64 / (1 << 20) as f64
    ));

    let mut reports = Vec::new();
    for (s, vmlinuz) in &kernels {
        let log = out_dir.join(format!("{s}.log"));
        let mut report = boot(s, vmlinuz, &initramfs, &log, args)?;
        print_kernel_report(&report, &names);
        // A guest kernel that panics is the kernel's bug, not a test's
        // verdict (a root program cannot crash a correct kernel through
        // cgroupfs or a tracepoint program), and a guest whose console
        // goes silent has hung (every test prints, and each has its own
        // time limits): the kernel is booted once more and the whole
        // suite run again, and the summary says so. A second panic or
        // hang, or any test failing, still fails the kernel.
        let stop = match (report.console.panic.clone(), report.hung.clone()) {
            (Some(line), _) => Some(("panicked", "panic", line)),
            (None, Some(silence)) => Some(("hung", "hang", silence)),
            (None, None) => None,
        };
        if let Some((how, suffix, line)) = stop {
            let kept = out_dir.join(format!("{s}.{suffix}.log"));
            std::fs::rename(&log, &kept)
                .with_context(|| format!("keeping {} as {}", log.display(), kept.display()))?;
            let at = report.stopped_at();
            progress(&format!(
                "{s}: the guest {how} {at}; its console log is kept at {}; booting {s} once more to run the suite again",
                kept.display()
            ));
            report = boot(s, vmlinuz, &initramfs, &log, args)?;
            report.after_stop = Some(EarlierStop {
                how,
                line,
                at,
                log: kept,
            });
            print_kernel_report(&report, &names);
        }
        reports.push(report);
    }

    let failed = print_summary(&reports, &names, &summary_path)?;
    if failed > 0 {
        bail!("vm-test: {failed} of {} kernel(s) failed", reports.len());
    }
    Ok(())
}

/// What `scripts/setup` downloads and makes: $ENFORCER_CACHE, else .cache in
/// the workspace.
fn cache_dir(root: &Path) -> PathBuf {
    std::env::var_os("ENFORCER_CACHE").map_or_else(|| root.join(".cache"), PathBuf::from)
}

fn select_kernels(spec: &str) -> Result<Vec<String>> {
    let known: Vec<&str> = KERNELS.iter().map(|(s, _)| *s).collect();
    if spec == "all" {
        return Ok(known.iter().map(|s| (*s).to_owned()).collect());
    }
    spec.split(',')
        .map(|s| {
            let s = s.trim();
            if known.contains(&s) {
                Ok(s.to_owned())
            } else {
                bail!(
                    "unknown kernel {s:?}: choose from {} or all",
                    known.join(", ")
                )
            }
        })
        .collect()
}

fn progress(msg: &str) {
    eprintln!("vm-test: {msg}");
}

/// An executable cargo built.
struct Artifact {
    /// The target's name (a test binary: its file name in `tests/tests/`).
    name: String,
    path: PathBuf,
    /// Built as a test harness (`profile.test`).
    test: bool,
}

/// Runs cargo with `--message-format=json` and returns the executables of the
/// compiler artifacts that `keep` accepts.
fn cargo_executables(
    root: &Path,
    args: &[&str],
    keep: impl Fn(&serde_json::Value) -> bool,
) -> Result<Vec<Artifact>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut child = Command::new(&cargo)
        .current_dir(root)
        .args(args)
        .args(["--target", MUSL, "--message-format=json-render-diagnostics"])
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {cargo} {}", args.join(" ")))?;
    let mut found = Vec::new();
    let stdout = child.stdout.take().expect("stdout is piped");
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if msg["reason"] == "compiler-artifact"
            && let Some(exe) = msg["executable"].as_str()
            && keep(&msg)
        {
            found.push(Artifact {
                name: msg["target"]["name"]
                    .as_str()
                    .unwrap_or("unnamed")
                    .to_owned(),
                path: PathBuf::from(exe),
                test: msg["profile"]["test"] == true,
            });
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("cargo {} --target {MUSL} failed ({status})", args.join(" "));
    }
    found.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(found)
}

/// The enforcer under test: with `test-audit`, which the suite's write audit
/// needs (release builds never have it).
fn build_enforcer(root: &Path) -> Result<PathBuf> {
    let bins = cargo_executables(
        root,
        &[
            "build",
            "-p",
            "enforcer",
            "--bin",
            "enforcer",
            "--features",
            "test-audit",
        ],
        |m| m["target"]["name"] == "enforcer",
    )?;
    bins.into_iter()
        .next()
        .map(|a| a.path)
        .context("cargo built no enforcer executable")
}

/// The integration test binaries of `enforcer-tests` (one per file in
/// `tests/tests/`, discovered from cargo's output so new files need no
/// change here), and the crate's own `[[bin]]` helpers, which its tests find
/// through `env!("CARGO_BIN_EXE_<name>")`.
fn build_tests(root: &Path) -> Result<(Vec<Artifact>, Vec<Artifact>)> {
    let built = cargo_executables(root, &["test", "-p", "enforcer-tests", "--no-run"], |m| {
        let kinds = m["target"]["kind"].as_array();
        let is = |kind: &str| kinds.is_some_and(|k| k.iter().any(|k| k == kind));
        let ours = m["package_id"]
            .as_str()
            .is_some_and(|id| id.contains("enforcer-tests"));
        let test = m["profile"]["test"] == true;
        // Integration tests, and the helpers built as programs (not the
        // helpers' own unit-test harnesses).
        (is("test") && test) || (is("bin") && ours && !test)
    })?;
    Ok(built.into_iter().partition(|a| a.test))
}

/// Copies an executable for the initramfs without its debug info (a debug
/// build is mostly DWARF); symbols stay, so backtraces keep function names.
fn stripped(src: &Path, staging: &Path, name: &str) -> Result<PathBuf> {
    let dest = staging.join(name);
    let status = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&dest)
        .arg(src)
        .status();
    match status {
        Ok(s) if s.success() => Ok(dest),
        _ => {
            std::fs::copy(src, &dest).with_context(|| format!("copying {}", src.display()))?;
            Ok(dest)
        }
    }
}

fn build_initramfs(
    out_dir: &Path,
    dest: &Path,
    enforcer: &Path,
    tests: &[Artifact],
    helpers: &[Artifact],
    filter: Option<&str>,
) -> Result<u64> {
    let busybox = Path::new("/bin/busybox");
    let file_out = Command::new("file").arg("-L").arg(busybox).output();
    if let Ok(o) = file_out
        && String::from_utf8_lossy(&o.stdout).contains("dynamically linked")
    {
        bail!(
            "{} is dynamically linked: install busybox-static (scripts/setup)",
            busybox.display()
        );
    }
    let staging = out_dir.join("staging");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging)?;

    let mut a = Archive::default();
    for dir in [
        "bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "run", "root", "tests",
    ] {
        a.add(dir, Node::Dir)?;
    }
    // The kernel opens /dev/console for init before devtmpfs is mounted.
    a.add("dev/console", Node::CharDevice { major: 5, minor: 1 })?;
    a.add_file("bin/busybox", busybox, true)
        .context("busybox-static is needed (scripts/setup)")?;
    a.add("bin/sh", Node::Symlink("busybox".to_owned()))?;
    a.add(
        "init",
        Node::File {
            data: include_bytes!("init.sh").to_vec(),
            executable: true,
        },
    )?;
    a.add(
        "etc/passwd",
        file("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"),
    )?;
    a.add("etc/group", file("root:x:0:\nnogroup:x:65534:\n"))?;
    a.add(
        "etc/vmtest/test-args",
        file(filter.map_or(String::new(), |f| format!("{f}\n")).as_str()),
    )?;
    a.add_file(
        "bin/enforcer",
        &stripped(enforcer, &staging, "enforcer")?,
        true,
    )?;
    for t in tests {
        let exe = stripped(&t.path, &staging, &format!("test-{}", t.name))?;
        a.add_file(&format!("tests/{}", t.name), &exe, true)?;
    }
    // Helpers go where `env!("CARGO_BIN_EXE_<name>")` says they are, the
    // host path of the musl build, so tests find them unchanged in the VM.
    for h in helpers {
        let path = h
            .path
            .to_str()
            .with_context(|| format!("helper path {} is not UTF-8", h.path.display()))?;
        if ["/proc/", "/sys/", "/dev/", "/run/"]
            .iter()
            .any(|m| path.starts_with(m))
        {
            bail!("helper {path} lies under a filesystem the VM's init mounts over");
        }
        let exe = stripped(&h.path, &staging, &format!("helper-{}", h.name))?;
        a.add_file(path, &exe, true)?;
        // ...and on PATH, beside /bin/enforcer.
        a.add(&format!("bin/{}", h.name), Node::Symlink(path.to_owned()))?;
    }
    a.write_gz(dest)?;
    std::fs::remove_dir_all(&staging)?;
    Ok(std::fs::metadata(dest)?.len())
}

fn show_rc(rc: Option<i32>) -> String {
    rc.map_or_else(|| "none".to_owned(), |r| r.to_string())
}

fn file(text: &str) -> Node {
    Node::File {
        data: text.as_bytes().to_vec(),
        executable: false,
    }
}

/// Boots one kernel and follows its console until it powers off, panics, or
/// runs out of time.
fn boot(
    series: &str,
    vmlinuz: &Path,
    initramfs: &Path,
    log_path: &Path,
    args: &VmTestArgs,
) -> Result<KernelReport> {
    let timeout = args.timeout;
    progress(&format!("booting {series} ({})", vmlinuz.display()));
    let mut log = std::io::BufWriter::new(
        std::fs::File::create(log_path)
            .with_context(|| format!("creating {}", log_path.display()))?,
    );
    let start = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        // KVM hangs on these machines: TCG only, and never -enable-kvm.
        .args(["-accel", "tcg", "-cpu", "max", "-m", "2048"])
        .arg("-smp")
        .arg(args.smp.to_string())
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initramfs)
        // mitigations=off: speculative-execution defences only slow emulation
        // down; nothing under test depends on them.
        .arg("-append")
        .arg(format!(
            "console=ttyS0 panic=-1 loglevel=4 mitigations=off rdinit=/init {}",
            args.kernel_args
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64")?;

    let (tx, rx) = mpsc::channel::<String>();
    let readers = [
        forward_lines(child.stdout.take().expect("piped"), tx.clone(), ""),
        forward_lines(child.stderr.take().expect("piped"), tx, "qemu: "),
    ];

    let mut console = Console::default();
    let mut problems = Vec::new();
    let mut hung = None;
    let mut done_at: Option<Instant> = None;
    let mut last_line = start;
    loop {
        let limit = match done_at {
            Some(t) => (t + POWEROFF_GRACE).min(start + timeout),
            None => start + timeout,
        };
        let now = Instant::now();
        let silent_until = last_line + args.silence;
        if done_at.is_none() && now >= silent_until && silent_until < limit {
            let silence = format!(
                "no console output for {} s after {:.1} s",
                args.silence.as_secs(),
                last_line.duration_since(start).as_secs_f64()
            );
            progress(&format!("{series}: {silence}: the guest hung; killing it"));
            problems.push(format!("{silence}: the guest hung"));
            hung = Some(silence);
            child.kill().ok();
            break;
        }
        if now >= limit {
            if done_at.is_some() && now < start + timeout {
                problems.push(format!(
                    "the VM did not power off within {} s after its tests",
                    POWEROFF_GRACE.as_secs()
                ));
            } else {
                problems.push(format!("timed out after {} s", timeout.as_secs()));
            }
            child.kill().ok();
            break;
        }
        let wake = if done_at.is_none() {
            limit.min(silent_until)
        } else {
            limit
        };
        match rx.recv_timeout(wake.saturating_duration_since(now)) {
            Ok(line) => {
                last_line = Instant::now();
                // Host-side seconds since qemu started: boot timings can be
                // read off the log without trusting the emulated clock. Each
                // line is flushed, so a VM still running can be watched.
                writeln!(log, "[{:8.3}] {line}", start.elapsed().as_secs_f64())?;
                log.flush()?;
                if let Some(event) = console.feed(&line) {
                    let elapsed = start.elapsed().as_secs_f64();
                    match event {
                        Event::Release(r) => {
                            progress(&format!("{series}: kernel {r} up after {elapsed:.1} s"))
                        }
                        Event::DoctorDone => {
                            let d = console.doctor.as_ref().expect("doctor section seen");
                            let verdict = d.failures();
                            progress(&format!(
                                "{series}: doctor exit {}, cgroup mode {}, {}",
                                show_rc(d.rc),
                                d.mode.as_deref().unwrap_or("?"),
                                if verdict.is_empty() {
                                    "ok".to_owned()
                                } else {
                                    verdict.join("; ")
                                }
                            ));
                        }
                        Event::BinaryStarted(b) => progress(&format!("{series}: running {b}")),
                        Event::TestResult {
                            binary,
                            test,
                            outcome,
                        } => {
                            progress(&format!("{series}: {binary}: {test} ... {outcome}"));
                        }
                        Event::BinaryDone(b) => {
                            let run = console
                                .binaries
                                .iter()
                                .rev()
                                .find(|r| r.name == b)
                                .expect("just ended");
                            progress(&format!(
                                "{series}: {b} exited {} ({} passed, {} failed) at {elapsed:.1} s",
                                run.rc.map_or("?".to_owned(), |r| r.to_string()),
                                run.passed.len(),
                                run.failed.len()
                            ));
                        }
                        Event::RerunDone {
                            binary,
                            test,
                            passed,
                        } => progress(&format!(
                            "{series}: {binary}: {test} run once more alone ... {}",
                            if passed {
                                "ok (passed on rerun)"
                            } else {
                                "FAILED again"
                            }
                        )),
                        Event::Note(n) => progress(&format!("{series}: {n}")),
                        Event::KernelPanic(p) => progress(&format!("{series}: KERNEL PANIC: {p}")),
                        Event::Done => {
                            progress(&format!(
                                "{series}: tests done after {elapsed:.1} s, powering off"
                            ));
                            done_at = Some(Instant::now());
                        }
                    }
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let status = child.wait().context("waiting for qemu")?;
    for r in readers {
        let _ = r.join();
    }
    // Lines that raced the kill are in the channel still.
    while let Ok(line) = rx.try_recv() {
        writeln!(log, "[{:8.3}] {line}", start.elapsed().as_secs_f64())?;
        console.feed(&line);
    }
    log.flush()?;
    let seconds = start.elapsed().as_secs_f64();
    if problems.is_empty() && !status.success() {
        problems.push(format!("qemu exited with {status}"));
    }
    progress(&format!(
        "{series}: VM ended after {seconds:.1} s (log: {})",
        log_path.display()
    ));
    Ok(KernelReport {
        series: series.to_owned(),
        console,
        seconds,
        problems,
        log: log_path.to_owned(),
        hung,
        after_stop: None,
    })
}

fn forward_lines(
    pipe: impl Read + Send + 'static,
    tx: mpsc::Sender<String>,
    prefix: &'static str,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf);
                    let line = line.trim_end_matches(['\n', '\r']).replace('\r', "");
                    if tx.send(format!("{prefix}{line}")).is_err() {
                        return;
                    }
                }
            }
        }
    })
}

fn print_kernel_report(r: &KernelReport, expected: &[String]) {
    let c = &r.console;
    let failures = r.failures(expected);
    eprintln!();
    eprintln!(
        "=== kernel {} ({}): {} in {:.1} s",
        r.series,
        c.release.as_deref().unwrap_or("release unknown"),
        if failures.is_empty() { "PASS" } else { "FAIL" },
        r.seconds
    );
    if let Some(sc) = &c.subtree_control {
        eprintln!("    root subtree_control: {sc}");
    }
    if let Some(d) = &c.doctor {
        let usable: Vec<String> = d
            .usable
            .iter()
            .map(|(k, v)| format!("{k}={}", if *v { "usable" } else { "NOT usable" }))
            .collect();
        eprintln!(
            "    doctor: exit {}, cgroup mode {}, {}, eBPF sched_switch seen {}",
            show_rc(d.rc),
            d.mode.as_deref().unwrap_or("?"),
            usable.join(" "),
            d.switches_seen.map_or("?".to_owned(), |n| n.to_string())
        );
        if !d.failures().is_empty() {
            for l in &d.text {
                eprintln!("    | {l}");
            }
        }
    }
    for b in &c.binaries {
        let flaky = b.flaky();
        eprintln!(
            "    {:<24} {} ({} passed, {} failed, {} ignored, exit {}{})",
            b.name,
            if b.ok() { "ok" } else { "FAILED" },
            b.passed.len() + flaky.len(),
            b.still_failed().len(),
            b.ignored,
            b.rc.map_or("none".to_owned(), |x| x.to_string()),
            if flaky.is_empty() {
                String::new()
            } else {
                format!("; failed, then passed alone: {}", flaky.join(", "))
            }
        );
        // A test that passed only on its rerun still shows why it failed.
        if !b.ok() || !flaky.is_empty() {
            for l in b.failure_output() {
                eprintln!("    | {l}");
            }
        }
    }
    if !failures.is_empty() {
        eprintln!("    failures:");
        for f in &failures {
            eprintln!("      - {f}");
        }
        let stopped_early = !c.done || c.panic.is_some() || !r.problems.is_empty();
        if stopped_early && let Ok(text) = std::fs::read_to_string(&r.log) {
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("    console tail ({}):", r.log.display());
            for l in tail(&lines, TAIL_LINES) {
                eprintln!("    | {l}");
            }
        }
    }
}

#[expect(
    clippy::print_stdout,
    reason = "the summary table is this task's output"
)]
fn print_summary(reports: &[KernelReport], expected: &[String], tsv: &Path) -> Result<usize> {
    let mut failed = 0;
    let mut rows = String::from(
        "kernel\trelease\tresult\ttests_passed\ttests_failed\tseconds\tcgroup_mode\tnote\n",
    );
    println!();
    println!("vm-test summary");
    println!(
        "{:<7} {:<26} {:<6} {:>6} {:>6} {:>8}  {:<8} doctor: cpu/memory/pids",
        "kernel", "release (uname -r)", "result", "passed", "failed", "seconds", "cgroups"
    );
    for r in reports {
        let failures = r.failures(expected);
        if !failures.is_empty() {
            failed += 1;
        }
        let c = &r.console;
        // A test that passed on its rerun counts as passed (and is named).
        let passed: usize = c
            .binaries
            .iter()
            .map(|b| b.passed.len() + b.flaky().len())
            .sum();
        let failed_tests: usize = c.binaries.iter().map(|b| b.still_failed().len()).sum();
        let mode = c
            .doctor
            .as_ref()
            .and_then(|d| d.mode.clone())
            .unwrap_or_else(|| "?".to_owned());
        let usable = c.doctor.as_ref().map_or("?".to_owned(), |d| {
            d.usable
                .values()
                .map(|u| if *u { "yes" } else { "NO" })
                .collect::<Vec<_>>()
                .join("/")
        });
        let result = if failures.is_empty() { "PASS" } else { "FAIL" };
        let release = c.release.as_deref().unwrap_or("?");
        println!(
            "{:<7} {:<26} {:<6} {:>6} {:>6} {:>8.1}  {:<8} {}",
            r.series, release, result, passed, failed_tests, r.seconds, mode, usable
        );
        // The failed tests' names go into the row, so that a summary read
        // without the log above it (a CI page shows only its tail) still
        // says which test failed.
        let mut notes: Vec<String> = r
            .after_stop
            .iter()
            .map(|p| format!("second boot: the first one {} {}", p.how, p.at))
            .collect();
        let named = |pick: fn(&BinaryRun) -> Vec<&str>| -> Vec<String> {
            c.binaries
                .iter()
                .flat_map(|b| pick(b).into_iter().map(|t| format!("{}::{t}", b.name)))
                .collect()
        };
        let flaky = named(BinaryRun::flaky);
        if !flaky.is_empty() {
            notes.push(format!("failed, then passed alone: {}", flaky.join(", ")));
        }
        let failed_names = named(BinaryRun::still_failed);
        if !failed_names.is_empty() {
            notes.push(format!("failed: {}", failed_names.join(", ")));
        }
        let note = notes.join("; ");
        rows.push_str(&format!(
            "{}\t{release}\t{result}\t{passed}\t{failed_tests}\t{:.1}\t{mode}\t{note}\n",
            r.series, r.seconds
        ));
    }
    for r in reports {
        for b in &r.console.binaries {
            for t in b.flaky() {
                println!(
                    "{}: {}::{t} failed, then passed when run once more alone (counted as passed; its failure is in the log)",
                    r.series, b.name
                );
            }
            for t in b.still_failed() {
                println!("{}: FAILED {}::{t}", r.series, b.name);
            }
        }
        if let Some(p) = &r.after_stop {
            println!(
                "{}: the result is the second boot's: the first one's guest {} {} ({}; log: {})",
                r.series,
                p.how,
                p.at,
                p.line.trim(),
                p.log.display()
            );
        }
    }
    std::fs::write(tsv, rows).with_context(|| format!("writing {}", tsv.display()))?;
    Ok(failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("20m"), Ok(Duration::from_secs(1200)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        assert!(parse_duration("20 minutes").is_err());
        assert!(parse_duration("m").is_err());
    }

    #[test]
    fn kernel_selection_accepts_all_lists_and_rejects_unknown() {
        assert_eq!(select_kernels("all").unwrap(), ["5.10", "6.1", "6.12"]);
        assert_eq!(select_kernels("6.12,5.10").unwrap(), ["6.12", "5.10"]);
        assert!(select_kernels("6.6").is_err());
    }
}
