//! The steal meter, one loaded copy for every training on the node.
//!
//! For every training thread, the time it waits runnable on a run queue is
//! split exactly among the tasks that ran on that CPU meanwhile; the part
//! during which a task of an evaluation job ran is that job's *steal*. Up to
//! `MAX_TRAININGS` trainings are tracked at once: each training thread and
//! each job carries the index of its training, and a job is charged only the
//! wait of the training it protects.
//!
//! Per CPU and per training we keep the number of that training's threads
//! waiting on the CPU's run queue (`waiters`) and the integral of that
//! number over time (`wait_integral_ns`, advanced whenever `waiters`
//! changes and at every switch). When a task is switched out, the growth of
//! each training's integral since it was switched in is exactly that
//! training's wait that happened while it ran, summed over its waiting
//! threads; a job task is charged the growth of its own training's. That
//! task is `current` at `sched_switch`, so it is classified with the
//! `current` helpers (tid, v2 cgroup id): no walk over the waiters and no
//! read of another task's cgroup are needed.
//!
//! Waits start at `sched_wakeup`/`sched_wakeup_new`, and at `sched_switch`
//! when the training thread switched out is still runnable (preempted, or
//! yielded): like bcc's runqlat, a preempted runnable task is re-enqueued at
//! that instant and its wait starts again, otherwise the time it waits after
//! preemption would be missed. Waits end when the thread is switched in.
//! `sched_migrate_task` moves a waiting thread's count from one CPU to another.
//!
//! Concurrency: the state of CPU `c` is changed by `sched_switch` on `c`, by
//! `sched_wakeup*` of a task enqueued on `c`, and by `sched_migrate_task` of a
//! task leaving `c`; the kernel runs all three with `c`'s run-queue lock held,
//! so they are serialised. The one exception is the arrival of a migrated
//! waiter at the destination CPU, whose lock is not held then: it is an atomic
//! add to that training's `arrivals` (and to the CPU's total, the fast
//! path's hint), folded into `waiters` by the destination's next switch.
//!
//! Reuse of a training index: user space bumps the index's generation
//! (`TRAINING_CONF`) when it registers a training there, after it removed
//! the old one's threads and jobs. A CPU's state of an older generation is
//! zeroed, under that CPU's lock, by the first event there that touches it,
//! so a removed training's waiters never count for the next one. (User
//! space cannot zero it: it would race with the kernel's own writes.)
//!
//! Cost: a switch between two tasks that are not training, on a CPU where no
//! training thread waits, returns after two array reads (`TGID_FILTER`)
//! without reading the clock or touching a hash map, however many trainings
//! are registered. A training thread is found in its direct-mapped slot
//! (`TRAINING_SLOTS`), one more array read; the hash map only holds threads
//! whose slot another thread has. Any other switch visits the trainings
//! (a loop of `MAX_TRAININGS`), doing work only for those with waiters or
//! arrivals on that CPU.
//!
//! Limits, all counted and reported by user space: threads seeded from /proc
//! at start are in an unknown state until their first switch (a wait already
//! in progress then is not counted); a thread table or CPU table that is full
//! counts what did not fit; a switch-in that was missed (seen as a waiting
//! thread that exits) is corrected and counted in `waiter_underflow`.
//!
//! # Portability
//!
//! Rust eBPF has no CO-RE relocations, so no `task_struct` offset is baked in
//! here: user space reads them from the running kernel's BTF and sets the
//! `TASK_*_OFFSET` globals before loading. `sched_switch` gained its
//! `prev_state` argument in 5.18, so there are two entry points and user space
//! loads the one matching the kernel's BTF prototype.

use core::intrinsics::AtomicOrdering;

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_smp_processor_id, bpf_ktime_get_ns,
        bpf_probe_read_kernel,
        generated::{bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id},
    },
    macros::{btf_tracepoint, map},
    maps::{Array, HashMap, PerCpuArray},
    programs::BtfTracePointContext,
};
use enforcer_common::{
    CpuWait, JobRef, JobSteal, MAX_CPUS, MAX_JOB_CGROUPS, MAX_JOB_LEVELS, MAX_JOBS,
    MAX_TRAINING_THREADS, MAX_TRAININGS, NODE_TOTALS, TASK_RUNNING, TASK_SLEEPING, TASK_UNKNOWN,
    TASK_WAITING, TGID_FILTER_SLOTS, TRAINING_SLOT_COUNT, TrainingConf, TrainingTask,
    TrainingTotals, TrainingWait,
};

// ---------------------------------------------------------------------------
// Configuration, set by user space at load time (read-only data).
// ---------------------------------------------------------------------------

/// Byte offset of `task_struct.pid` (the kernel tid), from BTF.
#[unsafe(no_mangle)]
static TASK_PID_OFFSET: u32 = 0;
/// Byte offset of `task_struct.tgid`, from BTF.
#[unsafe(no_mangle)]
static TASK_TGID_OFFSET: u32 = 0;
/// Byte offset of the task's CPU (`task_struct.cpu` before 5.16,
/// `task_struct.thread_info.cpu` after), from BTF.
#[unsafe(no_mangle)]
static TASK_CPU_OFFSET: u32 = 0;
/// Byte offset of `task_struct.__state` (`state` before 5.14), from BTF; only
/// the pre-5.18 `sched_switch` entry point reads it.
#[unsafe(no_mangle)]
static TASK_STATE_OFFSET: u32 = 0;
/// Timestamps are the run queue's clock (`rq->clock`, reached from a task
/// as `task->se.cfs_rq->rq->clock`), which the scheduler has just updated
/// at every event we trace: a memory read instead of a clock read (measured
/// on the development VM: `bpf_ktime_get_ns` costs ~140 ns, most of a
/// wake-up's accounting). User space refuses to load the programs on a
/// kernel whose BTF lacks one of these fields (no `CONFIG_FAIR_GROUP_SCHED`).
/// Byte offset of `task_struct.se.cfs_rq`, from BTF.
#[unsafe(no_mangle)]
static TASK_CFS_RQ_OFFSET: u32 = 0;
/// Byte offset of `cfs_rq.rq`, from BTF.
#[unsafe(no_mangle)]
static CFS_RQ_RQ_OFFSET: u32 = 0;
/// Byte offset of `rq.clock`, from BTF.
#[unsafe(no_mangle)]
static RQ_CLOCK_OFFSET: u32 = 0;

/// `TASK_DEAD` in `__state`: the state of a thread's last switch-out.
const TASK_DEAD: u32 = 0x80;

/// Calibrate the run-queue clock against `bpf_ktime_get_ns` at most this
/// often per CPU (user space converts its own clock with it).
const CALIBRATE_EVERY_NS: u64 = 1_000_000_000;

#[inline(always)]
fn config(value: &u32) -> u32 {
    // SAFETY: a plain read of an initialised static; volatile so that the
    // compiler does not fold the build-time 0 in place of the loaded value.
    unsafe { core::ptr::read_volatile(value) }
}

// ---------------------------------------------------------------------------
// Maps
// ---------------------------------------------------------------------------

/// Training threads, direct-mapped: slot `tid % TRAINING_SLOT_COUNT` holds the
/// thread whose `tid` it names (0: free), with its training's index. One
/// array read finds a training thread on the hot path. Filled by user space
/// (the threads that exist when a training is registered, and periodic
/// rescans) and by `sched_process_fork`; emptied by `sched_process_exit`
/// and by user space when it removes a training. Bound:
/// `TRAINING_SLOT_COUNT`; a thread whose slot is taken goes to
/// `TRAINING_TASKS`.
#[map]
static TRAINING_SLOTS: Array<TrainingTask> = Array::with_max_entries(TRAINING_SLOT_COUNT, 0);

/// Training threads whose slot was taken, by tid. Bound:
/// `MAX_TRAINING_THREADS`; a thread that fits nowhere is counted in
/// `threads_dropped`.
#[map]
static TRAINING_TASKS: HashMap<u32, TrainingTask> =
    HashMap::with_max_entries(MAX_TRAINING_THREADS, 0);

/// Training TGIDs (of every training), direct-mapped (`tgid %
/// TGID_FILTER_SLOTS`), plus the bypass flag at index `TGID_FILTER_SLOTS`.
/// A hit means "maybe training: look the thread up"; a miss means "not
/// training", so a switch between two other tasks with no training thread
/// waiting costs no hash lookup and no clock read. Bound:
/// `TGID_FILTER_SLOTS` + 1; a collision sets the flag (slower, never
/// wrong). Stale TGIDs only cost a lookup.
#[map]
static TGID_FILTER: Array<u32> = Array::with_max_entries(TGID_FILTER_SLOTS + 1, 0);

/// The registered trainings' settings, by training index. Bound:
/// `MAX_TRAININGS`.
#[map]
static TRAINING_CONF: Array<TrainingConf> = Array::with_max_entries(MAX_TRAININGS, 0);

/// Wait state per CPU (and within it per training). Bound: `MAX_CPUS`,
/// resized by user space to the possible CPUs; an event on a CPU beyond it
/// counts `cpu_out_of_range`.
#[map]
static CPU_WAIT: Array<CpuWait> = Array::with_max_entries(MAX_CPUS, 0);

/// Job cgroups: v2 cgroup id → job slot and training index (a job's own
/// cgroup, and on kernels without the ancestor helper its descendants too).
/// Bound: `MAX_JOB_CGROUPS`, enforced by user space when it adds them
/// (counted there, never a silent miss here).
#[map]
static JOBS: HashMap<u64, JobRef> = HashMap::with_max_entries(MAX_JOB_CGROUPS, 0);

/// Depths (in the v2 hierarchy) at which job cgroups sit, 0 = unused. A task
/// in a child cgroup of a job is matched by its ancestor at that depth.
#[map]
static JOB_LEVELS: Array<u32> = Array::with_max_entries(MAX_JOB_LEVELS, 0);

/// Per-job counters by slot, per CPU. Bound: `MAX_JOBS`.
#[map]
static JOB_STEAL: PerCpuArray<JobSteal> = PerCpuArray::with_max_entries(MAX_JOBS, 0);

/// Per-training totals and overflow counters by training index, per CPU;
/// the node-wide ones at `NODE_TOTALS`. Bound: `MAX_TRAININGS` + 1.
#[map]
static TRAINING_TOTALS: PerCpuArray<TrainingTotals> =
    PerCpuArray::with_max_entries(MAX_TRAININGS + 1, 0);

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Reads a `u32` field of a `task_struct` at a BTF-derived offset, by a
/// direct load. The offset is a global in frozen read-only data, so the
/// verifier knows its value and checks this load against the kernel's BTF
/// like any field access of a typed tp_btf argument (a fault reads 0). This
/// is several times cheaper than `bpf_probe_read_kernel` on the hot path.
#[inline(always)]
fn task_field(task: *const u8, offset: u32) -> u32 {
    // SAFETY: see above; the verifier rejects the program rather than let a
    // wrong offset through.
    unsafe { core::ptr::read_volatile(task.wrapping_add(offset as usize) as *const u32) }
}

/// The time on the run queue of `task` (see `TASK_CFS_RQ_OFFSET`), ns. `task`
/// must be a task whose run queue's lock is held and whose clock the
/// scheduler updated for this event: `next` at a switch, the woken task at a
/// wake-up, the migrating task at its source. Each CPU's wait state is only
/// ever advanced with its own run queue's clock.
///
/// A subprogram of its own: inlined into `sched_switch`, the compiler kept
/// values in registers across branches in a way the verifier, which checks
/// each path alone, saw as reading an unset register (and refused).
#[inline(never)]
fn clock_of(task: *const u8) -> u64 {
    // SAFETY: typed loads the verifier checks against the kernel's BTF
    // (pointer fields give typed pointers; a fault reads 0).
    unsafe {
        let cfs_rq = core::ptr::read_volatile(
            task.wrapping_add(config(&TASK_CFS_RQ_OFFSET) as usize) as *const *const u8,
        );
        let rq = core::ptr::read_volatile(
            cfs_rq.wrapping_add(config(&CFS_RQ_RQ_OFFSET) as usize) as *const *const u8
        );
        core::ptr::read_volatile(rq.wrapping_add(config(&RQ_CLOCK_OFFSET) as usize) as *const u64)
    }
}

/// Reads a `u32` field of a `task_struct` at a BTF-derived offset.
#[inline(always)]
fn task_u32(task: *const u8, offset: u32) -> Option<u32> {
    // SAFETY: bpf_probe_read_kernel copes with any address; a failed read is
    // an error, never a fault.
    unsafe { bpf_probe_read_kernel(task.wrapping_add(offset as usize) as *const u32).ok() }
}

/// This CPU's counters of training `index` (`NODE_TOTALS`: node-wide).
#[inline(always)]
fn totals(index: u32) -> Option<&'static mut TrainingTotals> {
    // SAFETY: this CPU's slot; a tracepoint program does not nest with
    // itself on one CPU, and the per-CPU slot is not shared.
    TRAINING_TOTALS
        .get_ptr_mut(index)
        .map(|p| unsafe { &mut *p })
}

/// Counts an event on a CPU beyond `CPU_WAIT`.
#[inline(always)]
fn cpu_out_of_range() {
    if let Some(node) = totals(NODE_TOTALS) {
        node.cpu_out_of_range += 1;
    }
}

/// Whether `tgid` may be training (see `TGID_FILTER`).
#[inline(always)]
fn maybe_training(tgid: u32) -> bool {
    if matches!(TGID_FILTER.get(TGID_FILTER_SLOTS), Some(&bypass) if bypass != 0) {
        return true;
    }
    matches!(TGID_FILTER.get(tgid % TGID_FILTER_SLOTS), Some(&slot) if slot == tgid)
}

/// The training thread `tid` of process `tgid`, if it is one.
#[inline(always)]
fn training_task(tid: u32, tgid: u32) -> Option<*mut TrainingTask> {
    if tid == 0 || !maybe_training(tgid) {
        return None;
    }
    lookup_training(tid)
}

/// The entry of training thread `tid`: its slot, else the overflow map.
#[inline(always)]
fn lookup_training(tid: u32) -> Option<*mut TrainingTask> {
    if let Some(slot) = TRAINING_SLOTS.get_ptr_mut(tid % TRAINING_SLOT_COUNT)
        // SAFETY: map value pointer; a u32 read.
        && unsafe { (*slot).tid } == tid
    {
        return Some(slot);
    }
    TRAINING_TASKS.get_ptr_mut(tid)
}

/// Advances a training's wait integral on one CPU to `now` with the waiter
/// count that held since the last update. Call before changing `waiters`.
#[inline(always)]
fn advance(w: &mut TrainingWait, now: u64) {
    let dt = now.saturating_sub(w.last_update_ns);
    w.wait_integral_ns += w.waiters * dt;
    w.last_update_ns = now;
}

/// `index` as an index of the per-training arrays in `CpuWait`. A mask, not
/// a bounds check: the 5.10 verifier loses a check made on the 32-bit value
/// once the compiler indexes with the 64-bit register, and refuses the
/// access; a mask bounds that register itself. User space only hands out
/// indices below `MAX_TRAININGS`, which the mask leaves as they are.
#[inline(always)]
fn slot(index: u32) -> usize {
    (index & (MAX_TRAININGS - 1)) as usize
}

const _: () = assert!(MAX_TRAININGS.is_power_of_two());

/// Training `index`'s wait state on the CPU of `cw` (whose run-queue lock
/// the caller holds), zeroed first when it belongs to an older registration
/// of that index (see the module doc). The arrival counters are kept: a
/// migration to this CPU may be adding to them right now, and they only
/// matter as a difference.
#[inline(always)]
fn training_wait(cw: &mut CpuWait, index: u32, now: u64) -> Option<&mut TrainingWait> {
    let generation = TRAINING_CONF.get(index)?.generation as u64;
    let w = &mut cw.trainings[slot(index)];
    if w.generation != generation {
        let stale = w.waiters;
        w.generation = generation;
        w.waiters = 0;
        w.wait_integral_ns = 0;
        w.segment_start_ns = 0;
        w.segment_waited_ns = 0;
        w.last_update_ns = now;
        cw.waiters = cw.waiters.saturating_sub(stale);
    }
    Some(&mut cw.trainings[slot(index)])
}

/// The job of the current task, if its v2 cgroup (or, with `ANCESTORS`,
/// its ancestor at a job depth) is a job cgroup. Tracing programs may call
/// `bpf_get_current_ancestor_cgroup_id` only on newer kernels (not on
/// 5.10): there, user space enters every cgroup below a job in `JOBS`
/// itself, and the programs built without `ANCESTORS` are loaded.
#[inline(always)]
fn job_of_current<const ANCESTORS: bool>() -> Option<JobRef> {
    // SAFETY: helpers without arguments to validate.
    let id = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: values of this map are plain integers.
    if let Some(job) = unsafe { JOBS.get(id) } {
        return Some(*job);
    }
    if !ANCESTORS {
        return None;
    }
    for i in 0..MAX_JOB_LEVELS {
        let level = match JOB_LEVELS.get(i) {
            Some(&level) if level != 0 => level,
            _ => continue,
        };
        // SAFETY: the helper validates the level itself (0 when too deep).
        let ancestor = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
        // SAFETY: as above.
        if let Some(job) = unsafe { JOBS.get(ancestor) } {
            return Some(*job);
        }
    }
    None
}

// ---------------------------------------------------------------------------
// sched_switch
// ---------------------------------------------------------------------------

/// `sched_switch` on kernels ≥ 5.18: (preempt, prev, next, prev_state).
#[btf_tracepoint(function = "sched_switch")]
pub fn steal_sched_switch(ctx: BtfTracePointContext) -> i32 {
    switch_with_state::<true>(&ctx);
    0
}

/// As `steal_sched_switch`, for kernels whose tracing programs lack
/// `bpf_get_current_ancestor_cgroup_id`.
#[btf_tracepoint(function = "sched_switch")]
pub fn steal_sched_switch_flat(ctx: BtfTracePointContext) -> i32 {
    switch_with_state::<false>(&ctx);
    0
}

/// `sched_switch` on kernels < 5.18: (preempt, prev, next); the state of prev
/// is read from `task_struct` at the BTF offset of `__state`/`state`.
#[btf_tracepoint(function = "sched_switch")]
pub fn steal_sched_switch_legacy(ctx: BtfTracePointContext) -> i32 {
    switch_reading_state::<true>(&ctx);
    0
}

/// As `steal_sched_switch_legacy`, without the ancestor helper (5.10).
#[btf_tracepoint(function = "sched_switch")]
pub fn steal_sched_switch_legacy_flat(ctx: BtfTracePointContext) -> i32 {
    switch_reading_state::<false>(&ctx);
    0
}

#[inline(always)]
fn switch_with_state<const ANCESTORS: bool>(ctx: &BtfTracePointContext) {
    let preempt: u64 = ctx.arg(0);
    let next: *const u8 = ctx.arg(2);
    let prev_state: u64 = ctx.arg(3);
    on_switch::<ANCESTORS>(preempt & 0xff != 0, prev_state as u32, next);
}

#[inline(always)]
fn switch_reading_state<const ANCESTORS: bool>(ctx: &BtfTracePointContext) {
    let preempt: u64 = ctx.arg(0);
    let prev: *const u8 = ctx.arg(1);
    let next: *const u8 = ctx.arg(2);
    // An unreadable state counts as "blocked": at worst a wait is missed,
    // never invented. (A `long` on 5.10-5.13; its low half on little endian.)
    let prev_state = task_u32(prev, config(&TASK_STATE_OFFSET)).unwrap_or(u32::MAX);
    on_switch::<ANCESTORS>(preempt & 0xff != 0, prev_state, next);
}

#[inline(always)]
fn on_switch<const ANCESTORS: bool>(preempt: bool, prev_state: u32, next: *const u8) {
    // SAFETY: helper without arguments to validate.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let Some(cw) = CPU_WAIT.get_ptr_mut(cpu) else {
        cpu_out_of_range();
        return;
    };
    // SAFETY: this CPU's slot, and we run under this CPU's run-queue lock.
    let cw = unsafe { &mut *cw };

    // prev is `current` here: the context switch happens after the trace.
    let pid_tgid = bpf_get_current_pid_tgid();
    let prev_tid = pid_tgid as u32;
    let prev_task = training_task(prev_tid, (pid_tgid >> 32) as u32);
    let next_tid = task_field(next, config(&TASK_PID_OFFSET));
    let next_task = training_task(next_tid, task_field(next, config(&TASK_TGID_OFFSET)));
    // SAFETY: an aligned u64 other CPUs only ever add to atomically.
    let arrived = unsafe { core::ptr::read_volatile(&cw.arrivals) };

    // Fast path: no training thread involved, none waiting here since the
    // last accounted switch, nothing arrived: nothing to account, not even
    // the time. (With no waiters no integral moves, so a stale
    // `last_update_ns` is harmless: the next advance adds 0 × dt.)
    if prev_task.is_none()
        && next_task.is_none()
        && cw.waiters == 0
        && cw.dirty == 0
        && arrived == cw.arrivals_seen
        && cw.preempted_training == 0
    {
        return;
    }
    let now = clock_of(next);
    if now.saturating_sub(cw.calibrated_clock_ns) >= CALIBRATE_EVERY_NS {
        // SAFETY: helper without arguments.
        cw.calibrated_ktime_ns = unsafe { bpf_ktime_get_ns() };
        cw.calibrated_clock_ns = now;
    }
    cw.arrivals_seen = arrived;

    // Close the interval the outgoing task ran, for every training: advance
    // its integral with the waiters that held until now, then fold in those
    // that migrated here meanwhile (they count from now on), and keep the
    // wait that accrued while prev ran for the charge below.
    let mut waited_any = 0;
    let mut waiters = 0;
    for index in 0..MAX_TRAININGS {
        let Some(w) = training_wait(cw, index, now) else {
            break;
        };
        // SAFETY: an aligned u64 other CPUs only ever add to atomically.
        let arrived = unsafe { core::ptr::read_volatile(&w.arrivals) };
        // A wrapping counter: migrations add 1, a correction from the exit
        // hook adds -1 (see there).
        let pending = arrived.wrapping_sub(w.arrivals_seen) as i64;
        w.segment_waited_ns = 0;
        if w.waiters == 0 && pending == 0 && w.wait_integral_ns == w.segment_start_ns {
            // Nothing accrued; the clock still moves on, so that a waiter
            // that prev becomes below counts from now, not from the last
            // update.
            w.last_update_ns = now;
            continue;
        }
        advance(w, now);
        if pending >= 0 {
            w.waiters += pending as u64;
        } else if w.waiters >= pending.unsigned_abs() {
            w.waiters -= pending.unsigned_abs();
        } else {
            w.waiters = 0;
        }
        w.arrivals_seen = arrived;
        let waited = w.wait_integral_ns - w.segment_start_ns;
        w.segment_start_ns = w.wait_integral_ns;
        w.segment_waited_ns = waited;
        waiters += w.waiters;
        if waited != 0 {
            waited_any = 1;
            if let Some(t) = totals(index) {
                t.attributed_wait_ns += waited;
            }
        }
    }
    cw.waiters = waiters;
    let preempted_training = cw.preempted_training;
    cw.preempted_training = 0;

    if waited_any != 0 || preempted_training != 0 {
        // A training thread running while its siblings wait is the
        // workload's own contention: not steal. tid 0 is the idle task.
        if prev_task.is_none()
            && prev_tid != 0
            && let Some(job) = job_of_current::<ANCESTORS>()
        {
            charge(cw, job, preempted_training);
        }
    }

    // A prev that is still runnable stays on the run queue (preempted, or
    // yielded): its wait starts now, as if it had just been enqueued.
    let still_runnable = preempt || prev_state == 0;
    if let Some(prev) = prev_task {
        // SAFETY: map value pointer; this task's entry is only touched under
        // its run-queue lock, which we hold.
        let prev = unsafe { &mut *prev };
        switch_out(cw, prev, cpu, now, still_runnable);
    }

    if let Some(next) = next_task {
        // SAFETY: as for prev.
        let next = unsafe { &mut *next };
        switch_in(cw, next, cpu, now);
    } else {
        cw.training_since_ns = 0;
        if let Some(prev) = prev_task
            && still_runnable
            && next_tid != 0
        {
            // Whoever owns next is charged this preemption at its
            // switch-out, when it is `current` and can be classified.
            // SAFETY: as above; a u32 read.
            cw.preempted_training = unsafe { (*prev).training } as u64 + 1;
        }
    }
    cw.dirty = u64::from(cw.waiters != 0);

    // A thread's last switch-out: its slice is closed above, its entry goes.
    if prev_state & TASK_DEAD != 0
        && !still_runnable
        && let Some(prev) = prev_task
    {
        // SAFETY: as above; a u32 read.
        let index = unsafe { (*prev).training };
        forget_training(prev_tid, prev);
        if let Some(t) = totals(index) {
            t.threads_exited += 1;
        }
    }
}

/// Charges the job whose task was switched out the wait of its own
/// training that accrued while it ran, and the preemption of one of that
/// training's threads when it was switched in by one.
#[inline(always)]
fn charge(cw: &CpuWait, job: JobRef, preempted_training: u64) {
    let w = &cw.trainings[slot(job.training)];
    let Some(counters) = JOB_STEAL.get_ptr_mut(job.slot) else {
        return;
    };
    // SAFETY: this CPU's slot of a per-CPU array.
    let counters = unsafe { &mut *counters };
    counters.steal_ns += w.segment_waited_ns;
    if preempted_training == job.training as u64 + 1 {
        counters.preemptions += 1;
    }
}

/// A training thread leaves the CPU: its slice on CPU is counted, and when
/// it stays runnable its wait starts.
#[inline(always)]
fn switch_out(cw: &mut CpuWait, prev: &mut TrainingTask, cpu: u32, now: u64, runnable: bool) {
    let index = prev.training;
    let Some(totals) = totals(index) else { return };
    match prev.state {
        TASK_RUNNING => totals.on_cpu_ns += now.saturating_sub(prev.since_ns),
        // A wake-up seen while the thread was still on CPU (only possible
        // for a thread seeded in an unknown state): undo its wait.
        TASK_WAITING if !(prev.cpu == cpu && take_waiter(cw, index)) => {
            totals.waiter_underflow += 1;
        }
        _ => {}
    }
    prev.cpu = cpu;
    prev.since_ns = now;
    if runnable {
        prev.state = TASK_WAITING;
        cw.trainings[slot(index)].waiters += 1;
        cw.waiters += 1;
    } else {
        prev.state = TASK_SLEEPING;
    }
}

/// A training thread takes the CPU: a wait it was in ends.
#[inline(always)]
fn switch_in(cw: &mut CpuWait, next: &mut TrainingTask, cpu: u32, now: u64) {
    let index = next.training;
    if next.state == TASK_WAITING
        && let Some(totals) = totals(index)
    {
        totals.runq_wait_ns += now.saturating_sub(next.since_ns);
        if !(next.cpu == cpu && take_waiter(cw, index)) {
            totals.waiter_underflow += 1;
            // It was counted waiting on another CPU (a move we did not
            // see): take it off there, or that CPU would charge a phantom
            // waiter to whatever runs on it from now on.
            if next.cpu != cpu {
                uncount_waiter(next.cpu, index);
            }
        }
    }
    next.state = TASK_RUNNING;
    next.cpu = cpu;
    next.since_ns = now;
    cw.training_since_ns = now;
    cw.running_training = index as u64;
}

/// Takes one waiter of training `index` off this CPU (already advanced to
/// now by the switch); false when it has none.
#[inline(always)]
fn take_waiter(cw: &mut CpuWait, index: u32) -> bool {
    let w = &mut cw.trainings[slot(index)];
    if w.waiters == 0 {
        return false;
    }
    w.waiters -= 1;
    cw.waiters = cw.waiters.saturating_sub(1);
    true
}

// ---------------------------------------------------------------------------
// Wake-ups, migrations, fork and exit
// ---------------------------------------------------------------------------

/// `sched_wakeup(p)`: runs with p's run-queue lock held, after p was
/// enqueued on `task_cpu(p)`.
#[btf_tracepoint(function = "sched_wakeup")]
pub fn steal_sched_wakeup(ctx: BtfTracePointContext) -> i32 {
    on_wakeup(ctx.arg(0));
    0
}

/// `sched_wakeup_new(p)`: the first enqueue of a new task.
#[btf_tracepoint(function = "sched_wakeup_new")]
pub fn steal_sched_wakeup_new(ctx: BtfTracePointContext) -> i32 {
    on_wakeup(ctx.arg(0));
    0
}

#[inline(always)]
fn on_wakeup(task: *const u8) {
    let tid = task_field(task, config(&TASK_PID_OFFSET));
    let Some(entry) = training_task(tid, task_field(task, config(&TASK_TGID_OFFSET))) else {
        return;
    };
    // SAFETY: map value; p's run-queue lock is held.
    let entry = unsafe { &mut *entry };
    // Woken while still on CPU (it had not finished going to sleep) or
    // already queued: the kernel fires the tracepoint, but no wait starts.
    // A thread seeded from user space in an unknown state may be either, so
    // its waits are counted from its first switch on (once per thread).
    if entry.state != TASK_SLEEPING {
        return;
    }
    let cpu = task_field(task, config(&TASK_CPU_OFFSET));
    let Some(cw) = CPU_WAIT.get_ptr_mut(cpu) else {
        cpu_out_of_range();
        return;
    };
    // SAFETY: that CPU's run-queue lock is held (see the module docs).
    let cw = unsafe { &mut *cw };
    let now = clock_of(task);
    let Some(w) = training_wait(cw, entry.training, now) else {
        return;
    };
    advance(w, now);
    w.waiters += 1;
    cw.waiters += 1;
    cw.dirty = 1;
    entry.state = TASK_WAITING;
    entry.cpu = cpu;
    entry.since_ns = now;
}

/// `sched_migrate_task(p, dest_cpu)`: for a waiting training thread, moves
/// its count from the source CPU (whose lock is held) to the destination
/// (whose lock is not: an atomic arrival, folded there at its next switch).
#[btf_tracepoint(function = "sched_migrate_task")]
pub fn steal_sched_migrate_task(ctx: BtfTracePointContext) -> i32 {
    let task: *const u8 = ctx.arg(0);
    let dest: u64 = ctx.arg(1);
    let dest = dest as u32;
    let tid = task_field(task, config(&TASK_PID_OFFSET));
    let Some(entry) = training_task(tid, task_field(task, config(&TASK_TGID_OFFSET))) else {
        return 0;
    };
    // SAFETY: map value; the source run-queue lock is held.
    let entry = unsafe { &mut *entry };
    // A sleeping thread is migrated on wake-up before it is enqueued: its
    // wait starts at sched_wakeup on the destination, nothing to move.
    if entry.state != TASK_WAITING || entry.cpu == dest {
        return 0;
    }
    let index = entry.training;
    let Some(totals) = totals(index) else {
        return 0;
    };
    let (Some(src), Some(dst)) = (CPU_WAIT.get_ptr_mut(entry.cpu), CPU_WAIT.get_ptr_mut(dest))
    else {
        cpu_out_of_range();
        return 0;
    };
    // SAFETY: the source CPU's run-queue lock is held.
    let src = unsafe { &mut *src };
    let now = clock_of(task);
    let Some(w) = training_wait(src, index, now) else {
        return 0;
    };
    advance(w, now);
    if w.waiters > 0 {
        w.waiters -= 1;
        src.waiters = src.waiters.saturating_sub(1);
    } else {
        totals.waiter_underflow += 1;
    }
    add_arrival(dst, index, 1);
    entry.cpu = dest;
    totals.migrations += 1;
    0
}

/// Adds `delta` (1, or u64::MAX for -1) to training `index`'s arrivals at
/// the CPU of `cw`, whose run-queue lock is not held, then to that CPU's
/// total (the fast path's hint; the switch folds every training's own
/// count, so a total seen before its training's add only delays the fold
/// to a later switch).
#[inline(always)]
fn add_arrival(cw: *mut CpuWait, index: u32, delta: u64) {
    // SAFETY: aligned u64s in a map value, reached without forming a
    // reference (other CPUs write them too), the index masked in bounds. The
    // results are unused, so these compile to BPF_XADD, the one atomic the
    // 5.10 verifier accepts.
    unsafe {
        let w = (&raw mut (*cw).trainings as *mut TrainingWait).add(slot(index));
        core::intrinsics::atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
            &raw mut (*w).arrivals,
            delta,
        );
        core::intrinsics::atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
            &raw mut (*cw).arrivals,
            delta,
        );
    }
}

/// `sched_process_fork(parent, child)`, run by the parent (`current`) for
/// every new thread and process: children of training threads are training
/// in the parent's training (threads always, processes when it follows
/// children).
#[btf_tracepoint(function = "sched_process_fork")]
pub fn steal_sched_process_fork(ctx: BtfTracePointContext) -> i32 {
    let child: *const u8 = ctx.arg(1);
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(parent) = lookup_training(pid_tgid as u32) else {
        return 0;
    };
    // SAFETY: map value pointer; a u32 read.
    let index = unsafe { (*parent).training };
    let Some(conf) = TRAINING_CONF.get(index) else {
        return 0;
    };
    let tid = task_field(child, config(&TASK_PID_OFFSET));
    let tgid = task_field(child, config(&TASK_TGID_OFFSET));
    if tgid != (pid_tgid >> 32) as u32 && conf.follow_children == 0 {
        return 0;
    }
    let Some(totals) = totals(index) else {
        return 0;
    };
    let task = TrainingTask {
        state: TASK_SLEEPING,
        cpu: 0,
        since_ns: 0,
        tid,
        training: index,
    };
    if tgid != (pid_tgid >> 32) as u32 {
        add_to_filter(tgid);
    }
    // A free slot, or one left by an exited thread whose tid this one
    // reuses; else the overflow map. (Two forks racing for one slot need
    // tids equal modulo TRAINING_SLOT_COUNT at the same instant; the loser's
    // entry would be overwritten, so it re-checks and falls back.)
    if let Some(slot) = TRAINING_SLOTS.get_ptr_mut(tid % TRAINING_SLOT_COUNT) {
        // SAFETY: map value pointer; plain stores of a Copy struct.
        unsafe {
            let held = (*slot).tid;
            if held == 0 || held == tid {
                core::ptr::write_volatile(slot, task);
                if core::ptr::read_volatile(&(*slot).tid) == tid {
                    totals.threads_forked += 1;
                    return 0;
                }
            }
        }
    }
    if TRAINING_TASKS.insert(tid, task, 0).is_ok() {
        totals.threads_forked += 1;
    } else {
        totals.threads_dropped += 1;
    }
    0
}

/// Enters a new training process in `TGID_FILTER`; on a collision (or a lost
/// race for the slot) sets the bypass flag so that nothing is missed.
#[inline(always)]
fn add_to_filter(tgid: u32) {
    let index = tgid % TGID_FILTER_SLOTS;
    let Some(slot) = TGID_FILTER.get_ptr_mut(index) else {
        return;
    };
    // SAFETY: map value pointer; a u32 store is atomic.
    unsafe {
        if *slot == 0 {
            core::ptr::write_volatile(slot, tgid);
        }
        if core::ptr::read_volatile(slot) != tgid
            && let Some(bypass) = TGID_FILTER.get_ptr_mut(TGID_FILTER_SLOTS)
        {
            core::ptr::write_volatile(bypass, 1);
        }
    }
}

/// Takes one waiter of training `index` off CPU `cpu`, whose run-queue lock
/// is not held: like a migration's arrival, an atomic -1 folded in at that
/// CPU's next switch.
#[inline(always)]
fn uncount_waiter(cpu: u32, index: u32) {
    if let Some(cw) = CPU_WAIT.get_ptr_mut(cpu) {
        add_arrival(cw, index, u64::MAX);
    }
}

/// `sched_process_exit`, run by the exiting thread (`current`). The entry
/// itself stays until the thread's last switch-out (`TASK_DEAD`), which
/// closes its last slice on the run queue's clock and frees it.
#[btf_tracepoint(function = "sched_process_exit")]
pub fn steal_sched_process_exit(_ctx: BtfTracePointContext) -> i32 {
    let tid = bpf_get_current_pid_tgid() as u32;
    let Some(entry) = lookup_training(tid) else {
        return 0;
    };
    // SAFETY: map value pointer of the current task.
    let (state, cpu, index) = unsafe { ((*entry).state, (*entry).cpu, (*entry).training) };
    // The exiting thread runs, so it cannot be waiting; if its entry says so,
    // a switch-in was missed and its CPU counts one waiter too many. That
    // CPU's lock is not held here: correct it like a migration, atomically.
    if state == TASK_WAITING {
        if let Some(totals) = totals(index) {
            totals.waiter_underflow += 1;
        }
        uncount_waiter(cpu, index);
        // SAFETY: as above; a plain store.
        unsafe { (*entry).state = TASK_UNKNOWN };
    }
    0
}

/// Frees the entry of training thread `tid` (its slot, or its overflow map
/// entry). Once per thread, so a subprogram of its own: inlined into the
/// switch, the compiler spilled a register that is undefined on this path,
/// which the verifier refuses.
#[inline(never)]
fn forget_training(tid: u32, entry: *mut TrainingTask) {
    if TRAINING_SLOTS
        .get_ptr_mut(tid % TRAINING_SLOT_COUNT)
        // SAFETY: map value pointer; a u32 read.
        .is_some_and(|slot| unsafe { (*slot).tid } == tid)
    {
        // SAFETY: map value pointer of the slot.
        unsafe { (*entry).tid = 0 };
    } else {
        let _ = TRAINING_TASKS.remove(tid);
    }
}
