//! What root may trust: a file it reads instructions from (the config, and
//! through it the `on_event` hook it runs as root) must be owned by root and
//! not writable by group or others, and so must the directory holding it,
//! or whoever can write there can swap it.
//!
//! The file is judged on the opened descriptor (`fstat`), never by looking
//! the path up twice; its directory is the real parent of that open file
//! (read back from `/proc/self/fd`), so a symlinked file (a Kubernetes
//! ConfigMap) is judged where it really lives.
//!
//! The same rule holds for the program an `on_event` hook names by path
//! (`/usr/local/bin/notify --x`): root runs it.

use std::{
    fs::File,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::PathBuf,
};

/// Why a file or its directory is not trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{what} {path} is owned by uid {uid} with mode {mode:04o}; running as root, the enforcer \
     only uses what root owns and neither group nor others can write (chown root, chmod go-w)"
)]
pub struct Untrusted {
    /// `file` or `directory`.
    pub what: &'static str,
    pub path: PathBuf,
    pub uid: u32,
    /// The permission bits (with setuid/setgid/sticky).
    pub mode: u32,
}

pub fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Whether owner `uid` and `mode` are ones root may trust.
pub fn trusted(uid: u32, mode: u32) -> bool {
    uid == 0 && mode & 0o022 == 0
}

/// Checks the open `file` and the directory that really holds it.
pub fn check_root_owned(file: &File) -> Result<(), Untrusted> {
    let real = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).ok();
    let judge = |what, path: PathBuf, meta: std::io::Result<std::fs::Metadata>| match meta {
        Ok(m) if trusted(m.uid(), m.mode()) => Ok(()),
        Ok(m) => Err(Untrusted {
            what,
            path,
            uid: m.uid(),
            mode: m.mode() & 0o7777,
        }),
        // Unreadable metadata is not evidence of trust.
        Err(_) => Err(Untrusted {
            what,
            path,
            uid: u32::MAX,
            mode: 0,
        }),
    };
    let file_path = real.clone().unwrap_or_default();
    judge("file", file_path, file.metadata())?;
    let Some(dir) = real.as_deref().and_then(|p| p.parent()) else {
        return judge(
            "directory",
            PathBuf::new(),
            Err(std::io::ErrorKind::NotFound.into()),
        );
    };
    judge("directory", dir.to_owned(), std::fs::metadata(dir))
}

/// Checks the program a hook command starts with, when it names one by
/// path (a bare name is found through root's `PATH`; the shell is root's).
/// A path that cannot be opened is left to fail when the hook runs.
pub fn check_hook_program(command: &str) -> Result<(), Untrusted> {
    use std::os::unix::fs::OpenOptionsExt;
    let Some(program) = command
        .split_whitespace()
        .next()
        .filter(|p| p.contains('/'))
    else {
        return Ok(());
    };
    let Ok(file) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(program)
    else {
        return Ok(());
    };
    check_root_owned(&file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_root_owned_files_without_group_or_world_write_are_trusted() {
        assert!(trusted(0, 0o100644));
        assert!(trusted(0, 0o40755));
        assert!(trusted(0, 0o100600));
        assert!(!trusted(0, 0o100664), "group-writable");
        assert!(!trusted(0, 0o100646), "world-writable");
        assert!(!trusted(0, 0o41777), "no exception for sticky directories");
        assert!(!trusted(65534, 0o100644), "another user's file");
    }

    #[test]
    fn a_hook_program_named_by_path_is_judged_and_a_bare_name_is_not() {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(check_hook_program("logger -t enforcer"), Ok(()));
        assert_eq!(check_hook_program("/nonexistent/notify --x"), Ok(()));
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("notify.sh");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = check_hook_program(&format!("{} --x", script.display())).unwrap_err();
        assert_eq!((e.what, e.mode), ("file", 0o777));
        assert!(e.to_string().contains("0777"), "{e}");
    }
}
