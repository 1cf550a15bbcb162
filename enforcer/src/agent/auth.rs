//! Who is on the other end of a connection (`SO_PEERCRED`, read once at
//! connect time) and what they may do. A non-root caller's jobs run as the
//! caller (uid, gid and the supplementary groups its process had when it
//! connected), with no capabilities and `no_new_privs`; it may attach only
//! its own processes, protect only its own trainings, and see or cancel
//! only its own jobs. Root may do anything and may name a `user`.

use std::{os::fd::AsFd, path::Path};

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};

use crate::{
    host::Pid,
    job::identity::{self, RunAs},
};

/// The peer of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub pid: Pid,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (from `/proc/<pid>/status` at connect time;
    /// from `/etc/group` if the process is already gone).
    pub groups: Vec<u32>,
}

/// A refusal: the message for the caller (the agent logs it with the
/// caller's uid and pid).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

impl Caller {
    /// Reads the peer's credentials from a connected Unix socket.
    pub fn of(sock: &impl AsFd) -> std::io::Result<Caller> {
        let cred = getsockopt(sock, PeerCredentials).map_err(std::io::Error::from)?;
        // Zero when the peer's pid namespace is not ours or an ancestor's.
        let pid = Pid::new(cred.pid()).ok_or_else(|| {
            std::io::Error::other("the peer's process is not visible from this pid namespace")
        })?;
        let uid = cred.uid();
        let gid = cred.gid();
        let groups = proc_groups(pid).unwrap_or_else(|| {
            identity::resolve_in(Path::new("/etc"), Some(&uid.to_string()), None)
                .ok()
                .flatten()
                .map(|r| r.groups)
                .unwrap_or_else(|| vec![gid])
        });
        Ok(Caller {
            pid,
            uid,
            gid,
            groups,
        })
    }

    pub fn is_root(&self) -> bool {
        self.uid == 0
    }

    /// The identity a non-root caller's jobs run as: the caller's own, with
    /// the name and home of its passwd entry when it has one.
    pub fn run_as(&self) -> RunAs {
        let entry = identity::resolve_in(Path::new("/etc"), Some(&self.uid.to_string()), None)
            .ok()
            .flatten();
        let mut groups = vec![self.gid];
        groups.extend(self.groups.iter().copied().filter(|&g| g != self.gid));
        RunAs {
            uid: self.uid,
            gid: self.gid,
            groups,
            name: entry.as_ref().and_then(|e| e.name.clone()),
            home: entry.and_then(|e| e.home),
        }
    }

    /// Config `allowed_groups`: when set, a non-root caller must be in one
    /// (by number, or by name through `/etc/group`).
    pub fn check_allowed(&self, allowed: &[String]) -> Result<(), Refused> {
        if self.is_root() || allowed.is_empty() {
            return Ok(());
        }
        let group_file = std::fs::read_to_string("/etc/group").unwrap_or_default();
        let gid_of = |g: &str| -> Option<u32> {
            g.parse().ok().or_else(|| {
                group_file.lines().find_map(|l| {
                    let mut f = l.split(':');
                    (f.next()? == g).then_some(())?;
                    f.nth(1)?.parse().ok()
                })
            })
        };
        let mine = |gid: u32| gid == self.gid || self.groups.contains(&gid);
        if allowed.iter().filter_map(|g| gid_of(g)).any(mine) {
            return Ok(());
        }
        Err(Refused(format!(
            "uid {} is in none of the agent's allowed_groups {allowed:?}",
            self.uid
        )))
    }

    /// Whether the caller may see or change something `owner` started.
    pub fn owns(&self, owner: u32) -> bool {
        self.is_root() || self.uid == owner
    }
}

/// The `Groups:` line of `/proc/<pid>/status`.
fn proc_groups(pid: Pid) -> Option<Vec<u32>> {
    // The kernel writes /proc: no other user controls this read.
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_groups(&text)
}

fn parse_groups(status: &str) -> Option<Vec<u32>> {
    let line = status.lines().find(|l| l.starts_with("Groups:"))?;
    Some(
        line["Groups:".len()..]
            .split_whitespace()
            .filter_map(|g| g.parse().ok())
            .collect(),
    )
}

/// The uid of live process `pid` when its real, effective, saved and
/// filesystem uids are all that one (`Uid:` of its status).
pub fn process_uid(pid: i32) -> Option<u32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with("Uid:"))?;
    // Real, effective, saved, filesystem: a process is the caller's only
    // if every one of them is.
    let ids: Vec<u32> = line[4..]
        .split_whitespace()
        .filter_map(|g| g.parse().ok())
        .collect();
    let first = *ids.first()?;
    ids.iter().all(|&u| u == first).then_some(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_are_read_from_the_status_line() {
        let s = "Name:\tx\nUid:\t1000\t1000\t1000\t1000\nGroups:\t4 24 1000 \n";
        assert_eq!(parse_groups(s), Some(vec![4, 24, 1000]));
        assert_eq!(parse_groups("Groups:\n"), Some(vec![]));
    }

    #[test]
    fn a_non_root_caller_outside_the_allowed_groups_is_refused() {
        let c = Caller {
            pid: Pid::new(1).unwrap(),
            uid: 1000,
            gid: 1000,
            groups: vec![1000, 27],
        };
        assert!(c.check_allowed(&[]).is_ok());
        assert!(c.check_allowed(&["27".into()]).is_ok());
        let e = c.check_allowed(&["4242".into()]).unwrap_err();
        assert!(e.0.contains("allowed_groups"), "{e}");
        assert!(!c.owns(0) && c.owns(1000));
    }
}
