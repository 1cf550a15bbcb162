//! Reading and writing cgroupfs files, confined to the subtree the agent
//! owns. Every write, mkdir and rmdir goes through [`CgFs`], which refuses a
//! path outside its owned roots, so "never write outside the subtree" is a
//! property of one function rather than of every caller.
//!
//! `cgroups-rs` is not used for the writes: it creates a cgroup in every
//! mounted hierarchy relative to the hierarchy root, while this agent must
//! create only below the cgroup it was started in, which differs per
//! hierarchy on a hybrid host (e.g. cpu `/` but memory `/process_api/<id>`),
//! and it has no notion of a write guard. The files are few and plain.

use std::{
    collections::BTreeMap,
    fs,
    io::{self, Write},
    path::{Path, PathBuf},
    sync::Arc,
};

use super::CgroupError;

/// In a build with the `test-audit` feature, setting this variable to a file
/// path makes every cgroupfs write, mkdir and rmdir append a line
/// `<op> <path>` there: the root integration tests use it to prove nothing
/// is written outside the subtree. Other builds ignore it, so the
/// environment of a root process never names a file it appends to.
pub const AUDIT_ENV: &str = "ENFORCER_AUDIT_CGROUP_WRITES";

/// Appends `line` to the audit file: created 0600, never through a link.
#[cfg(any(test, feature = "test-audit"))]
fn append_audit_line(file: &Path, line: &str) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(file)?
        .write_all(line.as_bytes())
}

/// How long removing a cgroup waits for zombies of its tasks to be reaped.
pub const RMDIR_BUSY_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// A handle on cgroupfs that can only modify paths below its owned roots.
#[derive(Debug, Clone)]
pub struct CgFs {
    owned: Arc<[PathBuf]>,
}

impl CgFs {
    pub fn new(owned: Vec<PathBuf>) -> Self {
        CgFs {
            owned: owned.into(),
        }
    }

    pub fn owned(&self) -> &[PathBuf] {
        &self.owned
    }

    /// Whether `path` is inside the owned roots (lexically: job names are
    /// validated to one path component, and a path with `..` is never
    /// inside).
    pub fn contains(&self, path: &Path) -> bool {
        path.components()
            .all(|c| c != std::path::Component::ParentDir)
            && self.owned.iter().any(|root| path.starts_with(root))
    }

    fn check(&self, path: &Path, value: &str) -> Result<(), CgroupError> {
        if self.contains(path) {
            Ok(())
        } else {
            Err(CgroupError::OutsideSubtree {
                path: path.to_owned(),
                value: value.to_owned(),
                owned: self.owned.to_vec(),
            })
        }
    }

    #[cfg(feature = "test-audit")]
    fn audit(op: &str, path: &Path) {
        if let Some(file) = std::env::var_os(AUDIT_ENV) {
            let _ = append_audit_line(Path::new(&file), &format!("{op} {}\n", path.display()));
        }
    }

    #[cfg(not(feature = "test-audit"))]
    fn audit(_op: &str, _path: &Path) {}

    /// Writes `value` to `path` (one `write(2)`, as cgroupfs wants).
    pub fn write(&self, path: &Path, value: &str) -> Result<(), CgroupError> {
        self.check(path, value)?;
        Self::audit("write", path);
        let wrap = |source| CgroupError::Write {
            path: path.to_owned(),
            value: value.to_owned(),
            source,
        };
        // O_TRUNC is what `echo v > file` does; cgroupfs accepts it.
        let mut f = fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(path)
            .map_err(wrap)?;
        f.write_all(value.as_bytes()).map_err(wrap)
    }

    /// Creates the directory `path`; `Ok(false)` when it already existed.
    pub fn mkdir(&self, path: &Path) -> Result<bool, CgroupError> {
        self.check(path, "")?;
        Self::audit("mkdir", path);
        match fs::create_dir(path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(source) => Err(CgroupError::Create {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// Removes the (cgroup) directory `path`; a missing one is fine.
    pub fn rmdir(&self, path: &Path) -> Result<(), CgroupError> {
        self.check(path, "")?;
        Self::audit("rmdir", path);
        // EBUSY while a killed task is still a zombie: the kernel unlinks
        // it from its cgroup only when its parent reaps it. Retry briefly.
        let start = std::time::Instant::now();
        loop {
            match fs::remove_dir(path) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e)
                    if e.raw_os_error() == Some(libc::EBUSY)
                        && start.elapsed() < RMDIR_BUSY_WAIT =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(source) => {
                    return Err(CgroupError::Remove {
                        path: path.to_owned(),
                        source,
                    });
                }
            }
        }
    }
}

pub fn read(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Reads a single number; `max` (v2) and `-1` (v1) read as `u64::MAX`.
pub fn read_u64(path: &Path) -> Result<u64, CgroupError> {
    let text = read(path)?;
    let t = text.trim();
    if t == "max" || t == "-1" {
        return Ok(u64::MAX);
    }
    t.parse().map_err(|_| CgroupError::Parse {
        path: path.to_owned(),
        content: t.to_owned(),
    })
}

/// Reads a flat-keyed file (`key value` per line: `cpu.stat`,
/// `memory.events`, `memory.oom_control`, ...).
pub fn read_keyed(path: &Path) -> Result<BTreeMap<String, u64>, CgroupError> {
    Ok(read(path)?
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let k = it.next()?;
            let v = it.next()?.parse().ok()?;
            Some((k.to_owned(), v))
        })
        .collect())
}

/// The PIDs listed in `cgroup.procs` of `dir` and all its descendants.
pub fn procs_recursive(dir: &Path) -> Vec<i32> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        if let Ok(text) = fs::read_to_string(d.join("cgroup.procs")) {
            out.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
        if let Ok(entries) = fs::read_dir(&d) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// A counter that some kernels keep in the cgroup where the event happened
/// (the `main` leaf or a game) and others propagate to ancestors: the
/// larger of `dir`'s own value and the sum over its descendants, so it is
/// counted once either way. `None` when no cgroup has the file.
pub fn subtree_counter(dir: &Path, file: &str, key: &str) -> Option<u64> {
    let read = |d: &Path| {
        read_keyed(&d.join(file))
            .ok()
            .and_then(|m| m.get(key).copied())
    };
    let own = read(dir);
    let mut below: Option<u64> = None;
    let mut stack: Vec<PathBuf> = subdirs(dir);
    while let Some(d) = stack.pop() {
        if let Some(n) = read(&d) {
            *below.get_or_insert(0) += n;
        }
        stack.extend(subdirs(&d));
    }
    match (own, below) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// Removes `dir` and its descendant cgroups, deepest first.
pub fn rmdir_recursive(fs_: &CgFs, dir: &Path) -> Result<(), CgroupError> {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                rmdir_recursive(fs_, &e.path())?;
            }
        }
    }
    fs_.rmdir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_outside_the_owned_roots_are_refused_with_path_and_value() {
        let dir = tempfile::tempdir().unwrap();
        let owned = dir.path().join("own");
        fs::create_dir(&owned).unwrap();
        fs::write(dir.path().join("memory.max"), "max").unwrap();
        let cg = CgFs::new(vec![owned.clone()]);
        let e = cg
            .write(&dir.path().join("memory.max"), "1048576")
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("memory.max") && msg.contains("1048576"),
            "{msg}"
        );
        assert_eq!(
            fs::read_to_string(dir.path().join("memory.max")).unwrap(),
            "max"
        );
        assert!(cg.write(&owned.join("../memory.max"), "1").is_err());
        assert!(cg.mkdir(&dir.path().join("sibling")).is_err());
        assert!(cg.mkdir(&owned.join("job")).unwrap());
        assert!(!cg.mkdir(&owned.join("job")).unwrap());
    }

    #[test]
    fn write_error_names_path_and_value() {
        let dir = tempfile::tempdir().unwrap();
        let cg = CgFs::new(vec![dir.path().to_owned()]);
        let e = cg
            .write(&dir.path().join("nope/cpu.max"), "50000 100000")
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("nope/cpu.max") && msg.contains("50000 100000"),
            "{msg}"
        );
    }

    #[test]
    fn keyed_and_numeric_files_parse_max_and_minus_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        fs::write(&p, "max\n").unwrap();
        assert_eq!(read_u64(&p).unwrap(), u64::MAX);
        fs::write(&p, "-1\n").unwrap();
        assert_eq!(read_u64(&p).unwrap(), u64::MAX);
        fs::write(&p, "usage_usec 42\nthrottled_usec 7\n").unwrap();
        let m = read_keyed(&p).unwrap();
        assert_eq!(m["usage_usec"], 42);
        assert_eq!(m["throttled_usec"], 7);
    }

    #[test]
    fn the_audit_file_is_created_0600_and_never_through_a_link() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("audit.log");
        append_audit_line(&log, "write /a\n").unwrap();
        append_audit_line(&log, "write /b\n").unwrap();
        assert_eq!(fs::read_to_string(&log).unwrap(), "write /a\nwrite /b\n");
        assert_eq!(
            fs::metadata(&log).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let victim = dir.path().join("victim");
        fs::write(&victim, "root's\n").unwrap();
        let link = dir.path().join("link.log");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let e = append_audit_line(&link, "write /c\n").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP), "{e}");
        assert_eq!(fs::read_to_string(&victim).unwrap(), "root's\n");
    }

    /// Set by [`the_audit_variable_works_only_in_test_audit_builds`] for
    /// the copy of this test binary it runs.
    const AUDIT_CHILD: &str = "ENFORCER_AUDIT_TEST_CHILD";

    /// Not a test of its own: one cgroupfs write in a child process whose
    /// environment names an audit file.
    #[test]
    fn audit_child_writes_one_cgroup_file() {
        let Some(dir) = std::env::var_os(AUDIT_CHILD) else {
            return;
        };
        let dir = PathBuf::from(dir);
        let cg = CgFs::new(vec![dir.clone()]);
        cg.write(&dir.join("cpu.max"), "max").unwrap();
    }

    #[test]
    fn the_audit_variable_works_only_in_test_audit_builds() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("audit.log");
        fs::write(dir.path().join("cpu.max"), "").unwrap();
        // A child process: the environment is the process's, shared with
        // every test thread here.
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "cgroup::fs::tests::audit_child_writes_one_cgroup_file",
            ])
            .env(AUDIT_CHILD, dir.path())
            .env(AUDIT_ENV, &log)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        assert_eq!(
            fs::read_to_string(dir.path().join("cpu.max")).unwrap(),
            "max",
            "the child did not write: {out:?}"
        );
        if cfg!(feature = "test-audit") {
            let text = fs::read_to_string(&log).unwrap();
            assert!(
                text.starts_with("write ") && text.contains("cpu.max"),
                "{text}"
            );
        } else {
            assert!(
                !log.exists(),
                "a build without the test-audit feature appended to {}",
                log.display()
            );
        }
    }
}
