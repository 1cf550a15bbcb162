//! `cargo xtask vm-systemd`: `deploy/enforcer.service` started by a real
//! systemd as PID 1, in a QEMU (TCG) VM booting a Debian kernel with the
//! Debian rootfs of the same suite that `scripts/setup` makes with
//! debootstrap.
//!
//! The VM boots the whole rootfs as its initramfs (`rdinit=` systemd, so no
//! block device and no kernel modules are needed): the cached base archive
//! followed by an overlay archive built here with what a node would have
//! installed (the enforcer binary, the unit enabled, the config) and a check
//! unit that runs jobs through the agent once it is up, reports on the serial
//! console and powers the VM off.

use std::{
    collections::BTreeMap,
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Args;

use super::{
    KERNELS, build_enforcer, cache_dir, console::tail, cpio, forward_lines, parse_duration,
    stripped,
};
use crate::dist;

/// The unit's cgroup: `Delegate=yes` hands this subtree to the agent.
const UNIT_CGROUP: &str = "/system.slice/enforcer.service";
/// The memory limit the check's jobs ask for (`--memory 100M` in
/// systemd-check.sh), in bytes.
const JOB_MEMORY_MAX: &str = "104857600";
/// The unprivileged user the check runs its second job as.
const USER_UID: &str = "65534";
/// Units a headless test VM does not need, masked so that they neither slow
/// the boot nor hold the serial console (a getty on ttyS0 would).
const MASKED: [&str; 18] = [
    "getty.target",
    "serial-getty@ttyS0.service",
    "getty@tty1.service",
    "console-getty.service",
    "systemd-firstboot.service",
    "systemd-hwdb-update.service",
    "ldconfig.service",
    "systemd-journal-catalog-update.service",
    "systemd-update-done.service",
    "systemd-timesyncd.service",
    "systemd-networkd.service",
    "networking.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
    "systemd-tmpfiles-clean.timer",
];
/// A fixed machine id: without one systemd treats the boot as the first and
/// runs its first-boot units.
const MACHINE_ID: &str = "5e1f0c0de5e1f0c0de5e1f0c0de5e1f0\n";
/// How long the VM may take to shut down once the check is done: systemd
/// stops the agent (`TimeoutStopSec=30s`) and the rest of the system.
const POWEROFF_GRACE: Duration = Duration::from_secs(90);
const TAIL_LINES: usize = 80;
const MARKER: &str = "@@vmsystemd ";

#[derive(Debug, Args)]
pub struct VmSystemdArgs {
    /// Kernel series to boot: 5.10, 6.1 or 6.12. The rootfs is that kernel's
    /// Debian suite (bullseye, bookworm, trixie); `scripts/setup` makes the
    /// trixie one, ENFORCER_ROOTFS_SUITES="trixie bookworm" more.
    #[arg(long, default_value = "6.12")]
    kernel: String,
    /// Limit from boot to power-off, e.g. 10m, 600s. A VM still running then
    /// is killed and the run fails.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    timeout: Duration,
    /// Extra kernel command-line arguments, appended after the harness's own
    /// (e.g. "systemd.log_level=debug").
    #[arg(long, default_value = "")]
    kernel_args: String,
}

fn say(msg: &str) {
    eprintln!("vm-systemd: {msg}");
}

pub fn run(root: &Path, args: &VmSystemdArgs) -> Result<()> {
    let Some((series, suite)) = KERNELS.iter().find(|(s, _)| *s == args.kernel) else {
        bail!(
            "unknown kernel {:?} for --kernel: choose from {}",
            args.kernel,
            KERNELS.map(|(s, _)| s).join(", ")
        );
    };
    let cache = cache_dir(root);
    let vmlinuz = cache.join("kernels").join(series).join("vmlinuz");
    if !vmlinuz.is_file() {
        bail!(
            "kernel {series} (Debian {suite}) is not cached at {} — run scripts/setup",
            vmlinuz.display()
        );
    }
    let rootfs = cache.join("rootfs");
    let base = rootfs.join(format!("{suite}.cpio.gz"));
    let stamp = rootfs.join(format!("{suite}.stamp"));
    if !base.is_file() || !stamp.is_file() {
        bail!(
            "no Debian {suite} rootfs archive at {} — run scripts/setup \
             (ENFORCER_ROOTFS_SUITES=\"trixie {suite}\" scripts/setup for suites other than trixie)",
            base.display()
        );
    }
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        bail!("qemu-system-x86_64 not found — run scripts/setup (Debian package qemu-system-x86)");
    }

    let out_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root.join("target"), PathBuf::from)
        .join("vm-systemd");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let result_path = out_dir.join("result.txt");
    let _ = std::fs::remove_file(&result_path);

    let started = Instant::now();
    say("building enforcer for x86_64-unknown-linux-musl");
    // The same build as vm-test's, so that scripts/test compiles it once; its
    // test-audit feature does nothing unless the suite's audit variable is set.
    let enforcer = build_enforcer(root)?;
    say(&format!(
        "built in {:.0} s",
        started.elapsed().as_secs_f64()
    ));

    let initramfs = out_dir.join("initramfs.img");
    build_initramfs(root, &out_dir, &base, &enforcer, &initramfs)?;
    say(&format!(
        "initramfs {} ({:.1} MiB; rootfs {})",
        initramfs.display(),
        std::fs::metadata(&initramfs)?.len() as f64 / f64::from(1 << 20),
        std::fs::read_to_string(&stamp)?.trim()
    ));

    let log = out_dir.join(format!("{series}.log"));
    let run = boot(&vmlinuz, &initramfs, &log, args)?;
    let failures = run.failures();
    report(series, &run, &failures, &log, &result_path)?;
    if !failures.is_empty() {
        bail!(
            "vm-systemd: {} check(s) failed on kernel {series}",
            failures.len()
        );
    }
    Ok(())
}

/// The path `ExecStart=` of the unit runs (without its `-@:+!` prefixes).
fn exec_start_binary(unit: &str) -> Result<&str> {
    let line = unit
        .lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix("ExecStart="))
        .context("deploy/enforcer.service has no ExecStart=")?;
    let binary = line
        .trim_start_matches(['-', '@', ':', '+', '!'])
        .split_whitespace()
        .next()
        .context("deploy/enforcer.service: ExecStart= is empty")?;
    if !binary.starts_with('/') {
        bail!("deploy/enforcer.service: ExecStart= runs {binary:?}, not an absolute path");
    }
    Ok(binary)
}

/// The base rootfs archive followed by the overlay: the kernel unpacks a
/// sequence of archives, each compressed on its own, later entries replacing
/// earlier ones.
fn build_initramfs(
    root: &Path,
    out_dir: &Path,
    base: &Path,
    enforcer: &Path,
    dest: &Path,
) -> Result<()> {
    let read = |rel: &str| {
        std::fs::read_to_string(root.join(rel)).with_context(|| format!("reading {rel}"))
    };
    let unit = read("deploy/enforcer.service")?;
    let config = read("deploy/enforcer.toml")?;
    // The binary goes where `cargo xtask dist`'s install.sh puts it, which
    // must be where the unit runs it from.
    let installed = format!("{}/enforcer", dist::BIN_DIR);
    let exec = exec_start_binary(&unit)?;
    if exec != installed {
        bail!("deploy/enforcer.service runs {exec}, but install.sh installs {installed}");
    }
    let staging = out_dir.join("staging");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging)?;

    let units = dist::UNIT_DIR;
    let mut a = cpio::Archive::default();
    a.add_file(&installed, &stripped(enforcer, &staging, "enforcer")?, true)?;
    a.add(&format!("{units}/enforcer.service"), text(&unit))?;
    a.add(
        &format!("{}/enforcer.toml", dist::CONFIG_DIR),
        text(&config),
    )?;
    a.add(
        "usr/local/sbin/enforcer-vm-check",
        cpio::Node::File {
            data: include_bytes!("systemd-check.sh").to_vec(),
            executable: true,
        },
    )?;
    a.add(
        &format!("{units}/enforcer-vm-check.service"),
        text(include_str!("systemd-check.service")),
    )?;
    // `systemctl enable` of both units, as links in the target's wants.
    for name in ["enforcer.service", "enforcer-vm-check.service"] {
        a.add(
            &format!("{units}/multi-user.target.wants/{name}"),
            cpio::Node::Symlink(format!("{units}/{name}")),
        )?;
    }
    for name in MASKED {
        a.add(
            &format!("{units}/{name}"),
            cpio::Node::Symlink("/dev/null".to_owned()),
        )?;
    }
    a.add("etc/machine-id", text(MACHINE_ID))?;
    a.add("etc/hostname", text("enforcer-vm\n"))?;
    // The kernel opens /dev/console for PID 1 before anything mounts /dev.
    a.add("dev/console", cpio::Node::CharDevice { major: 5, minor: 1 })?;
    let overlay = out_dir.join("overlay.cpio.gz");
    a.write_gz(&overlay)?;
    std::fs::remove_dir_all(&staging)?;

    let mut out = std::fs::File::create(dest)
        .map(std::io::BufWriter::new)
        .with_context(|| format!("creating {}", dest.display()))?;
    for part in [base, overlay.as_path()] {
        let mut f =
            std::fs::File::open(part).with_context(|| format!("opening {}", part.display()))?;
        std::io::copy(&mut f, &mut out).with_context(|| format!("writing {}", dest.display()))?;
    }
    out.flush()
        .with_context(|| format!("writing {}", dest.display()))?;
    Ok(())
}

fn text(s: &str) -> cpio::Node {
    cpio::Node::File {
        data: s.as_bytes().to_vec(),
        executable: false,
    }
}

/// What the check reported on the console.
#[derive(Debug, Default)]
struct Check {
    /// `@@vmsystemd KEY VALUE` lines; the last value of a key wins.
    marks: BTreeMap<String, String>,
    /// `@@vmsystemd KEY | TEXT` lines (a job's output, the agent's journal).
    quoted: BTreeMap<String, Vec<String>>,
    panic: Option<String>,
}

impl Check {
    /// Takes one console line; returns the key of a new mark.
    fn feed(&mut self, line: &str) -> Option<String> {
        if line.contains("Kernel panic - not syncing") && self.panic.is_none() {
            self.panic = Some(line.to_owned());
        }
        // Anywhere in the line: systemd's status lines share the console and
        // may end up in front of a marker.
        let at = line.find(MARKER)?;
        let rest = line[at + MARKER.len()..].trim_end();
        let (key, value) = rest.split_once(' ').unwrap_or((rest, ""));
        if let Some(quoted) = value.strip_prefix('|') {
            self.quoted
                .entry(key.to_owned())
                .or_default()
                .push(quoted.strip_prefix(' ').unwrap_or(quoted).to_owned());
            return None;
        }
        self.marks.insert(key.to_owned(), value.to_owned());
        Some(key.to_owned())
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.marks.get(key).map(String::as_str)
    }

    /// What the check saw that is wrong (empty: the deployment works).
    fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(p) = &self.panic {
            out.push(format!("kernel panic: {p}"));
        }
        if self.get("begin").is_none() {
            out.push(
                "the check never ran: systemd did not reach multi-user.target or did not start \
                 enforcer-vm-check.service"
                    .to_owned(),
            );
            return out;
        }
        let mut expect = |key: &str, what: &str, ok: &dyn Fn(&str) -> bool| match self.get(key) {
            Some(v) if ok(v) => {}
            Some(v) => out.push(format!("{key}: {v:?}, expected {what}")),
            None => out.push(format!("{key}: not reported (expected {what})")),
        };
        expect("pid1", "systemd as PID 1", &|v| v == "systemd");
        expect("socket", "the agent's socket", &|v| v.starts_with("yes"));
        expect("active", "enforcer.service active", &|v| v == "active");
        expect("delegate", "Delegate=yes", &|v| v == "yes");
        let agent = self.get("agent-cgroup").unwrap_or_default().to_owned();
        expect("agent-cgroup", &format!("in {UNIT_CGROUP}"), &|v| {
            in_unit_subtree(v) || v == UNIT_CGROUP
        });
        for who in ["root", "user"] {
            expect(&format!("{who}-rc"), "exit 0", &|v| v == "0");
            expect(
                &format!("{who}-cgroup"),
                &format!("a job cgroup below {UNIT_CGROUP}, apart from the agent's"),
                &|v| in_unit_subtree(v) && v != agent,
            );
            expect(
                &format!("{who}-memory.max"),
                &format!("{JOB_MEMORY_MAX} (--memory 100M)"),
                &|v| v == JOB_MEMORY_MAX,
            );
        }
        expect("user-uid", &format!("uid {USER_UID}"), &|v| v == USER_UID);
        expect("active-after", "enforcer.service still active", &|v| {
            v == "active"
        });
        expect("done", "the check to finish", &|_| true);
        out
    }
}

fn in_unit_subtree(cgroup: &str) -> bool {
    cgroup
        .strip_prefix(UNIT_CGROUP)
        .is_some_and(|rest| rest.starts_with('/') && rest.len() > 1)
}

struct Run {
    check: Check,
    seconds: f64,
    /// Why the run failed beyond what the check reported (timeout, exit).
    problems: Vec<String>,
}

impl Run {
    fn failures(&self) -> Vec<String> {
        let mut out = self.problems.clone();
        out.extend(self.check.failures());
        out
    }
}

fn boot(vmlinuz: &Path, initramfs: &Path, log_path: &Path, args: &VmSystemdArgs) -> Result<Run> {
    say(&format!(
        "booting {} with systemd as PID 1",
        vmlinuz.display()
    ));
    let mut log = std::io::BufWriter::new(
        std::fs::File::create(log_path)
            .with_context(|| format!("creating {}", log_path.display()))?,
    );
    let start = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        // KVM hangs on these machines: TCG only, and never -enable-kvm.
        .args(["-accel", "tcg", "-cpu", "max", "-m", "2048", "-smp", "2"])
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
        .arg("-append")
        .arg(format!(
            "console=ttyS0 panic=-1 loglevel=4 mitigations=off \
             rdinit=/lib/systemd/systemd systemd.show_status=1 {}",
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
    let mut check = Check::default();
    let mut problems = Vec::new();
    let mut done_at: Option<Instant> = None;
    loop {
        let limit = match done_at {
            Some(t) => (t + POWEROFF_GRACE).min(start + args.timeout),
            None => start + args.timeout,
        };
        let now = Instant::now();
        if now >= limit {
            if done_at.is_some() && now < start + args.timeout {
                problems.push(format!(
                    "the VM did not power off within {} s after the check",
                    POWEROFF_GRACE.as_secs()
                ));
            } else {
                problems.push(format!("timed out after {} s", args.timeout.as_secs()));
            }
            child.kill().ok();
            break;
        }
        match rx.recv_timeout(limit - now) {
            Ok(line) => {
                let elapsed = start.elapsed().as_secs_f64();
                // Host-side seconds: boot timings without trusting the
                // emulated clock.
                writeln!(log, "[{elapsed:8.3}] {line}")?;
                match check.feed(&line).as_deref() {
                    Some("begin") => say(&format!(
                        "the check started after {elapsed:.1} s (multi-user.target reached)"
                    )),
                    Some("pid1") => say(&format!("PID 1 is {}", check.get("pid1").unwrap_or(""))),
                    Some("socket") => say(&format!(
                        "agent socket: {}",
                        check.get("socket").unwrap_or("")
                    )),
                    Some(key @ ("root-rc" | "user-rc")) => say(&format!(
                        "job as {}: exit {}",
                        key.trim_end_matches("-rc"),
                        check.get(key).unwrap_or("")
                    )),
                    Some("done") => {
                        say(&format!("check done after {elapsed:.1} s, powering off"));
                        done_at = Some(Instant::now());
                    }
                    _ => {}
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
        check.feed(&line);
    }
    log.flush()?;
    if problems.is_empty() && !status.success() {
        problems.push(format!("qemu exited with {status}"));
    }
    let seconds = start.elapsed().as_secs_f64();
    say(&format!(
        "VM ended after {seconds:.1} s (log: {})",
        log_path.display()
    ));
    Ok(Run {
        check,
        seconds,
        problems,
    })
}

fn report(
    series: &str,
    run: &Run,
    failures: &[String],
    log: &Path,
    result_path: &Path,
) -> Result<()> {
    let c = &run.check;
    let verdict = if failures.is_empty() { "PASS" } else { "FAIL" };
    let mut result = format!(
        "kernel\t{series}\nresult\t{verdict}\nseconds\t{:.1}\n",
        run.seconds
    );
    for (k, v) in &c.marks {
        result.push_str(&format!("{k}\t{v}\n"));
    }
    std::fs::write(result_path, &result)
        .with_context(|| format!("writing {}", result_path.display()))?;

    eprintln!();
    eprintln!(
        "=== vm-systemd, kernel {series} ({}): {verdict} in {:.1} s",
        c.get("uname").unwrap_or("release unknown"),
        run.seconds
    );
    for key in [
        "pid1",
        "systemd",
        "active",
        "agent-cgroup",
        "root-cgroup",
        "user-cgroup",
        "user-uid",
    ] {
        if let Some(v) = c.get(key) {
            eprintln!("    {key:<13} {v}");
        }
    }
    if failures.is_empty() {
        return Ok(());
    }
    eprintln!("    failures:");
    for f in failures {
        eprintln!("      - {f}");
    }
    for (key, lines) in &c.quoted {
        eprintln!("    {key}:");
        for l in tail(lines, TAIL_LINES) {
            eprintln!("    | {l}");
        }
    }
    if let Ok(text) = std::fs::read_to_string(log) {
        let lines: Vec<&str> = text.lines().collect();
        eprintln!("    console tail ({}):", log.display());
        for l in tail(&lines, TAIL_LINES) {
            eprintln!("    | {l}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSING: &str = "\
[  OK  ] Started enforcer.service - enforcer node agent
@@vmsystemd begin
@@vmsystemd pid1 systemd
@@vmsystemd uname 6.12.117+deb13-amd64
@@vmsystemd socket yes 3s
@@vmsystemd active active
@@vmsystemd delegate yes
@@vmsystemd agent-cgroup /system.slice/enforcer.service/agent
@@vmsystemd output-root | 0::/system.slice/enforcer.service/job-1/main
@@vmsystemd root-rc 0
@@vmsystemd root-cgroup /system.slice/enforcer.service/job-1/main
@@vmsystemd root-uid 65534
@@vmsystemd root-memory.max 104857600
[  OK  ] Finished foo.service@@vmsystemd user-rc 0
@@vmsystemd user-cgroup /system.slice/enforcer.service/job-2/main
@@vmsystemd user-uid 65534
@@vmsystemd user-memory.max 104857600
@@vmsystemd active-after active
@@vmsystemd done
";

    fn feed(text: &str) -> Check {
        let mut c = Check::default();
        for l in text.lines() {
            c.feed(l);
        }
        c
    }

    #[test]
    fn a_complete_check_passes_even_with_status_lines_in_front_of_markers() {
        let c = feed(PASSING);
        assert_eq!(c.failures(), Vec::<String>::new());
        assert_eq!(c.get("user-rc"), Some("0"));
        assert_eq!(
            c.quoted["output-root"],
            ["0::/system.slice/enforcer.service/job-1/main"]
        );
    }

    #[test]
    fn a_job_outside_the_delegated_subtree_fails() {
        let c = feed(&PASSING.replace(
            "user-cgroup /system.slice/enforcer.service/job-2/main",
            "user-cgroup /system.slice/enforcer-vm-check.service",
        ));
        let f = c.failures();
        assert_eq!(f.len(), 1, "{f:?}");
        assert!(f[0].starts_with("user-cgroup"), "{f:?}");
    }

    #[test]
    fn a_job_in_the_agents_own_cgroup_fails() {
        let c = feed(&PASSING.replace("job-1/main", "agent"));
        assert!(c.failures().iter().any(|f| f.starts_with("root-cgroup")));
    }

    #[test]
    fn a_check_that_never_ran_says_so() {
        let c = feed("[    1.0] Linux version 6.12\n");
        let f = c.failures();
        assert_eq!(f.len(), 1);
        assert!(f[0].contains("never ran"), "{f:?}");
    }

    #[test]
    fn a_missing_mark_is_named() {
        let c = feed(&PASSING.replace("@@vmsystemd active-after active\n", ""));
        let f = c.failures();
        assert_eq!(f.len(), 1);
        assert!(f[0].starts_with("active-after: not reported"), "{f:?}");
    }

    #[test]
    fn the_binary_is_taken_from_exec_start() {
        let unit = "[Service]\nType=exec\nExecStart=-/usr/local/bin/enforcer agent --config x\n";
        assert_eq!(exec_start_binary(unit).unwrap(), "/usr/local/bin/enforcer");
        assert!(exec_start_binary("ExecStart=enforcer agent").is_err());
        let shipped = include_str!("../../../deploy/enforcer.service");
        assert_eq!(
            exec_start_binary(shipped).unwrap(),
            format!("{}/enforcer", dist::BIN_DIR)
        );
    }
}
