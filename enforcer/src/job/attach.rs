//! Checks before a live process is moved into a job (`enforcer attach`),
//! each refusal with a message that says why, made before any cgroup exists
//! so that a refusal leaves nothing behind.

use std::path::Path;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AttachRefused {
    #[error("no process with PID {0}")]
    NoSuchPid(i32),
    #[error("PID 1 (init) is never attached")]
    Init,
    #[error("PID {0} is a kernel thread")]
    KernelThread(i32),
    #[error("PID {0} is this enforcer itself")]
    Itself(i32),
    #[error(
        "PID {0} is an ancestor of this enforcer; attaching it would put the enforcer's supervisor chain under the job's limits"
    )]
    Ancestor(i32),
    #[error("PID {0} is the protected training process (training.pid / --protect)")]
    Training(i32),
    #[error("PID {0} exited while it was being attached")]
    ExitedMidway(i32),
}

/// `PF_KTHREAD` from `linux/sched.h`.
const PF_KTHREAD: u64 = 0x0020_0000;

/// Fields of `/proc/<pid>/stat` after the command name: (state, ppid, flags).
pub fn stat_fields(proc_root: &Path, pid: i32) -> Option<(char, i32, u64)> {
    let text = std::fs::read_to_string(proc_root.join(pid.to_string()).join("stat")).ok()?;
    // The command name is in parentheses and may contain spaces.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let state = f.first()?.chars().next()?;
    let ppid = f.get(1)?.parse().ok()?;
    let flags = f.get(6)?.parse().ok()?;
    Some((state, ppid, flags))
}

/// Refuses PIDs that must never be attached.
pub fn check(
    proc_root: &Path,
    pid: i32,
    self_pid: i32,
    training: Option<i32>,
) -> Result<(), AttachRefused> {
    if pid == 1 {
        return Err(AttachRefused::Init);
    }
    if pid == self_pid {
        return Err(AttachRefused::Itself(pid));
    }
    if training == Some(pid) {
        return Err(AttachRefused::Training(pid));
    }
    let Some((state, _ppid, flags)) = stat_fields(proc_root, pid) else {
        return Err(AttachRefused::NoSuchPid(pid));
    };
    if flags & PF_KTHREAD != 0 || pid == 2 {
        return Err(AttachRefused::KernelThread(pid));
    }
    if state == 'Z' || state == 'X' {
        return Err(AttachRefused::NoSuchPid(pid));
    }
    let mut p = self_pid;
    for _ in 0..64 {
        match stat_fields(proc_root, p) {
            Some((_, ppid, _)) if ppid > 1 => {
                if ppid == pid {
                    return Err(AttachRefused::Ancestor(pid));
                }
                p = ppid;
            }
            _ => break,
        }
    }
    Ok(())
}

/// Every live descendant of `pid` (for `--tree`), parents first.
pub fn descendants(proc_root: &Path, pid: i32) -> Vec<i32> {
    let mut children_of: std::collections::BTreeMap<i32, Vec<i32>> = Default::default();
    if let Ok(entries) = std::fs::read_dir(proc_root) {
        for e in entries.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if let Some((_, ppid, _)) = stat_fields(proc_root, p) {
                children_of.entry(ppid).or_default().push(p);
            }
        }
    }
    for v in children_of.values_mut() {
        v.sort_unstable();
    }
    let mut out = Vec::new();
    let mut queue = std::collections::VecDeque::from([pid]);
    while let Some(p) = queue.pop_front() {
        for &c in children_of.get(&p).map(Vec::as_slice).unwrap_or(&[]) {
            out.push(c);
            queue.push_back(c);
        }
    }
    out
}

/// The thread ids of `pid`.
pub fn threads(proc_root: &Path, pid: i32) -> Vec<i32> {
    let mut v: Vec<i32> = std::fs::read_dir(proc_root.join(pid.to_string()).join("task"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort_unstable();
    v
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    fn proc_entry(root: &Path, pid: i32, comm: &str, state: char, ppid: i32, flags: u64) {
        let d = root.join(pid.to_string());
        fs::create_dir_all(d.join("task").join(pid.to_string())).unwrap();
        fs::write(
            d.join("stat"),
            format!("{pid} ({comm}) {state} {ppid} {pid} {pid} 0 -1 {flags} 0 0 0 0\n"),
        )
        .unwrap();
    }

    #[test]
    fn refusals_name_the_reason() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        proc_entry(r, 2, "kthreadd", 'S', 0, PF_KTHREAD);
        proc_entry(r, 50, "kworker/0:1 x", 'I', 2, PF_KTHREAD | 0x40);
        proc_entry(r, 100, "shell", 'S', 1, 0);
        proc_entry(r, 200, "enforcer", 'S', 100, 0);
        proc_entry(r, 300, "eval (x)", 'R', 100, 0);
        proc_entry(r, 301, "zombie", 'Z', 100, 0);
        assert_eq!(check(r, 1, 200, None), Err(AttachRefused::Init));
        assert_eq!(
            check(r, 50, 200, None),
            Err(AttachRefused::KernelThread(50))
        );
        assert_eq!(check(r, 200, 200, None), Err(AttachRefused::Itself(200)));
        assert_eq!(check(r, 100, 200, None), Err(AttachRefused::Ancestor(100)));
        assert_eq!(
            check(r, 300, 200, Some(300)),
            Err(AttachRefused::Training(300))
        );
        assert_eq!(check(r, 999, 200, None), Err(AttachRefused::NoSuchPid(999)));
        assert_eq!(check(r, 301, 200, None), Err(AttachRefused::NoSuchPid(301)));
        assert_eq!(check(r, 300, 200, None), Ok(()));
        assert_eq!(descendants(r, 100), vec![200, 300, 301]);
        assert_eq!(threads(r, 300), vec![300]);
    }
}
