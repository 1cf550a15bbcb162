//! Helpers of the duty-cycle root tests: the test's own cgroups (removed on
//! drop), a CPU burner (killed on drop), and where the hierarchies are.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

/// This process's cgroup path in a hierarchy, from `/proc/self/cgroup`.
pub fn own_cgroup(v1_controller: Option<&str>) -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines().find_map(|l| {
        let mut p = l.splitn(3, ':');
        let (id, ctrls, path) = (p.next()?, p.next()?, p.next()?);
        let hit = match v1_controller {
            None => id == "0" && ctrls.is_empty(),
            Some(c) => ctrls.split(',').any(|x| x == c),
        };
        hit.then(|| path.to_owned())
    })
}

/// Mount point of the first filesystem of `fstype` with `option` among its
/// super options (e.g. a v1 hierarchy with the `freezer` controller).
pub fn mount_of(fstype: &str, option: Option<&str>) -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let mut r = right.split(' ');
        let (fs, _src, opts) = (r.next()?, r.next()?, r.next().unwrap_or(""));
        let mount_point = left.split(' ').nth(4)?;
        (fs == fstype && option.is_none_or(|o| opts.split(',').any(|x| x == o)))
            .then(|| PathBuf::from(mount_point))
    })
}

/// A cgroup directory this test created; removed on drop.
pub struct TestCgroup(pub PathBuf);

impl TestCgroup {
    pub fn create(hierarchy: &Path, own: &str, name: &str) -> Self {
        let dir = hierarchy.join(own.trim_start_matches('/')).join(name);
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        TestCgroup(dir)
    }

    pub fn add(&self, pid: u32) {
        let f = self.0.join("cgroup.procs");
        std::fs::write(&f, pid.to_string())
            .unwrap_or_else(|e| panic!("writing {pid} to {}: {e}", f.display()));
    }
}

/// `usage_usec` of a v2 cgroup's `cpu.stat` (present without the cpu
/// controller, also in the host's controller-less unified hierarchy).
pub fn cpu_usage(dir: &Path) -> Duration {
    let f = dir.join("cpu.stat");
    let text = std::fs::read_to_string(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
    let usec = text
        .lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no usage_usec in {}: {text}", f.display()));
    Duration::from_micros(usec)
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // The burner is killed first (see Burner); a dying task can take a
        // moment to leave.
        for _ in 0..50 {
            match std::fs::remove_dir(&self.0) {
                Ok(()) => return,
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        eprintln!("could not remove {}", self.0.display());
    }
}

/// A busy-looping shell, killed by PID on drop.
pub struct Burner(pub Child);

impl Burner {
    pub fn start() -> Self {
        Burner(
            Command::new("/bin/sh")
                .args(["-c", "while :; do :; done"])
                .stdin(Stdio::null())
                .spawn()
                .expect("starting /bin/sh"),
        )
    }
}

impl Drop for Burner {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
