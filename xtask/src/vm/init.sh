#!/bin/sh
# PID 1 of the vm-test initramfs (built by `cargo xtask vm-test`, see
# xtask/src/vm/). Prepares a pure cgroup v2 system, runs `enforcer doctor`
# and every test binary in /tests as root, and reports through `@@vmtest`
# marker lines on the serial console, which the harness parses.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
/bin/busybox --install -s

mark() { echo "@@vmtest $*"; }
must() { "$@" || mark "setup-error $*"; }

must mount -t proc proc /proc
must mount -t sysfs sysfs /sys
must mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
must mount -t devpts devpts /dev/pts
must mount -t tmpfs -o mode=1777 tmpfs /dev/shm
# /tmp stays on the root filesystem (the initramfs is already a tmpfs): a
# mount over it would hide the test helpers when the workspace, and so their
# CARGO_BIN_EXE_* paths, lie under /tmp.
chmod 1777 /tmp
must mount -t tmpfs tmpfs /run
must mount -t cgroup2 cgroup2 /sys/fs/cgroup
must mount -t bpf bpf /sys/fs/bpf
must mount -t tracefs tracefs /sys/kernel/tracing
if [ -d /sys/kernel/debug ]; then
    mount -t debugfs debugfs /sys/kernel/debug || mark "note debugfs not mounted"
fi
must ip link set lo up
# BPF maps are charged to RLIMIT_MEMLOCK before 5.11.
ulimit -l unlimited || mark "note could not lift RLIMIT_MEMLOCK"

# Give the root cgroup's children the controllers the agent uses, each on its
# own so that one missing controller does not hide the others.
for c in cpu memory pids cpuset io; do
    if grep -qw "$c" /sys/fs/cgroup/cgroup.controllers; then
        echo "+$c" >/sys/fs/cgroup/cgroup.subtree_control || mark "note could not enable $c"
    fi
done

mark "uname $(uname -r)"
mark "controllers $(cat /sys/fs/cgroup/cgroup.controllers)"
mark "subtree_control $(cat /sys/fs/cgroup/cgroup.subtree_control)"
[ -e /sys/kernel/btf/vmlinux ] && mark "btf yes" || mark "btf no"

# NO_COLOR/TERM: the console log is read as text, not through a terminal.
export ENFORCER_BIN=/bin/enforcer RUST_BACKTRACE=1 HOME=/root TMPDIR=/tmp NO_COLOR=1 TERM=dumb
mkdir -p /root
cd /tmp

mark "doctor begin"
/bin/enforcer doctor --json >/tmp/doctor.json 2>/tmp/doctor.err
rc=$?
cat /tmp/doctor.json
mark "doctor stderr"
cat /tmp/doctor.err
mark "doctor end rc=$rc"

# A test that failed is run once more, alone, right after its binary: under
# TCG a timing margin can be missed once on a busy host. The harness counts
# a test that passes its rerun as passed-on-rerun (named in the summary) and
# one that fails it as failed; a binary that failed without libtest's list
# of failed tests (a crash, a hang) is not rerun.
args=$(cat /etc/vmtest/test-args 2>/dev/null)
for t in /tests/*; do
    [ -x "$t" ] || continue
    name=${t##*/}
    mark "begin $name"
    # shellcheck disable=SC2086 # the extra arguments are meant to split
    { "$t" --test-threads=1 $args 2>&1; echo $? >/tmp/rc; } | tee /tmp/out
    rc=$(cat /tmp/rc)
    mark "end $name rc=$rc"
    [ "$rc" = 0 ] && continue
    # libtest's closing list: the names indented under the last `failures:`.
    failed=$(awk '/^failures:$/ { list = ""; f = 1; next }
                  f && /^    [^ ]/ { list = list " " $1; next }
                  { f = 0 }
                  END { print list }' /tmp/out)
    for test in $failed; do
        mark "rerun-begin $name $test"
        "$t" --test-threads=1 --exact "$test" 2>&1
        mark "rerun-end $name $test rc=$?"
    done
done
mark "done"
sync
poweroff -f
