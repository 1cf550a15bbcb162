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
// Steal meter (see `enforcer-ebpf/src/steal.rs` for the accounting and
// `enforcer/src/probe/steal.rs` for the reader).
// ---------------------------------------------------------------------------

/// Default bound of the per-CPU wait state array; user space resizes it to
/// the number of possible CPUs before loading.
pub const MAX_CPUS: u32 = 1024;
/// How many trainings one loaded meter tracks at once: each has an index
/// in `0..MAX_TRAININGS` (its slot in the per-CPU wait state and in the
/// training counters). User space refuses (and counts) a registration
/// beyond it.
pub const MAX_TRAININGS: u32 = 8;
/// Index of the node-wide counters in the `TRAINING_TOTALS` array (events
/// that belong to no training, such as a CPU beyond `CPU_WAIT`).
pub const NODE_TOTALS: u32 = MAX_TRAININGS;
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
    /// The index of the training it belongs to (`< MAX_TRAININGS`).
    pub training: u32,
}

/// A registered training's settings, in the `TRAINING_CONF` array indexed
/// by training index; written by user space only, before the training's
/// threads are entered.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TrainingConf {
    /// Bumped at every registration of this index: per-CPU state of an
    /// older generation is stale (a removed training's) and is zeroed by
    /// the first event on that CPU that touches it.
    pub generation: u32,
    /// 1: processes forked by the training are training too (always so for
    /// a training cgroup); 0: only new threads of its thread groups.
    pub follow_children: u32,
}

/// One training's wait state on one CPU (see [`CpuWait::trainings`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TrainingWait {
    /// Threads of this training waiting runnable on this CPU's run queue.
    pub waiters: u64,
    /// ∫ waiters dt, ns (one ns per waiting thread).
    pub wait_integral_ns: u64,
    /// When `wait_integral_ns` was last advanced.
    pub last_update_ns: u64,
    /// `wait_integral_ns` when the running task was switched in.
    pub segment_start_ns: u64,
    /// The integral's growth over the segment closed by the last switch,
    /// ns: what the task switched out then is charged, when it is a job of
    /// this training.
    pub segment_waited_ns: u64,
    /// Waiting threads of this training migrated here (atomic adds; -1 for
    /// a correction), folded into `waiters` at the next switch.
    pub arrivals: u64,
    /// How many of `arrivals` this CPU has folded into `waiters`.
    pub arrivals_seen: u64,
    /// The [`TrainingConf::generation`] this state belongs to.
    pub generation: u64,
}

/// Wait state of one CPU, in the `CPU_WAIT` array indexed by CPU. Updated
/// under that CPU's run-queue lock (sched_switch, sched_wakeup and
/// sched_migrate_task all run with it held), except the arrival counters,
/// which other CPUs bump atomically when they migrate a waiting training
/// thread here.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuWait {
    /// Training threads of all trainings waiting here: the sum of the
    /// per-training `waiters`, the fast path's test.
    pub waiters: u64,
    /// 1 when some training had a waiter here since the last accounted
    /// switch, so that some integral may have grown.
    pub dirty: u64,
    /// Arrivals of all trainings (monotonic, atomic adds): the fast path's
    /// hint that some training's `arrivals` moved.
    pub arrivals: u64,
    /// `arrivals` when this CPU last folded them.
    pub arrivals_seen: u64,
    /// The index + 1 of the training whose runnable thread the running task
    /// preempted when it was switched in (0: none): a job of that training
    /// is charged a preemption at switch-out.
    pub preempted_training: u64,
    /// When the training thread running here was switched in, ktime ns; 0
    /// when the running task is not training. User space adds the slice in
    /// progress to the on-CPU time it reads.
    pub training_since_ns: u64,
    /// The index of the training that thread belongs to.
    pub running_training: u64,
    /// `bpf_ktime_get_ns` and the run queue's clock read together (at most
    /// once a second, when timestamps are the run queue's clock): how user
    /// space turns CLOCK_MONOTONIC into this CPU's clock.
    pub calibrated_ktime_ns: u64,
    pub calibrated_clock_ns: u64,
    /// Per training index.
    pub trainings: [TrainingWait; MAX_TRAININGS as usize],
}

/// A job cgroup's entry in the `JOBS` map: the job's counter slot and the
/// index of the training it is charged against.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JobRef {
    pub slot: u32,
    pub training: u32,
}

/// Cumulative per-job counters, in the per-CPU `JOB_STEAL` array indexed by
/// job slot; user space sums the CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct JobSteal {
    /// Its training's run-queue wait while a task of the job ran, ns.
    pub steal_ns: u64,
    /// Times a task of the job preempted a runnable thread of its training.
    pub preemptions: u64,
}

/// Cumulative counters of one training (and, at index [`NODE_TOTALS`], of
/// events that belong to none), in the per-CPU `TRAINING_TOTALS` array
/// indexed by training index; user space sums the CPUs, and subtracts what
/// an index had counted before its training was registered.
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
    /// Events on a CPU beyond the `CPU_WAIT` bound (overflow; node-wide).
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
    // SAFETY (all): plain `#[repr(C)]` integers (and arrays of them)
    // without padding (the u32 pairs fill 8 bytes each), every bit pattern
    // valid.
    unsafe impl aya::Pod for super::TrainingTask {}
    unsafe impl aya::Pod for super::TrainingConf {}
    unsafe impl aya::Pod for super::CpuWait {}
    unsafe impl aya::Pod for super::JobRef {}
    unsafe impl aya::Pod for super::JobSteal {}
    unsafe impl aya::Pod for super::TrainingTotals {}
}
