//! Where the cgroup hierarchies are and what is in them, read the way a
//! test needs it, and the test's own cgroups for the tests that measure a
//! process without the enforcer.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

/// `(mount point, fstype, super options)` of every cgroup and cgroup2
/// mount.
fn mounts() -> Vec<(PathBuf, String, String)> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mut r = right.split(' ');
            let (fstype, _source, opts) = (r.next()?, r.next()?, r.next().unwrap_or(""));
            let mount = left.split(' ').nth(4)?;
            matches!(fstype, "cgroup" | "cgroup2")
                .then(|| (PathBuf::from(mount), fstype.to_owned(), opts.to_owned()))
        })
        .collect()
}

/// Cgroup mount points (v1 and v2) of this system.
pub fn cgroup_mounts() -> Vec<PathBuf> {
    mounts().into_iter().map(|(m, _, _)| m).collect()
}

/// Mount point of the first cgroup filesystem of `fstype` (`cgroup` or
/// `cgroup2`) with `option` among its super options (e.g. a v1 hierarchy
/// with the `freezer` controller).
pub fn mount_of(fstype: &str, option: Option<&str>) -> Option<PathBuf> {
    mounts().into_iter().find_map(|(m, fs, opts)| {
        (fs == fstype && option.is_none_or(|o| opts.split(',').any(|x| x == o))).then_some(m)
    })
}

/// This process's cgroup path in a hierarchy, from `/proc/self/cgroup`: the
/// unified one for `None`, else the v1 hierarchy with `v1_controller`.
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

/// This process's cgroup directory in each hierarchy: the subtree an
/// enforcer it starts owns.
pub fn own_cgroups() -> Vec<PathBuf> {
    let membership = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mut out = Vec::new();
    for (mount, fstype, opts) in mounts() {
        for m in membership.lines() {
            let mut parts = m.splitn(3, ':');
            let (_, ctrls, path) = (
                parts.next(),
                parts.next().unwrap_or(""),
                parts.next().unwrap_or(""),
            );
            let matches = if fstype == "cgroup2" {
                ctrls.is_empty()
            } else {
                !ctrls.is_empty() && ctrls.split(',').all(|c| opts.split(',').any(|o| o == c))
            };
            if matches {
                out.push(mount.join(path.trim_start_matches('/')));
            }
        }
    }
    out
}

/// Every cgroup directory, anywhere in any hierarchy (to depth 12), whose
/// name passes `pick`.
fn cgroups_where(pick: impl Fn(&str) -> bool) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack: Vec<(PathBuf, u32)> = cgroup_mounts().into_iter().map(|m| (m, 0)).collect();
    while let Some((dir, depth)) = stack.pop() {
        if depth > 12 {
            continue;
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                if pick(&e.file_name().to_string_lossy()) {
                    found.push(e.path());
                }
                stack.push((e.path(), depth + 1));
            }
        }
    }
    found
}

/// Every cgroup directory named `name`, in any hierarchy.
pub fn cgroups_named(name: &str) -> Vec<PathBuf> {
    cgroups_where(|n| n == name)
}

/// The cgroups of job `name` in any hierarchy: its own and its hooks
/// cgroup `<name>.hooks`.
pub fn job_cgroups(name: &str) -> Vec<PathBuf> {
    let hooks = format!("{name}.hooks");
    cgroups_where(|n| n == name || n == hooks)
}

/// The job `name`'s directory in the hierarchy with the CPU controller:
/// the one of its cgroups that has `cpu.weight` (v2) or `cpu.shares` (v1).
pub fn job_cpu_dir(name: &str) -> Option<PathBuf> {
    job_cgroups(name)
        .into_iter()
        .filter(|d| d.file_name().is_some_and(|n| n == name))
        .find(|d| d.join("cpu.weight").exists() || d.join("cpu.shares").exists())
}

/// Panics if a cgroup of job `name` (or its hooks cgroup) is left anywhere.
pub fn assert_no_cgroup_left(name: &str) {
    let left = job_cgroups(name);
    assert!(
        left.is_empty(),
        "cgroups left behind for job {name}: {left:?}"
    );
}

/// A cgroup directory the test made itself (for tests of the library's
/// drivers and of the steal meter, which take a cgroup, not a job); removed
/// on drop. Its processes must be killed first, by their own guards.
pub struct TestCgroup(pub PathBuf);

impl TestCgroup {
    /// `hierarchy`/`own`/`name`: a child of this process's cgroup `own`.
    pub fn create(hierarchy: &Path, own: &str, name: &str) -> Self {
        let dir = hierarchy.join(own.trim_start_matches('/')).join(name);
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        TestCgroup(dir)
    }

    /// A child of this process's cgroup in the unified hierarchy (on hybrid
    /// hosts the controller-less one), named `prefix-<unique>`.
    pub fn unified(prefix: &str) -> Self {
        let mount = mount_of("cgroup2", None)
            .expect("a cgroup2 mount (the unified hierarchy on hybrid hosts)");
        let own = own_cgroup(None).expect("a v2 entry in /proc/self/cgroup");
        Self::create(&mount, &own, &crate::unique_name(prefix))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// The path as a string, for command-line arguments.
    pub fn path_str(&self) -> &str {
        self.0.to_str().expect("utf-8 cgroup path")
    }

    /// Moves `pid` into this cgroup.
    pub fn add(&self, pid: u32) {
        let f = self.0.join("cgroup.procs");
        std::fs::write(&f, pid.to_string())
            .unwrap_or_else(|e| panic!("writing {pid} to {}: {e}", f.display()));
    }

    /// `usage_usec` of its `cpu.stat` (see [`cpu_usage`]).
    pub fn cpu_usage(&self) -> Duration {
        cpu_usage(&self.0)
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // A killed task can take a moment to leave its cgroup.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.0).is_ok() || !self.0.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("could not remove {}", self.0.display());
    }
}

/// `usage_usec` of a v2 cgroup's `cpu.stat` (present without the cpu
/// controller, also in a hybrid host's controller-less unified hierarchy).
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

/// Whether `pid` is gone or a zombie (dead, waiting to be reaped).
pub fn is_dead(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rfind(')')
            .and_then(|i| s.get(i + 2..)?.chars().next())
            .is_none_or(|c| c == 'Z' || c == 'X'),
    }
}
