//! Who a job's command runs as (`--user` / `--group`, config `user` /
//! `group`): resolved before the fork from `/etc/passwd` and `/etc/group`
//! (numeric ids need neither), and the switch the forked child makes after
//! it joined the job's cgroup and before `exec`.
//!
//! A job that keeps root can write its PID into any `cgroup.procs` and any
//! limit file, so it can leave its cgroup or raise its own limits. A job run
//! as another user cannot: the cgroup files stay owned by root, its
//! capabilities are all gone (bounding set included) and `no_new_privs`
//! keeps a set-user-ID binary from giving them back.

use std::path::{Path, PathBuf};

/// The identity a job's command gets.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (the primary group included).
    pub groups: Vec<u32>,
    /// The passwd entry's name and home, when there is one: the job's
    /// `USER`, `LOGNAME` and `HOME` (root's would be of no use to it).
    pub name: Option<String>,
    pub home: Option<PathBuf>,
}

impl RunAs {
    /// The environment that says who the job is.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if let Some(n) = &self.name {
            out.push(("USER".to_owned(), n.clone()));
            out.push(("LOGNAME".to_owned(), n.clone()));
        }
        if let Some(h) = &self.home {
            out.push(("HOME".to_owned(), h.display().to_string()));
        }
        out
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error(
        "--user / user = {name:?}: no such user in {passwd} (a numeric uid works without a passwd entry)"
    )]
    UnknownUser { name: String, passwd: PathBuf },
    #[error(
        "--group / group = {name:?}: no such group in {group} (a numeric gid works without a group entry)"
    )]
    UnknownGroup { name: String, group: PathBuf },
    #[error("--{key} / {key} = {value:?}: an id must be a number from 0 to 4294967294 or a name")]
    BadId { key: &'static str, value: String },
    #[error(
        "--group / group = {0:?} needs --user / user: a job that keeps root keeps every capability whatever its group"
    )]
    GroupWithoutUser(String),
}

/// The one check of `user` / `group` (flags or config): `None` when the job
/// keeps root (no user, or user 0).
pub fn check_run_as(
    user: Option<&str>,
    group: Option<&str>,
) -> Result<Option<RunAs>, IdentityError> {
    resolve_in(Path::new("/etc"), user, group)
}

/// [`check_run_as`] with the passwd and group files under `etc`.
pub fn resolve_in(
    etc: &Path,
    user: Option<&str>,
    group: Option<&str>,
) -> Result<Option<RunAs>, IdentityError> {
    let Some(user) = user else {
        return match group {
            Some(g) => Err(IdentityError::GroupWithoutUser(g.to_owned())),
            None => Ok(None),
        };
    };
    let passwd_path = etc.join("passwd");
    let group_path = etc.join("group");
    let passwd = std::fs::read_to_string(&passwd_path).unwrap_or_default();
    let groups_text = std::fs::read_to_string(&group_path).unwrap_or_default();

    let by_number = parse_id(user, "user")?;
    let entry = match by_number {
        Some(uid) => passwd_entries(&passwd).find(|e| e.uid == uid),
        None => Some(
            passwd_entries(&passwd)
                .find(|e| e.name == user)
                .ok_or_else(|| IdentityError::UnknownUser {
                    name: user.to_owned(),
                    passwd: passwd_path.clone(),
                })?,
        ),
    };
    let uid = by_number
        .or(entry.as_ref().map(|e| e.uid))
        .unwrap_or_default();
    // Without a passwd entry the primary group is the uid's own number.
    let primary = entry.as_ref().map_or(uid, |e| e.gid);
    let gid = match group {
        None => primary,
        Some(g) => match parse_id(g, "group")? {
            Some(gid) => gid,
            None => group_entries(&groups_text)
                .find(|e| e.0 == g)
                .map(|e| e.1)
                .ok_or_else(|| IdentityError::UnknownGroup {
                    name: g.to_owned(),
                    group: group_path.clone(),
                })?,
        },
    };
    if uid == 0 {
        return Ok(None);
    }
    let mut groups = vec![gid];
    // Given by name: its groups from /etc/group too; by number: the primary
    // group only.
    if by_number.is_none() {
        for (_, g, members) in group_entries(&groups_text) {
            if members.split(',').any(|m| m == user) && !groups.contains(&g) {
                groups.push(g);
            }
        }
    }
    Ok(Some(RunAs {
        uid,
        gid,
        groups,
        name: entry.as_ref().map(|e| e.name.to_owned()),
        home: entry
            .as_ref()
            .filter(|e| !e.home.is_empty())
            .map(|e| PathBuf::from(e.home)),
    }))
}

/// `Some(id)` for a number, `None` for a name; `u32::MAX` is `-1` to the
/// kernel ("leave unchanged") and is refused.
fn parse_id(value: &str, key: &'static str) -> Result<Option<u32>, IdentityError> {
    let bad = || IdentityError::BadId {
        key,
        value: value.to_owned(),
    };
    if value.is_empty() {
        return Err(bad());
    }
    if value.bytes().all(|b| b.is_ascii_digit()) {
        return match value.parse::<u32>() {
            Ok(id) if id != u32::MAX => Ok(Some(id)),
            _ => Err(bad()),
        };
    }
    if value.contains([':', '\n', ',']) {
        return Err(bad());
    }
    Ok(None)
}

struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

/// Each well-formed `/etc/passwd` line.
fn passwd_entries(text: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    text.lines().filter_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        let uid = f.nth(1)?.parse().ok()?;
        let gid = f.next()?.parse().ok()?;
        let home = f.nth(1).unwrap_or("");
        Some(PasswdEntry {
            name,
            uid,
            gid,
            home,
        })
    })
}

/// (name, gid, members) of each well-formed `/etc/group` line.
fn group_entries(text: &str) -> impl Iterator<Item = (&str, u32, &str)> {
    text.lines().filter_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        let gid = f.nth(1)?.parse().ok()?;
        let members = f.next().unwrap_or("");
        Some((name, gid, members))
    })
}

/// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit words per set.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Becomes `who` with no capability left and `no_new_privs` set. Runs in the
/// forked child before `exec`: raw system calls only (async-signal-safe; the
/// libc wrappers of the id calls synchronise threads, which a forked child
/// does not have), no allocation.
///
/// # Safety
/// Call only in a single-threaded child between fork and exec.
pub unsafe fn become_user(who: &RunAs) -> std::io::Result<()> {
    let last_err = std::io::Error::last_os_error;
    // SAFETY (whole block): each call takes plain integers or pointers to
    // memory that lives through the call.
    unsafe {
        // The bounding set first: dropping from it needs CAP_SETPCAP, which
        // the uid switch takes away.
        for cap in 0..64 {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 {
                let e = last_err();
                // Beyond the kernel's last capability.
                if e.raw_os_error() != Some(libc::EINVAL) {
                    return Err(e);
                }
            }
        }
        // With SECBIT_KEEP_CAPS the switch would keep the permitted set.
        if libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0) != 0 {
            return Err(last_err());
        }
        if libc::syscall(libc::SYS_setgroups, who.groups.len(), who.groups.as_ptr()) != 0 {
            return Err(last_err());
        }
        if libc::syscall(libc::SYS_setresgid, who.gid, who.gid, who.gid) != 0 {
            return Err(last_err());
        }
        if libc::syscall(libc::SYS_setresuid, who.uid, who.uid, who.uid) != 0 {
            return Err(last_err());
        }
        // The switch away from uid 0 cleared the permitted, effective and
        // ambient sets unless a securebit said otherwise; make it certain.
        if libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        ) != 0
        {
            let e = last_err();
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(e);
            }
        }
        let header = CapHeader {
            version: CAPABILITY_VERSION_3,
            pid: 0,
        };
        let data = [CapData {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        }; 2];
        if libc::syscall(libc::SYS_capset, &raw const header, data.as_ptr()) != 0 {
            return Err(last_err());
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(last_err());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn etc() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("passwd"),
            "root:x:0:0:root:/root:/bin/sh\neval:x:1500:1600::/home/eval:/bin/sh\nbroken line\n",
        )
        .unwrap();
        std::fs::write(
            d.path().join("group"),
            "root:x:0:\nevalgrp:x:1600:\ngpu:x:44:eval,other\naudio:x:29:other\n",
        )
        .unwrap();
        d
    }

    #[test]
    fn a_name_gets_its_primary_and_supplementary_groups() {
        let d = etc();
        let r = resolve_in(d.path(), Some("eval"), None).unwrap().unwrap();
        assert_eq!(
            r,
            RunAs {
                uid: 1500,
                gid: 1600,
                groups: vec![1600, 44],
                name: Some("eval".into()),
                home: Some("/home/eval".into()),
            }
        );
        assert_eq!(
            r.env(),
            [
                ("USER".to_owned(), "eval".to_owned()),
                ("LOGNAME".to_owned(), "eval".to_owned()),
                ("HOME".to_owned(), "/home/eval".to_owned()),
            ]
        );
        let r = resolve_in(d.path(), Some("eval"), Some("gpu"))
            .unwrap()
            .unwrap();
        assert_eq!((r.gid, r.groups), (44, vec![44]));
    }

    #[test]
    fn numbers_need_no_passwd_entry_and_get_only_the_primary_group() {
        let d = tempfile::tempdir().unwrap();
        let r = resolve_in(d.path(), Some("65534"), None).unwrap().unwrap();
        assert_eq!(
            r,
            RunAs {
                uid: 65534,
                gid: 65534,
                groups: vec![65534],
                name: None,
                home: None,
            }
        );
        assert!(r.env().is_empty());
        let d = etc();
        let r = resolve_in(d.path(), Some("1500"), Some("7"))
            .unwrap()
            .unwrap();
        assert_eq!((r.uid, r.gid, r.groups), (1500, 7, vec![7]));
        let r = resolve_in(d.path(), Some("1500"), None).unwrap().unwrap();
        assert_eq!(r.gid, 1600);
    }

    #[test]
    fn root_and_no_user_keep_root() {
        let d = etc();
        assert_eq!(resolve_in(d.path(), None, None), Ok(None));
        assert_eq!(resolve_in(d.path(), Some("root"), None), Ok(None));
        assert_eq!(resolve_in(d.path(), Some("0"), None), Ok(None));
    }

    #[test]
    fn bad_values_name_the_flag_and_the_value() {
        let d = etc();
        for (user, group, want) in [
            (Some("nosuch"), None, "no such user"),
            (Some("eval"), Some("nosuch"), "no such group"),
            (Some("4294967295"), None, "4294967295"),
            (Some("99999999999"), None, "99999999999"),
            (Some(""), None, "--user"),
            (Some("eval"), Some(""), "--group"),
            (None, Some("44"), "needs --user"),
        ] {
            let e = resolve_in(d.path(), user, group).unwrap_err().to_string();
            assert!(e.contains(want), "{user:?} {group:?}: {e}");
            if let Some(v) = user.filter(|v| !v.is_empty()) {
                assert!(e.contains(v) || group.is_some(), "{e}");
            }
        }
    }
}
