//! Which cgroup mode this node runs, where each controller is mounted, and
//! where this process sits in each hierarchy. Read once from
//! `/proc/self/mountinfo` and `/proc/self/cgroup` through [`crate::host`].

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

use serde::Serialize;

use crate::host::{Mount, MountTable, ProcCgroup, ProcError, ProcFs};

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
    #[error(transparent)]
    Read(#[from] ProcError),
    #[error("no cgroup filesystem is mounted (looked in {0})")]
    NoCgroups(PathBuf),
}

/// The controllers enforcer cares about; others are listed but not required.
pub const WANTED: [&str; 4] = ["cpu", "memory", "pids", "freezer"];

impl Layout {
    /// Detects the layout of the running system for this process.
    pub fn detect() -> Result<Self, LayoutError> {
        Self::detect_in(&ProcFs::new())
    }

    /// Detects the layout from `proc`'s `self/mountinfo` and `self/cgroup`;
    /// the mount points they name are then read from the real filesystem.
    pub fn detect_in(proc: &ProcFs) -> Result<Self, LayoutError> {
        let mounts = proc.mountinfo()?;
        let membership = proc.self_cgroup()?;
        Self::from_tables(&mounts, &membership)
            .ok_or_else(|| LayoutError::NoCgroups(proc.root().join("self/mountinfo")))
    }

    /// `None` when no cgroup filesystem is mounted.
    fn from_tables(mounts: &MountTable, membership: &ProcCgroup) -> Option<Self> {
        let membership = membership.by_controller();
        let unified_mount = mounts.cgroup2().map(|m| m.mount_point.clone());
        let v1: Vec<&Mount> = mounts.cgroup_v1().collect();
        let mode = match (&unified_mount, v1.is_empty()) {
            (Some(_), true) => CgroupMode::Unified,
            (Some(_), false) => CgroupMode::Hybrid,
            (None, false) => CgroupMode::Legacy,
            (None, true) => return None,
        };

        let unified_own = unified_mount.as_ref().map(|mnt| {
            let rel = membership.get("").map(String::as_str).unwrap_or("/");
            join_cgroup(mnt, rel)
        });

        let mut controllers = BTreeMap::new();
        for m in &v1 {
            for ctrl in m.v1_controllers() {
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
        Some(Layout {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::fixtures::HYBRID;

    fn fake_proc(mountinfo: &str, cgroup: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("self")).unwrap();
        fs::write(dir.path().join("self/mountinfo"), mountinfo).unwrap();
        fs::write(dir.path().join("self/cgroup"), cgroup).unwrap();
        dir
    }

    #[test]
    fn hybrid_mount_set_is_detected_as_hybrid_with_v1_controllers() {
        let dir = fake_proc(HYBRID, "4:memory:/job\n3:cpu,cpuacct:/\n0::/\n");
        let layout = Layout::detect_in(&ProcFs::at(dir.path())).unwrap();
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
        assert_eq!(
            layout.unified_own,
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn unified_mount_set_is_detected_as_unified() {
        let dir = fake_proc(
            "23 22 0:21 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n",
            "0::/\n",
        );
        let layout = Layout::detect_in(&ProcFs::at(dir.path())).unwrap();
        assert_eq!(layout.mode, CgroupMode::Unified);
        assert_eq!(layout.unified_own, Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(layout.controllers["memory"].version, 2);
    }

    /// Escapes are undone byte by byte, so a mount point that is not ASCII
    /// comes out as the directory it names.
    #[test]
    fn a_mount_point_with_escapes_and_non_ascii_names_the_real_directory() {
        let dir = fake_proc(
            "23 22 0:21 / /mnt/cgroup\\040\u{e9}t\u{e9} rw - cgroup2 cgroup2 rw\n",
            "0::/job\n",
        );
        let layout = Layout::detect_in(&ProcFs::at(dir.path())).unwrap();
        assert_eq!(
            layout.unified_own,
            Some(PathBuf::from("/mnt/cgroup \u{e9}t\u{e9}/job"))
        );
    }

    #[test]
    fn no_cgroup_mount_is_an_error_naming_the_file() {
        let dir = fake_proc("25 30 0:23 / / rw - ext4 /dev/vda rw\n", "0::/\n");
        let err = Layout::detect_in(&ProcFs::at(dir.path())).unwrap_err();
        assert!(err.to_string().contains("mountinfo"), "{err}");
    }

    #[test]
    fn an_unreadable_table_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = Layout::detect_in(&ProcFs::at(dir.path())).unwrap_err();
        assert!(err.to_string().contains("self/mountinfo"), "{err}");
    }
}
