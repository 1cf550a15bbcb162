//! Files the root supervisor touches on behalf of processes it does not
//! trust: the training's progress file, the report a user asked for, the
//! state directory that coordinates enforcers.
//!
//! Three rules, each one function or type here so that no caller has to get
//! them right again:
//! - [`read_untrusted`]: a file someone else controls is opened without
//!   following a link at its last component and without blocking (a FIFO
//!   cannot stall the open), must be a regular file, and is read up to a cap;
//! - [`write_atomic_as_dir_owner`]: a file written into a directory another
//!   user owns is written with that user's filesystem ids (the kernel checks
//!   it as it would for them), through a fresh temporary file that is renamed
//!   over the name, so a link planted at the name is replaced, never followed;
//! - [`PrivateDir`]: root's own state lives in a directory owned by the
//!   effective user and closed to everyone else; every file in it is opened
//!   relative to the directory's descriptor, without following links.

use std::{
    ffi::CString,
    fs::File,
    io::{self, Read, Write},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::{ffi::OsStrExt, fs::MetadataExt},
    },
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::SystemTime,
};

#[derive(Debug, thiserror::Error)]
pub enum SafeFsError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is a {kind}, not a regular file: refused")]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("{path} is larger than {cap} bytes: refused")]
    TooLarge { path: PathBuf, cap: u64 },
    #[error("{path} is owned by uid {uid} with mode {mode:04o}: {need}")]
    Untrusted {
        path: PathBuf,
        uid: u32,
        mode: u32,
        need: &'static str,
    },
    #[error("{path}: {why}")]
    BadPath { path: PathBuf, why: &'static str },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SafeFsError + 'a {
    move |source| SafeFsError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

fn c_path(path: &Path) -> Result<CString, SafeFsError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| SafeFsError::BadPath {
        path: path.to_owned(),
        why: "contains a NUL byte",
    })
}

/// Checks that `name` is one plain path component (no `/`, not `.`/`..`).
fn component(dir: &Path, name: &str) -> Result<CString, SafeFsError> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        return Err(SafeFsError::BadPath {
            path: dir.join(name),
            why: "not a single file name",
        });
    }
    c_path(Path::new(name))
}

fn file_kind(mode: u32) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFREG => "regular file",
        libc::S_IFDIR => "directory",
        libc::S_IFIFO => "FIFO",
        libc::S_IFCHR => "character device",
        libc::S_IFBLK => "block device",
        libc::S_IFSOCK => "socket",
        libc::S_IFLNK => "symbolic link",
        _ => "special file",
    }
}

fn require_regular(file: &File, path: &Path) -> Result<std::fs::Metadata, SafeFsError> {
    let meta = file.metadata().map_err(io_err("inspecting", path))?;
    if !meta.file_type().is_file() {
        return Err(SafeFsError::NotRegular {
            path: path.to_owned(),
            kind: file_kind(meta.mode()),
        });
    }
    Ok(meta)
}

/// A file read on behalf of someone else.
#[derive(Debug)]
pub struct UntrustedRead {
    pub bytes: Vec<u8>,
    /// The file's modification time, from the same open file.
    pub modified: SystemTime,
}

/// Reads `path`, which another user controls, as [the module](self) says:
/// no link followed at its last component, no blocking open, regular files
/// only, at most `cap` bytes. The content is the caller's to parse; errors
/// never quote it.
pub fn read_untrusted(path: &Path, cap: u64) -> Result<UntrustedRead, SafeFsError> {
    let c = c_path(path)?;
    let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ELOOP) {
            return Err(SafeFsError::NotRegular {
                path: path.to_owned(),
                kind: "symbolic link",
            });
        }
        return Err(io_err("opening", path)(e));
    }
    // SAFETY: `fd` was just opened and is owned by nobody else.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let meta = require_regular(&file, path)?;
    if meta.len() > cap {
        return Err(SafeFsError::TooLarge {
            path: path.to_owned(),
            cap,
        });
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    // One byte past the cap tells a file that grew after the fstat.
    (&file)
        .take(cap + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err("reading", path))?;
    if bytes.len() as u64 > cap {
        return Err(SafeFsError::TooLarge {
            path: path.to_owned(),
            cap,
        });
    }
    let modified = meta.modified().map_err(io_err("inspecting", path))?;
    Ok(UntrustedRead { bytes, modified })
}

fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Writes `bytes` to `path` with `mode`, as [the module](self) says: when
/// root writes into a directory another user owns, the write is made with
/// that user's filesystem uid and the directory's gid, on a thread of its
/// own (filesystem ids are per thread), so root's privileges never apply to
/// a place that user controls. The file appears whole or not at all.
pub fn write_atomic_as_dir_owner(path: &Path, bytes: &[u8], mode: u32) -> Result<(), SafeFsError> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or(SafeFsError::BadPath {
            path: path.to_owned(),
            why: "names no file",
        })?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let c_name = component(&dir, name)?;
    let c_dir = c_path(&dir)?;
    let path = path.to_owned();
    let bytes = bytes.to_vec();
    std::thread::scope(|s| {
        s.spawn(move || write_in_dir(&dir, &c_dir, &path, &c_name, &bytes, mode))
            .join()
            .unwrap_or_else(|_| {
                Err(SafeFsError::BadPath {
                    path: PathBuf::from(name),
                    why: "the writer thread panicked",
                })
            })
    })
}

/// Distinguishes temporary files of one process.
static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

fn write_in_dir(
    dir: &Path,
    c_dir: &CString,
    path: &Path,
    c_name: &CString,
    bytes: &[u8],
    mode: u32,
) -> Result<(), SafeFsError> {
    // SAFETY: `c_dir` is a valid NUL-terminated string.
    let dfd = unsafe {
        libc::open(
            c_dir.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if dfd < 0 {
        return Err(io_err("opening directory", dir)(io::Error::last_os_error()));
    }
    // SAFETY: `dfd` was just opened and is owned by nobody else.
    let dir_fd = unsafe { OwnedFd::from_raw_fd(dfd) };
    let meta = File::from(dir_fd.try_clone().map_err(io_err("opening", dir))?)
        .metadata()
        .map_err(io_err("inspecting", dir))?;
    let as_owner = effective_uid() == 0 && meta.uid() != 0;
    if as_owner {
        // Group first: once the fsuid is not 0 the thread may lack the
        // capability. Both calls return the previous id, never an error.
        // SAFETY: plain system calls on this thread's credentials.
        unsafe {
            libc::syscall(libc::SYS_setfsgid, meta.gid());
            libc::syscall(libc::SYS_setfsuid, meta.uid());
        }
    }
    let tmp = format!(
        ".{}.{}.{}.tmp",
        c_name.to_string_lossy(),
        std::process::id(),
        TEMP_SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let c_tmp = c_path(Path::new(&tmp))?;
    let tmp_path = dir.join(&tmp);
    // SAFETY: valid fd and NUL-terminated name; mode is a plain integer.
    let fd = unsafe {
        libc::openat(
            dir_fd.as_raw_fd(),
            c_tmp.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    };
    if fd < 0 {
        // Root could have; say why it did not.
        let op = if as_owner {
            "as the directory's owner, creating"
        } else {
            "creating"
        };
        return Err(io_err(op, &tmp_path)(io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just opened and is owned by nobody else.
    let mut file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let unlink_tmp = || {
        // SAFETY: valid fd and NUL-terminated name.
        unsafe { libc::unlinkat(dir_fd.as_raw_fd(), c_tmp.as_ptr(), 0) };
    };
    if let Err(e) = file.write_all(bytes).and_then(|()| file.sync_all()) {
        unlink_tmp();
        return Err(io_err("writing", &tmp_path)(e));
    }
    drop(file);
    // SAFETY: valid fds and NUL-terminated names.
    let rc = unsafe {
        libc::renameat(
            dir_fd.as_raw_fd(),
            c_tmp.as_ptr(),
            dir_fd.as_raw_fd(),
            c_name.as_ptr(),
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        unlink_tmp();
        return Err(io_err("renaming into place", path)(e));
    }
    Ok(())
}

/// Refuses a file or directory that root relies on (a config, a hook, a
/// state directory) unless root owns it and neither its group nor others
/// may write it.
pub fn require_root_owned(path: &Path, meta: &std::fs::Metadata) -> Result<(), SafeFsError> {
    let mode = meta.mode() & 0o7777;
    if !crate::trust::trusted(meta.uid(), mode) {
        return Err(SafeFsError::Untrusted {
            path: path.to_owned(),
            uid: meta.uid(),
            mode,
            need: "must be owned by root and not writable by group or others",
        });
    }
    Ok(())
}

/// Takes an exclusive `flock(2)` on `file` without waiting: `Ok(false)`
/// when another open file holds it. Never blocks, so it is safe in async
/// code; waiting is the caller's loop.
pub fn try_lock(file: &File) -> io::Result<bool> {
    loop {
        // SAFETY: flock on a valid fd has no memory-safety preconditions.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EWOULDBLOCK) => return Ok(false),
            Some(libc::EINTR) => continue,
            _ => return Err(e),
        }
    }
}

/// Releases a lock taken with [`try_lock`] (closing the file does too).
pub fn unlock(file: &File) {
    // SAFETY: flock on a valid fd has no memory-safety preconditions.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
}

/// A directory of the enforcer's own state, owned by the effective user and
/// closed to group and others, with every file opened relative to it.
#[derive(Debug)]
pub struct PrivateDir {
    fd: OwnedFd,
    path: PathBuf,
}

impl PrivateDir {
    /// Opens the absolute directory `path`, creating it (and missing
    /// parents) with mode 0700 first when it does not exist. A directory
    /// owned by someone else, or writable by group or others, is refused;
    /// one that is merely readable by them (an older enforcer made it 0755)
    /// is closed to 0700. So is a path below a directory another user could
    /// rename or replace things in (one not owned by root or the effective
    /// user, or writable by group or others without the sticky bit).
    pub fn open(path: &Path) -> Result<Self, SafeFsError> {
        if !path.is_absolute() {
            return Err(SafeFsError::BadPath {
                path: path.to_owned(),
                why: "the state directory must be an absolute path",
            });
        }
        for above in path.ancestors().skip(1) {
            let Ok(meta) = std::fs::metadata(above) else {
                continue;
            };
            let mode = meta.mode() & 0o7777;
            let owner_ok = meta.uid() == 0 || meta.uid() == effective_uid();
            let sticky = mode & libc::S_ISVTX != 0;
            if !owner_ok || (mode & 0o022 != 0 && !sticky) {
                return Err(SafeFsError::Untrusted {
                    path: above.to_owned(),
                    uid: meta.uid(),
                    mode,
                    need: "a directory above a state directory must be owned by root (or the enforcer's user) and not writable by group or others unless sticky",
                });
            }
        }
        if !path.exists() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(path)
                .map_err(io_err("creating", path))?;
        }
        let c = c_path(path)?;
        let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: `c` is a valid NUL-terminated string.
        let fd = unsafe { libc::open(c.as_ptr(), flags) };
        Self::adopt(fd, path.to_owned())
    }

    fn adopt(fd: libc::c_int, path: PathBuf) -> Result<Self, SafeFsError> {
        if fd < 0 {
            let e = io::Error::last_os_error();
            if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)) {
                return Err(SafeFsError::BadPath {
                    path,
                    why: "is a symbolic link or not a directory: refused",
                });
            }
            return Err(io_err("opening", &path)(e));
        }
        // SAFETY: `fd` was just opened and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let file = File::from(fd);
        let meta = file.metadata().map_err(io_err("inspecting", &path))?;
        let mode = meta.mode() & 0o7777;
        if meta.uid() != effective_uid() || mode & 0o022 != 0 {
            return Err(SafeFsError::Untrusted {
                path,
                uid: meta.uid(),
                mode,
                need: "a state directory must be owned by the enforcer's user and writable by it alone",
            });
        }
        if mode & 0o077 != 0 {
            tracing::warn!(path = %path.display(), mode = format!("{mode:04o}"), "closing the state directory to group and others (mode 0700)");
            file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode & 0o700))
                .map_err(io_err("changing the mode of", &path))?;
        }
        Ok(PrivateDir {
            fd: file.into(),
            path,
        })
    }

    /// The directory's path, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The sub-directory `name`, created 0700 when missing, held to the
    /// same rules.
    pub fn subdir(&self, name: &str) -> Result<PrivateDir, SafeFsError> {
        let c = component(&self.path, name)?;
        let path = self.path.join(name);
        // SAFETY: valid fd and NUL-terminated name.
        let rc = unsafe { libc::mkdirat(self.fd.as_raw_fd(), c.as_ptr(), 0o700) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(io_err("creating", &path)(e));
            }
        }
        let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: valid fd and NUL-terminated name.
        let fd = unsafe { libc::openat(self.fd.as_raw_fd(), c.as_ptr(), flags) };
        Self::adopt(fd, path)
    }

    /// Opens `name` for reading and writing, creating it with mode 0600 when
    /// `create`; a link or anything but a regular file is refused, and one
    /// group or others could read (an older enforcer made it 0644) is closed
    /// to 0600.
    pub fn open_file(&self, name: &str, create: bool) -> Result<File, SafeFsError> {
        let c = component(&self.path, name)?;
        let path = self.path.join(name);
        let mut flags = libc::O_RDWR | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC;
        if create {
            flags |= libc::O_CREAT;
        }
        // SAFETY: valid fd and NUL-terminated name; the mode is an integer.
        let fd = unsafe {
            libc::openat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                flags,
                0o600 as libc::c_uint,
            )
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ELOOP) {
                return Err(SafeFsError::NotRegular {
                    path,
                    kind: "symbolic link",
                });
            }
            return Err(io_err("opening", &path)(e));
        }
        // SAFETY: `fd` was just opened and is owned by nobody else.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let meta = require_regular(&file, &path)?;
        if meta.mode() & 0o077 != 0 {
            file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(
                meta.mode() & 0o700,
            ))
            .map_err(io_err("changing the mode of", &path))?;
        }
        Ok(file)
    }

    /// Another handle on the same directory (a duplicated descriptor).
    pub fn try_clone(&self) -> Result<PrivateDir, SafeFsError> {
        Ok(PrivateDir {
            fd: self.fd.try_clone().map_err(io_err("opening", &self.path))?,
            path: self.path.clone(),
        })
    }

    /// Creates `name` as a new regular file, mode 0600, open for reading
    /// and writing; an existing name (file or link) is an error.
    pub fn create_new(&self, name: &str) -> Result<File, SafeFsError> {
        let c = component(&self.path, name)?;
        let flags =
            libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: valid fd and NUL-terminated name; the mode is an integer.
        let fd = unsafe {
            libc::openat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                flags,
                0o600 as libc::c_uint,
            )
        };
        if fd < 0 {
            return Err(io_err("creating", &self.path.join(name))(
                io::Error::last_os_error(),
            ));
        }
        // SAFETY: `fd` was just opened and is owned by nobody else.
        Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Renames `from` to `to` unless `to` exists: `Ok(false)` then, and
    /// `from` stays. A file made whole under a temporary name appears under
    /// its real one in one step.
    pub fn rename_noreplace(&self, from: &str, to: &str) -> Result<bool, SafeFsError> {
        let c_from = component(&self.path, from)?;
        let c_to = component(&self.path, to)?;
        // The raw call: musl has no renameat2 wrapper on every version.
        // SAFETY: valid fds and NUL-terminated names.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_renameat2,
                self.fd.as_raw_fd(),
                c_from.as_ptr(),
                self.fd.as_raw_fd(),
                c_to.as_ptr(),
                libc::RENAME_NOREPLACE,
            )
        };
        if rc == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EEXIST) {
            return Ok(false);
        }
        Err(io_err("renaming into place", &self.path.join(to))(e))
    }

    /// Whether the entry `name` is still `file` (not removed or replaced
    /// since `file` was opened): a lock taken on a file that was unlinked
    /// meanwhile locks nothing anyone else can find.
    pub fn is_entry(&self, name: &str, file: &File) -> bool {
        let Ok(c) = component(&self.path, name) else {
            return false;
        };
        let Ok(held) = file.metadata() else {
            return false;
        };
        // SAFETY: an all-zero `stat` is a valid value to be overwritten.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid fd, NUL-terminated name and a writable stat buffer.
        let rc = unsafe {
            libc::fstatat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        rc == 0 && st.st_dev == held.dev() && st.st_ino == held.ino()
    }

    /// Removes the file `name`; a missing file is not an error.
    pub fn remove_file(&self, name: &str) -> Result<(), SafeFsError> {
        let c = component(&self.path, name)?;
        // SAFETY: valid fd and NUL-terminated name.
        let rc = unsafe { libc::unlinkat(self.fd.as_raw_fd(), c.as_ptr(), 0) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENOENT) {
                return Err(io_err("removing", &self.path.join(name))(e));
            }
        }
        Ok(())
    }

    /// The names in the directory, sorted (`.` and `..` left out).
    pub fn names(&self) -> Result<Vec<String>, SafeFsError> {
        // The descriptor's own entry in /proc lists exactly this directory,
        // whatever happened to its path since it was opened.
        let via = PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()));
        let mut names: Vec<String> = std::fs::read_dir(&via)
            .map_err(io_err("listing", &self.path))?
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        Ok(names)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{PermissionsExt, symlink};

    use super::*;

    #[test]
    fn untrusted_read_refuses_links_fifos_and_big_files_without_blocking() {
        let d = tempfile::tempdir().unwrap();
        let ok = d.path().join("step");
        std::fs::write(&ok, "42\n").unwrap();
        assert_eq!(read_untrusted(&ok, 64).unwrap().bytes, b"42\n");

        let link = d.path().join("link");
        symlink("/dev/zero", &link).unwrap();
        let e = read_untrusted(&link, 64).unwrap_err();
        assert!(
            matches!(
                e,
                SafeFsError::NotRegular {
                    kind: "symbolic link",
                    ..
                }
            ),
            "{e}"
        );

        // A FIFO with no writer: a blocking open would hang this test.
        let fifo = d.path().join("fifo");
        let c = c_path(&fifo).unwrap();
        // SAFETY: valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        let e = read_untrusted(&fifo, 64).unwrap_err();
        assert!(
            matches!(e, SafeFsError::NotRegular { kind: "FIFO", .. }),
            "{e}"
        );

        let big = d.path().join("big");
        std::fs::write(&big, vec![b'7'; 100]).unwrap();
        let e = read_untrusted(&big, 64).unwrap_err();
        assert!(matches!(e, SafeFsError::TooLarge { cap: 64, .. }), "{e}");
        assert!(
            !e.to_string().contains("777"),
            "the content is never quoted: {e}"
        );
    }

    #[test]
    fn atomic_write_replaces_a_planted_link_instead_of_following_it() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, "secret").unwrap();
        let report = d.path().join("report.json");
        symlink(&victim, &report).unwrap();
        write_atomic_as_dir_owner(&report, b"{}\n", 0o644).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "secret");
        assert!(
            !std::fs::symlink_metadata(&report)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(std::fs::read_to_string(&report).unwrap(), "{}\n");
        let left: Vec<_> = std::fs::read_dir(d.path()).unwrap().flatten().collect();
        assert_eq!(left.len(), 2, "no temporary file left behind");
    }

    #[test]
    fn atomic_write_into_another_users_directory_is_made_as_that_user() {
        if effective_uid() != 0 {
            eprintln!("SKIPPED: needs root to own a directory as another user");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let theirs = d.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
        std::fs::set_permissions(&theirs, PermissionsExt::from_mode(0o755)).unwrap();
        let out = theirs.join("report.json");
        write_atomic_as_dir_owner(&out, b"{}\n", 0o644).unwrap();
        let meta = std::fs::metadata(&out).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
        // As that user, root's write into a directory only root may write
        // to is refused by the kernel.
        let sub = theirs.join("sub");
        std::fs::create_dir(&sub).unwrap();
        std::os::unix::fs::chown(&sub, Some(65534), Some(65534)).unwrap();
        std::fs::set_permissions(&sub, PermissionsExt::from_mode(0o555)).unwrap();
        let e = write_atomic_as_dir_owner(&sub.join("x"), b"x", 0o644).unwrap_err();
        assert!(e.to_string().contains("Permission denied"), "{e}");
    }

    #[test]
    fn private_dir_refuses_links_and_open_dirs_and_tightens_readable_ones() {
        let d = tempfile::tempdir().unwrap();
        let e = PrivateDir::open(Path::new("relative/state")).unwrap_err();
        assert!(e.to_string().contains("absolute"), "{e}");

        let state = d.path().join("state");
        let dir = PrivateDir::open(&state).unwrap();
        let mode = std::fs::metadata(&state).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);

        let link = d.path().join("link");
        symlink(&state, &link).unwrap();
        assert!(
            PrivateDir::open(&link).is_err(),
            "a linked state dir is refused"
        );

        let open = d.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, PermissionsExt::from_mode(0o777)).unwrap();
        let e = PrivateDir::open(&open).unwrap_err();
        assert!(e.to_string().contains("0777"), "{e}");

        // Below a directory others may write (and not sticky), refused
        // even though the directory itself would be fine.
        let shared = d.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, PermissionsExt::from_mode(0o777)).unwrap();
        let e = PrivateDir::open(&shared.join("state")).unwrap_err();
        assert!(
            e.to_string().contains("above") && e.to_string().contains("0777"),
            "{e}"
        );
        assert!(!shared.join("state").exists(), "refused before creating it");
        std::fs::set_permissions(&shared, PermissionsExt::from_mode(0o1777)).unwrap();
        PrivateDir::open(&shared.join("state")).unwrap();

        let readable = d.path().join("readable");
        std::fs::create_dir(&readable).unwrap();
        std::fs::set_permissions(&readable, PermissionsExt::from_mode(0o755)).unwrap();
        PrivateDir::open(&readable).unwrap();
        assert_eq!(std::fs::metadata(&readable).unwrap().mode() & 0o777, 0o700);

        // Files: created 0600, a planted link refused, names one component.
        let slots = dir.subdir("slots").unwrap();
        slots.open_file("counter", true).unwrap();
        let meta = std::fs::metadata(state.join("slots/counter")).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        std::fs::set_permissions(
            state.join("slots/counter"),
            PermissionsExt::from_mode(0o644),
        )
        .unwrap();
        slots.open_file("counter", false).unwrap();
        let meta = std::fs::metadata(state.join("slots/counter")).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600, "an older 0644 file is closed");
        symlink("/etc/passwd", state.join("slots/lock")).unwrap();
        let e = slots.open_file("lock", true).unwrap_err();
        assert!(matches!(e, SafeFsError::NotRegular { .. }), "{e}");
        assert!(slots.open_file("../x", true).is_err());
        assert_eq!(slots.names().unwrap(), vec!["counter", "lock"]);
        slots.remove_file("lock").unwrap();
        slots.remove_file("lock").unwrap();
        assert_eq!(slots.names().unwrap(), vec!["counter"]);
    }

    #[test]
    fn exclusive_rename_and_locks_on_replaced_entries() {
        let d = tempfile::tempdir().unwrap();
        let dir = PrivateDir::open(&d.path().join("state")).unwrap();
        let tmp = dir.create_new("a.tmp").unwrap();
        assert!(dir.create_new("a.tmp").is_err(), "create_new is exclusive");
        assert_eq!(
            std::fs::metadata(dir.path().join("a.tmp")).unwrap().mode() & 0o777,
            0o600
        );
        assert!(dir.rename_noreplace("a.tmp", "a").unwrap());
        assert!(dir.is_entry("a", &tmp));
        dir.create_new("b.tmp").unwrap();
        assert!(!dir.rename_noreplace("b.tmp", "a").unwrap(), "no replacing");
        assert!(dir.is_entry("a", &tmp), "the first file is still in place");

        // flock is per open file: a second open of the same file conflicts.
        assert!(try_lock(&tmp).unwrap());
        let other = dir.open_file("a", false).unwrap();
        assert!(!try_lock(&other).unwrap());
        unlock(&tmp);
        assert!(try_lock(&other).unwrap());

        // A lock on a file unlinked meanwhile is not the lock of its name.
        dir.remove_file("a").unwrap();
        assert!(!dir.is_entry("a", &other));
        let again = dir.create_new("a").unwrap();
        assert!(dir.is_entry("a", &again) && !dir.is_entry("a", &other));
        let clone = dir.try_clone().unwrap();
        assert_eq!(clone.names().unwrap(), vec!["a", "b.tmp"]);
    }
}
