#!/bin/sh
# The check of `cargo xtask vm-systemd` (see xtask/src/vm/systemd.rs), run by
# enforcer-vm-check.service once enforcer.service has started: jobs submitted
# through the agent's socket, by root and by an unprivileged user, must run
# in the unit's delegated cgroup subtree under their limits. Reports through
# `@@vmsystemd KEY VALUE` lines on the serial console, which the harness
# judges; the unit powers the VM off when this script ends.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export NO_COLOR=1 TERM=dumb
mark() { echo "@@vmsystemd $*"; }
# Prefixes every line of stdin with a marker, so the harness can show it.
quote() { sed "s/^/@@vmsystemd $1 | /"; }

mark "begin"
mark "pid1 $(cat /proc/1/comm)"
mark "uname $(uname -r)"
mark "systemd $(systemctl --version | sed -n 1p)"
mark "controllers $(cat /sys/fs/cgroup/cgroup.controllers)"

# Type=exec: the unit counts as started once the agent is executed, which is
# before its socket exists.
socket=/run/enforcer/enforcer.sock
waited=0
while [ ! -S "$socket" ] && [ "$waited" -lt 120 ]; do
    sleep 1
    waited=$((waited + 1))
done
if [ -S "$socket" ]; then mark "socket yes ${waited}s"; else mark "socket no ${waited}s"; fi
mark "active $(systemctl is-active enforcer.service)"
mark "delegate $(systemctl show -P Delegate enforcer.service)"
agent=$(systemctl show -P MainPID enforcer.service)
mark "agent-cgroup $(sed -n 's/^0:://p' "/proc/$agent/cgroup" 2>/dev/null)"

# The job prints its cgroup (as /proc/self/cgroup), its uid and the memory
# limit of its job cgroup (the parent of the leaf it runs in).
# shellcheck disable=SC2016 # expanded by the job's shell
job_script='cat /proc/self/cgroup; echo "uid $(id -u)"
cg=$(sed -n "s/^0:://p" /proc/self/cgroup)
echo "memory.max $(cat "/sys/fs/cgroup${cg%/*}/memory.max")"
sleep 1'

# job WHO [PREFIX...]: runs the job through the agent, as root or under
# PREFIX (which switches user), and reports what it saw.
job() {
    who=$1
    shift
    out=/tmp/job-$who.out
    # ENFORCER_SOCKET named explicitly: without an answering agent the job
    # fails instead of running in-process, as it otherwise would for root.
    (cd /tmp && "$@" env ENFORCER_SOCKET="$socket" enforcer run --memory 100M --timeout 10s \
        -- /bin/sh -c "$job_script") >"$out" 2>&1
    rc=$?
    quote "output-$who" <"$out"
    mark "$who-rc $rc"
    mark "$who-cgroup $(sed -n 's/^0:://p' "$out" | sed -n 1p)"
    mark "$who-uid $(sed -n 's/^uid //p' "$out" | sed -n 1p)"
    mark "$who-memory.max $(sed -n 's/^memory.max //p' "$out" | sed -n 1p)"
}

job root
if command -v setpriv >/dev/null; then
    job user setpriv --reuid=65534 --regid=65534 --clear-groups
elif command -v runuser >/dev/null; then
    job user runuser -u nobody --
else
    mark "user-rc none: neither setpriv nor runuser in the rootfs"
fi

mark "active-after $(systemctl is-active enforcer.service)"
journalctl -u enforcer.service -o cat --no-pager 2>&1 | tail -n 40 | quote journal
mark "done"
