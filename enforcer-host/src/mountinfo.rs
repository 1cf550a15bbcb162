//! The mount table (`/proc/<pid>/mountinfo`, see proc(5)) and the questions
//! the agent asks it: where the cgroup hierarchies are mounted and which
//! directory a cgroup path names.

use std::{
    ffi::OsString,
    os::unix::ffi::OsStringExt,
    path::{Path, PathBuf},
};

use super::proc_cgroup::Hierarchy;

/// One mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The directory of the filesystem that is mounted here (field 4): not
    /// `/` when a subtree was bind-mounted, e.g. a container's cgroup.
    pub root: String,
    pub mount_point: PathBuf,
    pub fstype: String,
    pub source: String,
    pub super_options: String,
}

impl Mount {
    pub fn is_cgroup2(&self) -> bool {
        self.fstype == "cgroup2"
    }

    pub fn is_cgroup_v1(&self) -> bool {
        self.fstype == "cgroup"
    }

    /// The controllers a v1 hierarchy carries (named hierarchies such as
    /// `name=systemd` and mount options are left out).
    pub fn v1_controllers(&self) -> impl Iterator<Item = &str> {
        self.is_cgroup_v1()
            .then(|| {
                self.super_options
                    .split(',')
                    .filter(|o| is_v1_controller(o))
            })
            .into_iter()
            .flatten()
    }

    /// Whether this mount holds `hierarchy`.
    pub fn holds(&self, hierarchy: &Hierarchy) -> bool {
        match hierarchy {
            Hierarchy::Unified => self.is_cgroup2(),
            Hierarchy::V1(c) => {
                self.is_cgroup_v1() && self.super_options.split(',').any(|o| o == c)
            }
        }
    }
}

/// A parsed mount table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MountTable {
    mounts: Vec<Mount>,
}

impl MountTable {
    /// Lines that do not parse are skipped.
    pub fn parse(text: &str) -> Self {
        MountTable {
            mounts: text.lines().filter_map(parse_line).collect(),
        }
    }

    pub fn mounts(&self) -> &[Mount] {
        &self.mounts
    }

    /// The cgroup v2 mount (the unified one on hybrid hosts).
    pub fn cgroup2(&self) -> Option<&Mount> {
        self.mounts.iter().find(|m| m.is_cgroup2())
    }

    pub fn cgroup_v1(&self) -> impl Iterator<Item = &Mount> {
        self.mounts.iter().filter(|m| m.is_cgroup_v1())
    }

    /// The directory that the cgroup `path` (as `/proc/<pid>/cgroup` prints
    /// it) of `hierarchy` is, through the mount's root.
    pub fn dir_of(&self, hierarchy: &Hierarchy, path: &str) -> Option<PathBuf> {
        let m = self.mounts.iter().find(|m| m.holds(hierarchy))?;
        let rel = if m.root == "/" {
            path
        } else {
            path.strip_prefix(m.root.as_str())?
        };
        Some(m.mount_point.join(rel.trim_start_matches('/')))
    }

    /// The hierarchy and cgroup path (as `/proc/<pid>/cgroup` prints it)
    /// that the directory `dir` stands for: the inverse of [`Self::dir_of`],
    /// by the innermost cgroup mount that holds `dir`.
    pub fn membership_of_dir(&self, dir: &Path) -> Option<(Hierarchy, String)> {
        self.mounts
            .iter()
            .filter_map(|m| {
                let rel = dir.strip_prefix(&m.mount_point).ok()?;
                let hierarchy = if m.is_cgroup2() {
                    Hierarchy::Unified
                } else {
                    Hierarchy::V1(m.v1_controllers().next()?.to_owned())
                };
                let base = m.root.trim_end_matches('/');
                let path = format!("{base}/{}", rel.display());
                Some((m.mount_point.as_os_str().len(), (hierarchy, path)))
            })
            .max_by_key(|(len, _)| *len)
            .map(|(_, found)| found)
    }

    /// The depth of `dir` below the cgroup2 mount that holds it (the level
    /// that the kernel's `cgroup_id` ancestry uses); `dir` should already be
    /// canonical.
    pub fn v2_level(&self, dir: &Path) -> Option<u32> {
        self.mounts
            .iter()
            .filter(|m| m.is_cgroup2())
            .filter_map(|m| dir.strip_prefix(&m.mount_point).ok())
            .map(|rest| rest.components().count() as u32)
            .min()
    }
}

/// `id parent major:minor root mount-point options [optional...] - fstype
/// source super-options`. The separator cannot occur inside a field because
/// the kernel escapes spaces in paths.
fn parse_line(line: &str) -> Option<Mount> {
    let (left, right) = line.split_once(" - ")?;
    let mut left = left.split(' ');
    let root = left.nth(3)?;
    let mount_point = left.next()?;
    let mut right = right.split(' ');
    let fstype = right.next()?;
    let source = right.next().unwrap_or("");
    let super_options = right.next().unwrap_or("");
    Some(Mount {
        root: String::from_utf8_lossy(&unescape(root)).into_owned(),
        mount_point: PathBuf::from(OsString::from_vec(unescape(mount_point))),
        fstype: fstype.to_owned(),
        source: String::from_utf8_lossy(&unescape(source)).into_owned(),
        super_options: super_options.to_owned(),
    })
}

/// The kernel writes space, tab, newline and backslash in paths as `\ooo`.
fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && let Some(digits) = b.get(i + 1..i + 4)
            && digits.iter().all(|d| (b'0'..=b'7').contains(d))
        {
            let v = digits.iter().fold(0u32, |v, d| v * 8 + u32::from(d - b'0'));
            if let Ok(byte) = u8::try_from(v) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    pub(crate) use crate::fixtures::HYBRID;

    const UNIFIED: &str = "\
22 1 254:1 / / rw,relatime - ext4 /dev/vda rw
23 22 0:21 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";

    #[test]
    fn hybrid_table_has_v1_controllers_and_the_unified_mount() {
        let t = MountTable::parse(HYBRID);
        assert_eq!(t.mounts().len(), 6);
        assert_eq!(
            t.cgroup2().unwrap().mount_point,
            PathBuf::from("/sys/fs/cgroup/unified")
        );
        let ctrls: Vec<&str> = t.cgroup_v1().flat_map(Mount::v1_controllers).collect();
        assert_eq!(ctrls, ["cpu", "cpuacct", "memory", "freezer"]);
        assert_eq!(
            t.dir_of(&Hierarchy::V1("cpuacct".into()), "/eval/j"),
            Some(PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/eval/j"))
        );
        assert_eq!(
            t.membership_of_dir(Path::new("/sys/fs/cgroup/freezer/eval/j")),
            Some((Hierarchy::V1("freezer".into()), "/eval/j".into()))
        );
        // The innermost mount wins over the tmpfs above it.
        assert_eq!(
            t.membership_of_dir(Path::new("/sys/fs/cgroup/unified/a")),
            Some((Hierarchy::Unified, "/a".into()))
        );
        assert_eq!(t.v2_level(Path::new("/sys/fs/cgroup/unified/a/b")), Some(2));
    }

    #[test]
    fn unified_table_resolves_paths_at_the_mount() {
        let t = MountTable::parse(UNIFIED);
        assert_eq!(t.cgroup_v1().count(), 0);
        assert_eq!(
            t.dir_of(&Hierarchy::Unified, "/"),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(t.v2_level(Path::new("/sys/fs/cgroup")), Some(0));
        assert_eq!(t.dir_of(&Hierarchy::V1("freezer".into()), "/"), None);
    }

    #[test]
    fn escaped_names_with_spaces_are_unescaped_and_bind_mount_roots_stripped() {
        let t = MountTable::parse(
            "40 22 0:21 /kube\\040pods/x /sys/fs/cgroup\\040v2 rw - cgroup2 none\\134x rw\n\
             41 22 0:22 / /mnt/odd\\011tab\\134bs\\777 rw - ext4 /dev/x rw\n",
        );
        let m = &t.mounts()[0];
        assert_eq!(m.root, "/kube pods/x");
        assert_eq!(m.mount_point, PathBuf::from("/sys/fs/cgroup v2"));
        assert_eq!(m.source, "none\\x");
        // `\777` is not a byte: left as written.
        assert_eq!(
            t.mounts()[1].mount_point,
            PathBuf::from("/mnt/odd\ttab\\bs\\777")
        );
        assert_eq!(
            t.dir_of(&Hierarchy::Unified, "/kube pods/x/job"),
            Some(PathBuf::from("/sys/fs/cgroup v2/job"))
        );
        assert_eq!(t.dir_of(&Hierarchy::Unified, "/elsewhere"), None);
        assert_eq!(
            t.membership_of_dir(Path::new("/sys/fs/cgroup v2/job")),
            Some((Hierarchy::Unified, "/kube pods/x/job".into()))
        );
    }

    #[test]
    fn lines_without_the_separator_are_skipped() {
        assert_eq!(MountTable::parse("junk\n\n1 2 3\n").mounts().len(), 0);
    }
}
