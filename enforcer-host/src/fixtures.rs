//! Fake `/proc` entries and mount tables for tests, here and in the crates
//! that read the host through this one (feature `fixtures`).

use std::{fs, path::Path};

/// Writes `/proc/<pid>/{stat,status,task/<pid>}` under `root` the way
/// the kernel formats them, with the start time in field 22.
#[expect(
    clippy::too_many_arguments,
    reason = "one column per field the tests vary"
)]
pub fn fake_process(
    root: &Path,
    pid: i32,
    comm: &str,
    state: char,
    ppid: i32,
    flags: u64,
    start: u64,
    uid: u32,
) {
    let d = root.join(pid.to_string());
    fs::create_dir_all(d.join("task").join(pid.to_string())).unwrap();
    fs::write(
        d.join("stat"),
        format!(
            "{pid} ({comm}) {state} {ppid} {pid} {pid} 0 -1 {flags} {} {start} 0 0 0\n",
            "0 ".repeat(12).trim_end()
        ),
    )
    .unwrap();
    fs::write(
        d.join("status"),
        format!(
            "Name:\t{comm}\nTgid:\t{pid}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\nGid:\t{uid}\t{uid}\t{uid}\t{uid}\nCapEff:\t000001ffffffffff\n"
        ),
    )
    .unwrap();
}

/// The mount table of a hybrid host: v1 controllers and a controller-less
/// unified hierarchy.
pub const HYBRID: &str = "\
25 30 0:23 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
26 25 0:24 / /sys/fs/cgroup/unified rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate
27 25 0:25 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:5 - cgroup cgroup rw,cpu,cpuacct
28 25 0:26 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
29 25 0:27 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
30 25 0:28 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
";
