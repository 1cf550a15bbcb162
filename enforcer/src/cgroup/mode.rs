//! Which cgroup mode this node runs, where each controller is mounted, and
//! where this process sits in each hierarchy. Read once from
//! `/proc/self/mountinfo` and `/proc/self/cgroup`.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

use serde::Serialize;

/// The three ways a Linux node mounts cgroups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupMode {
    /// Only cgroup v2, mounted at `/sys/fs/cgroup`.
    Unified,
    /// cgroup v1 controller hierarchies plus a (usually controller-less) v2
    /// hierarchy, typically at `/sys/fs/cgroup/unified`.
    Hybrid,
    /// cgroup v1 only.
    Legacy,
}

impl std::fmt::Display for CgroupMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CgroupMode::Unified => "unified",
            CgroupMode::Hybrid => "hybrid",
            CgroupMode::Legacy => "legacy",
        })
    }
}

/// Where one controller can be used by this process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ControllerInfo {
    /// `v1` or `v2`.
    pub version: u8,
    /// Mount point of the hierarchy that carries the controller.
    pub mount: PathBuf,
    /// This process's cgroup in that hierarchy, as an absolute directory.
    pub own_cgroup: PathBuf,
    /// Whether a job cgroup under `own_cgroup` can use the controller.
    pub usable: bool,
    /// Why not, when it is not usable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The cgroup layout as seen by this process.
#[derive(Debug, Clone, Serialize)]
pub struct Layout {
    pub mode: CgroupMode,
    /// Mount point of the v2 hierarchy, if any (all modes but legacy).
    pub unified_mount: Option<PathBuf>,
    /// This process's cgroup in the v2 hierarchy, as an absolute directory.
    pub unified_own: Option<PathBuf>,
    /// The controllers this node has, by name.
    pub controllers: BTreeMap<String, ControllerInfo>,
}

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no cgroup filesystem is mounted (looked in {0})")]
    NoCgroups(PathBuf),
}

/// The controllers enforcer cares about; others are listed but not required.
pub const WANTED: [&str; 4] = ["cpu", "memory", "pids", "freezer"];

impl Layout {
    /// Detects the layout of the running system for this process.
    pub fn detect() -> Result<Self, LayoutError> {
        Self::detect_from(
            Path::new("/proc/self/mountinfo"),
            Path::new("/proc/self/cgroup"),
        )
    }

    /// Detects the layout from the given `mountinfo` and `cgroup` files; the
    /// mount points they name are then read from the real filesystem.
    pub fn detect_from(mountinfo: &Path, proc_cgroup: &Path) -> Result<Self, LayoutError> {
        let read = |p: &Path| {
            fs::read_to_string(p).map_err(|source| LayoutError::Read {
                path: p.to_owned(),
                source,
            })
        };
        let mounts = parse_mountinfo(&read(mountinfo)?);
        let membership = parse_proc_cgroup(&read(proc_cgroup)?);

        let unified_mount = mounts
            .iter()
            .find(|m| m.fstype == "cgroup2")
            .map(|m| m.mount_point.clone());
        let v1: Vec<&Mount> = mounts.iter().filter(|m| m.fstype == "cgroup").collect();
        let mode = match (&unified_mount, v1.is_empty()) {
            (Some(_), true) => CgroupMode::Unified,
            (Some(_), false) => CgroupMode::Hybrid,
            (None, false) => CgroupMode::Legacy,
            (None, true) => return Err(LayoutError::NoCgroups(mountinfo.to_owned())),
        };

        let unified_own = unified_mount.as_ref().map(|mnt| {
            let rel = membership.get("").map(String::as_str).unwrap_or("/");
            join_cgroup(mnt, rel)
        });

        let mut controllers = BTreeMap::new();
        for m in &v1 {
            for ctrl in m.super_options.split(',').filter(|o| is_v1_controller(o)) {
                let rel = membership.get(ctrl).map(String::as_str).unwrap_or("/");
                let own = join_cgroup(&m.mount_point, rel);
                let (usable, reason) = writable_dir(&own);
                controllers.insert(
                    ctrl.to_owned(),
                    ControllerInfo {
                        version: 1,
                        mount: m.mount_point.clone(),
                        own_cgroup: own,
                        usable,
                        reason,
                    },
                );
            }
        }
        if let (Some(mnt), Some(own)) = (&unified_mount, &unified_own) {
            // In v2 a controller is usable below `own` when `own` lists it in
            // cgroup.controllers (its parent delegated it to us).
            let available = fs::read_to_string(own.join("cgroup.controllers")).unwrap_or_default();
            for ctrl in available.split_whitespace() {
                // v1 wins for a controller that is bound there: a controller
                // lives in one hierarchy at a time.
                controllers.entry(ctrl.to_owned()).or_insert_with(|| {
                    let (usable, reason) = writable_dir(own);
                    ControllerInfo {
                        version: 2,
                        mount: mnt.clone(),
                        own_cgroup: own.clone(),
                        usable,
                        reason,
                    }
                });
            }
            // v2 has the freezer built into every non-root cgroup (5.2+).
            if own.join("cgroup.freeze").exists() || mode == CgroupMode::Unified {
                controllers
                    .entry("freezer".to_owned())
                    .or_insert_with(|| ControllerInfo {
                        version: 2,
                        mount: mnt.clone(),
                        own_cgroup: own.clone(),
                        usable: true,
                        reason: None,
                    });
            }
        }
        for wanted in WANTED {
            controllers
                .entry(wanted.to_owned())
                .or_insert_with(|| ControllerInfo {
                    version: if mode == CgroupMode::Unified { 2 } else { 1 },
                    mount: unified_mount.clone().unwrap_or_default(),
                    own_cgroup: unified_own.clone().unwrap_or_default(),
                    usable: false,
                    reason: Some(format!(
                        "controller {wanted} is neither mounted as cgroup v1 nor delegated to this cgroup in v2"
                    )),
                });
        }
        Ok(Layout {
            mode,
            unified_mount,
            unified_own,
            controllers,
        })
    }

    /// Whether every controller in [`WANTED`] is usable.
    pub fn missing_controllers(&self) -> Vec<&str> {
        WANTED
            .iter()
            .copied()
            .filter(|c| !self.controllers.get(*c).is_some_and(|i| i.usable))
            .collect()
    }
}

fn is_v1_controller(option: &str) -> bool {
    matches!(
        option,
        "cpu"
            | "cpuacct"
            | "cpuset"
            | "memory"
            | "pids"
            | "freezer"
            | "devices"
            | "blkio"
            | "io"
            | "net_cls"
            | "net_prio"
            | "perf_event"
            | "hugetlb"
            | "rdma"
            | "misc"
    )
}

fn writable_dir(dir: &Path) -> (bool, Option<String>) {
    match nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK) {
        Ok(()) => (true, None),
        Err(e) => (
            false,
            Some(format!("{} is not writable: {e}", dir.display())),
        ),
    }
}

fn join_cgroup(mount: &Path, rel: &str) -> PathBuf {
    mount.join(rel.trim_start_matches('/'))
}

#[derive(Debug)]
struct Mount {
    mount_point: PathBuf,
    fstype: String,
    super_options: String,
}

/// Parses `/proc/self/mountinfo` (see proc(5)): the fields after the ` - `
/// separator are the filesystem type, the source and the super options.
fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split(' ').nth(4)?;
            let mut right = right.split(' ');
            let fstype = right.next()?;
            let _source = right.next();
            let super_options = right.next().unwrap_or("");
            Some(Mount {
                mount_point: PathBuf::from(unescape_octal(mount_point)),
                fstype: fstype.to_owned(),
                super_options: super_options.to_owned(),
            })
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 4 <= bytes.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v as char);
            i += 4;
            continue;
        }
        out.push(bytes[i] as char);
        i += 1;
    }
    out
}

/// Parses `/proc/<pid>/cgroup` into controller → path. The v2 entry
/// (`0::/path`) is stored under the empty name; a v1 line naming several
/// controllers (`4:cpu,cpuacct:/x`) yields one entry per controller.
pub(crate) fn parse_proc_cgroup(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_id, ctrls, path) = match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), Some(c)) => (a, b, c),
            _ => continue,
        };
        if ctrls.is_empty() {
            out.insert(String::new(), path.to_owned());
        } else {
            for c in ctrls.split(',') {
                out.insert(c.to_owned(), path.to_owned());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID_MOUNTINFO: &str = "\
25 30 0:23 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
26 25 0:24 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw
27 25 0:25 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
28 25 0:26 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
29 25 0:27 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
";

    #[test]
    fn mountinfo_yields_fstype_and_controllers() {
        let mounts = parse_mountinfo(HYBRID_MOUNTINFO);
        assert_eq!(mounts.len(), 5);
        assert_eq!(mounts[1].fstype, "cgroup2");
        assert_eq!(mounts[2].super_options, "rw,cpu");
        assert_eq!(mounts[2].mount_point, PathBuf::from("/sys/fs/cgroup/cpu"));
    }

    #[test]
    fn proc_cgroup_splits_comma_joined_v1_controllers_and_keeps_v2_path() {
        let m = parse_proc_cgroup("4:cpu,cpuacct:/a/b\n0::/user.slice/x.scope\n1:name=systemd:/\n");
        assert_eq!(m["cpu"], "/a/b");
        assert_eq!(m["cpuacct"], "/a/b");
        assert_eq!(m[""], "/user.slice/x.scope");
        assert_eq!(m["name=systemd"], "/");
    }

    #[test]
    fn hybrid_mount_set_is_detected_as_hybrid_with_v1_controllers() {
        let dir = tempfile::tempdir().unwrap();
        let mi = dir.path().join("mountinfo");
        let pc = dir.path().join("cgroup");
        fs::write(&mi, HYBRID_MOUNTINFO).unwrap();
        fs::write(&pc, "4:memory:/job\n3:cpu:/\n0::/\n").unwrap();
        let layout = Layout::detect_from(&mi, &pc).unwrap();
        assert_eq!(layout.mode, CgroupMode::Hybrid);
        assert_eq!(layout.controllers["cpu"].version, 1);
        assert_eq!(
            layout.controllers["memory"].own_cgroup,
            PathBuf::from("/sys/fs/cgroup/memory/job")
        );
        assert_eq!(
            layout.unified_mount,
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn no_cgroup_mount_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mi = dir.path().join("mountinfo");
        let pc = dir.path().join("cgroup");
        fs::write(&mi, "25 30 0:23 / / rw - ext4 /dev/vda rw\n").unwrap();
        fs::write(&pc, "0::/\n").unwrap();
        let err = Layout::detect_from(&mi, &pc).unwrap_err();
        assert!(err.to_string().contains("mountinfo"), "{err}");
    }
}
