//! Types shared by the kernel programs in `enforcer-ebpf` and the agent in
//! `enforcer`. Everything here is `#[repr(C)]`, plain old data, and laid out
//! identically on both sides: the eBPF object writes these into maps and the
//! agent reads them back byte for byte.
#![no_std]

/// Per-CPU counters of the `sched_switch` self-test program: how many context
/// switches the probe saw. `enforcer doctor` loads the program, waits for a
/// few switches and reads this back to prove the probe really runs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SwitchCount {
    pub switches: u64,
}

#[cfg(feature = "user")]
// SAFETY: plain `#[repr(C)]` integers, no padding, every bit pattern valid.
unsafe impl aya::Pod for SwitchCount {}

// ---------------------------------------------------------------------------
// Steal meter (see `enforcer-ebpf/src/main.rs` for the accounting and
// `enforcer/src/probe/steal.rs` for the reader).
// ---------------------------------------------------------------------------

/// Default bound of the per-CPU wait state array; user space resizes it to
/// the number of possible CPUs before loading.
pub const MAX_CPUS: u32 = 1024;
/// Bound of the training thread overflow table (threads whose slot in
/// `TRAINING_SLOTS` is taken). A thread that fits in neither is counted in
/// [`TrainingTotals::threads_dropped`].
pub const MAX_TRAINING_THREADS: u32 = 16384;
/// Slots of the direct-mapped training thread table (index
/// `tid % TRAINING_SLOT_COUNT`): a training thread is found with one array read
/// instead of a hash lookup; only a thread whose slot another one holds goes
/// to the hash map.
pub const TRAINING_SLOT_COUNT: u32 = 16384;
/// Bound of the per-job counters (job slots).
pub const MAX_JOBS: u32 = 256;
/// Bound of the job cgroup table (cgroup id → slot): jobs and, on kernels
/// without the ancestor helper for tracing, their child cgroups.
pub const MAX_JOB_CGROUPS: u32 = 4096;
/// How many distinct cgroup depths job cgroups may sit at. A task in a child
/// cgroup of a job (a game) is matched through its ancestor at that depth.
pub const MAX_JOB_LEVELS: u32 = 4;

/// Slots of the training TGID filter, a direct-mapped table (index
/// `tgid % TGID_FILTER_SLOTS`) checked before the thread table so that the
/// switches of other tasks cost two array reads instead of two hash lookups.
/// The slot at index `TGID_FILTER_SLOTS` is a flag: non-zero when two
/// training TGIDs collided and the filter must be bypassed.
pub const TGID_FILTER_SLOTS: u32 = 4096;

/// State of a training thread in [`TrainingTask::state`].
pub const TASK_UNKNOWN: u32 = 0;
pub const TASK_SLEEPING: u32 = 1;
pub const TASK_RUNNING: u32 = 2;
pub const TASK_WAITING: u32 = 3;

/// One training thread: in its `TRAINING_SLOTS` slot, or keyed by its
/// kernel tid in the `TRAINING_TASKS` map when the slot is taken. Threads
/// seeded from user space start as [`TASK_UNKNOWN`]: their first switch-in
/// or wake-up puts them in a known state.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TrainingTask {
    pub state: u32,
    /// The CPU whose run queue it waits on (when waiting) or runs on.
    pub cpu: u32,
    /// When it started to wait (waiting) or to run (running), ktime ns.
    pub since_ns: u64,
    /// The thread's tid; 0 marks a free slot.
    pub tid: u32,
    pub _pad: u32,
}

/// Wait state of one CPU, in the `CPU_WAIT` array indexed by CPU. Updated
/// under that CPU's run-queue lock (sched_switch, sched_wakeup and
/// sched_migrate_task all run with it held), except `arrivals`, which other
/// CPUs bump atomically when they migrate a waiting training thread here.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuWait {
    /// Training threads waiting runnable on this CPU's run queue.
    pub waiters: u64,
    /// ∫ waiters dt since the probe started, ns (one ns per waiting thread).
    pub wait_integral_ns: u64,
    /// When `wait_integral_ns` was last advanced.
    pub last_update_ns: u64,
    /// `wait_integral_ns` when the running task was switched in.
    pub segment_start_ns: u64,
    /// Waiting training threads migrated here (monotonic, atomic adds).
    pub arrivals: u64,
    /// How many of `arrivals` this CPU has folded into `waiters`.
    pub arrivals_seen: u64,
    /// 1 when the running task was switched in by preempting a runnable
    /// training thread: its owner is charged a preemption at switch-out.
    pub preempted_training: u64,
    /// When the training thread running here was switched in, ktime ns; 0
    /// when the running task is not training. User space adds the slice in
    /// progress to the on-CPU time it reads.
    pub training_since_ns: u64,
    /// `bpf_ktime_get_ns` and the run queue's clock read together (at most
    /// once a second, when timestamps are the run queue's clock): how user
    /// space turns CLOCK_MONOTONIC into this CPU's clock.
    pub calibrated_ktime_ns: u64,
    pub calibrated_clock_ns: u64,
}

/// Cumulative per-job counters, in the per-CPU `JOB_STEAL` array indexed by
/// job slot; user space sums the CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct JobSteal {
    /// Training thread run-queue wait while a task of the job ran, ns.
    pub steal_ns: u64,
    /// Times a task of the job preempted a runnable training thread.
    pub preemptions: u64,
}

/// Cumulative training workload counters and overflow counters, in the
/// per-CPU `TRAINING_TOTALS` array (one slot); user space sums the CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TrainingTotals {
    /// Time training threads spent on a CPU, ns (closed at switch-out).
    pub on_cpu_ns: u64,
    /// Run-queue wait of training threads, whoever ran meanwhile, ns
    /// (per thread, enqueue to switch-in).
    pub runq_wait_ns: u64,
    /// Run-queue wait attributed to some running task through the per-CPU
    /// integral; differs from `runq_wait_ns` only by waits in flight and
    /// the time a migrated waiter is in transit between run queues.
    pub attributed_wait_ns: u64,
    /// Training threads that did not fit in `TRAINING_TASKS` (overflow).
    pub threads_dropped: u64,
    /// Events on a CPU beyond the `CPU_WAIT` bound (overflow).
    pub cpu_out_of_range: u64,
    /// A waiter count that would have gone below zero (inconsistency).
    pub waiter_underflow: u64,
    /// Training threads added by the fork hook.
    pub threads_forked: u64,
    /// Training threads removed by the exit hook.
    pub threads_exited: u64,
    /// Waiting training threads moved to another CPU's run queue.
    pub migrations: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all four): plain `#[repr(C)]` integers without padding (the
    // u32 pairs in TrainingTask fill 8 bytes each), every bit pattern valid.
    unsafe impl aya::Pod for super::TrainingTask {}
    unsafe impl aya::Pod for super::CpuWait {}
    unsafe impl aya::Pod for super::JobSteal {}
    unsafe impl aya::Pod for super::TrainingTotals {}
}
