//! The steal meter: loads the scheduler programs of `enforcer-ebpf` once,
//! tells them which threads belong to which training (up to
//! `MAX_TRAININGS` at once) and which cgroups are jobs of which training,
//! and reads their cumulative counters back, per training.
//!
//! Nothing here runs on the scheduler path: the kernel aggregates, and
//! [`StealMeter::read`] is a poll (the supervisor calls it once per control
//! period). Windows and budgets over successive snapshots live in
//! [`super::window`].

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, PerCpuArray},
    programs::{BtfTracePoint, tp_btf::BtfTracePointLinkId},
};
use enforcer_common::{
    CpuWait, JobRef, JobSteal, MAX_JOB_LEVELS, MAX_JOBS, MAX_TRAININGS, NODE_TOTALS, TASK_UNKNOWN,
    TGID_FILTER_SLOTS, TRAINING_SLOT_COUNT, TrainingConf, TrainingTask, TrainingTotals,
};
use serde::Serialize;

use super::{EBPF_OBJECT, ProbeError, ProgramStats, btf::TaskLayout, program_stats, raise_memlock};
use crate::host::{Pid, ProcFs};

/// `BPF_NOEXIST`: user-space seeding must never overwrite the state the
/// kernel already keeps for a thread.
const BPF_NOEXIST: u64 = 1;

/// The name [`StealMeter::start`] gives its one training.
pub const SOLE_TRAINING: &str = "training";

/// What the training workload is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrainingSpec {
    /// A process: all its threads, threads it creates later, and with
    /// `follow_children` the processes it forks (and theirs).
    Pid { pid: Pid, follow_children: bool },
    /// Every thread in a cgroup directory (v2 or v1) and its descendants.
    Cgroup(PathBuf),
}

/// A job cgroup as the kernel programs see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobCgroup {
    /// v2 cgroup id: the inode number of its directory in the unified
    /// hierarchy.
    pub id: u64,
    /// Depth below the v2 root (the root is 0), so that tasks in its child
    /// cgroups (games) are matched too. `None`: match the cgroup itself only.
    pub level: Option<u32>,
    /// Its directory in the v2 hierarchy: on kernels whose tracing programs
    /// lack the ancestor helper (5.10), its child cgroups are found here and
    /// entered one by one at every read.
    pub dir: Option<PathBuf>,
}

impl JobCgroup {
    /// Identifies the v2 cgroup at `path` (a directory of the cgroup2 mount).
    pub fn from_path(path: &Path) -> Result<Self, ProbeError> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).map_err(|source| ProbeError::Cgroup {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self {
            id: meta.ino(),
            level: v2_level(path),
            dir: Some(path.to_owned()),
        })
    }
}

/// Depth of `path` below the cgroup2 mount that holds it.
pub fn v2_level(path: &Path) -> Option<u32> {
    let path = std::fs::canonicalize(path).ok()?;
    ProcFs::new().mountinfo().ok()?.v2_level(&path)
}

/// Cumulative counters of one job since it was added.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct JobCounters {
    /// Training run-queue wait while a task of the job ran, ns.
    pub steal_ns: u64,
    /// Times a task of the job preempted a runnable training thread.
    pub preemptions: u64,
}

/// Cumulative training counters since the meter started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct TrainingCounters {
    /// On-CPU time of training threads, ns, including slices in progress.
    pub on_cpu_ns: u64,
    /// Completed run-queue waits of training threads, whoever ran, ns.
    pub runq_wait_ns: u64,
    /// Run-queue wait attributed to the tasks that ran meanwhile, ns.
    pub attributed_wait_ns: u64,
    /// Training threads known now.
    pub threads: u64,
    pub threads_forked: u64,
    pub threads_exited: u64,
    /// Waiting training threads moved between run queues.
    pub migrations: u64,
}

/// What did not fit or did not add up: all zero on a healthy run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Overflow {
    /// Training threads not tracked because the thread table was full.
    pub threads_dropped: u64,
    /// Events on CPUs beyond the per-CPU table.
    pub cpu_out_of_range: u64,
    /// Waiter counts that would have gone negative (a missed event).
    pub waiter_underflow: u64,
    /// Child cgroups of jobs not entered because the job cgroup table was
    /// full (only on kernels without the ancestor helper).
    pub job_cgroups_dropped: u64,
}

impl Overflow {
    pub fn any(&self) -> bool {
        self.threads_dropped
            + self.cpu_out_of_range
            + self.waiter_underflow
            + self.job_cgroups_dropped
            != 0
    }
}

/// One poll of the meter. Counters are cumulative; `at` is CLOCK_MONOTONIC.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StealSnapshot {
    #[serde(skip)]
    pub at: Duration,
    pub training: TrainingCounters,
    /// Training on-CPU time per CPU (index = CPU number), ns, including
    /// slices in progress: where the training runs, for placing jobs.
    pub training_on_cpu_per_cpu_ns: Vec<u64>,
    pub jobs: BTreeMap<String, JobCounters>,
    pub overflow: Overflow,
}

impl StealSnapshot {
    /// [`StealSnapshot::training_on_cpu_per_cpu_ns`] as durations.
    pub fn training_on_cpu_per_cpu(&self) -> Vec<Duration> {
        self.training_on_cpu_per_cpu_ns
            .iter()
            .map(|&ns| Duration::from_nanos(ns))
            .collect()
    }
}

#[derive(Debug)]
struct Job {
    training: String,
    slot: u32,
    cgroup: JobCgroup,
    /// Slot counters when the job was added (slots are reused).
    baseline: JobCounters,
    /// The cgroup ids entered for it in `JOBS`.
    ids: BTreeSet<u64>,
    /// Its child cgroups not entered because `JOBS` was full.
    cgroups_dropped: u64,
}

/// A registered training.
#[derive(Debug)]
struct Training {
    spec: TrainingSpec,
    /// Its index in the kernel's per-training state.
    index: u32,
    /// Threads entered from user space (the rest came by fork).
    seeded: u64,
    /// What its index had counted, per CPU, before it was registered (the
    /// kernel never zeroes these counters; indices are reused).
    baseline: Vec<TrainingTotals>,
}

/// The steal programs' maps, taken out of the loaded object once, typed.
struct StealMaps {
    training_slots: Array<MapData, TrainingTask>,
    training_tasks: HashMap<MapData, u32, TrainingTask>,
    tgid_filter: Array<MapData, u32>,
    training_conf: Array<MapData, TrainingConf>,
    jobs: HashMap<MapData, u64, JobRef>,
    job_levels: Array<MapData, u32>,
    job_steal: PerCpuArray<MapData, JobSteal>,
    training_totals: PerCpuArray<MapData, TrainingTotals>,
    cpu_wait: Array<MapData, CpuWait>,
}

impl StealMaps {
    fn take(ebpf: &mut Ebpf) -> Result<Self, ProbeError> {
        fn take<M: TryFrom<Map, Error = aya::maps::MapError>>(
            ebpf: &mut Ebpf,
            name: &'static str,
        ) -> Result<M, ProbeError> {
            let map = ebpf.take_map(name).ok_or(missing("map", name))?;
            M::try_from(map).map_err(map_err(name))
        }
        Ok(Self {
            training_slots: take(ebpf, "TRAINING_SLOTS")?,
            training_tasks: take(ebpf, "TRAINING_TASKS")?,
            tgid_filter: take(ebpf, "TGID_FILTER")?,
            training_conf: take(ebpf, "TRAINING_CONF")?,
            jobs: take(ebpf, "JOBS")?,
            job_levels: take(ebpf, "JOB_LEVELS")?,
            job_steal: take(ebpf, "JOB_STEAL")?,
            training_totals: take(ebpf, "TRAINING_TOTALS")?,
            cpu_wait: take(ebpf, "CPU_WAIT")?,
        })
    }
}

/// The loaded steal programs, shared by every training they meter;
/// attached between [`StealMeter::attach`] and [`StealMeter::detach`].
/// Dropping it detaches and unloads them.
pub struct StealMeter {
    ebpf: Ebpf,
    maps: StealMaps,
    trainings: BTreeMap<String, Training>,
    /// The programs loaded, in attach order.
    programs: Vec<&'static str>,
    /// Their links while attached (empty while detached).
    links: Vec<(&'static str, BtfTracePointLinkId)>,
    jobs: BTreeMap<String, Job>,
    nr_cpus: usize,
    /// Whether the loaded `sched_switch` program matches child cgroups of a
    /// job through `bpf_get_current_ancestor_cgroup_id`.
    ancestors: bool,
    /// Registrations refused because `MAX_TRAININGS` were registered.
    trainings_refused: u64,
    /// Bit `i`: training index `i` was registered before (its threads may
    /// linger in the tables).
    indices_used: u32,
}

impl std::fmt::Debug for StealMeter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StealMeter")
            .field("trainings", &self.trainings)
            .field("jobs", &self.jobs)
            .field("attached", &self.is_attached())
            .finish_non_exhaustive()
    }
}

/// CLOCK_MONOTONIC, the clock of `bpf_ktime_get_ns`.
pub fn monotonic_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> ProbeError {
    move |source| ProbeError::Map { name, source }
}

fn missing(kind: &'static str, name: &'static str) -> ProbeError {
    ProbeError::Missing { kind, name }
}

impl StealMeter {
    /// Loads the steal programs (the kernel verifies them: the slow part)
    /// without attaching them, so they cost no context switch until
    /// [`StealMeter::attach`]. Fails with the reason (no BTF, no privilege,
    /// verifier refusal) when the kernel cannot run them; the caller
    /// reports that and carries on.
    pub fn load() -> Result<Self, ProbeError> {
        raise_memlock();
        let layout = TaskLayout::from_sys_fs().map_err(|e| ProbeError::NoBtf(e.to_string()))?;
        let nr_cpus =
            aya::util::nr_cpus().map_err(|(what, e)| ProbeError::Cpus(format!("{what}: {e}")))?;
        tracing::debug!(?layout, nr_cpus, "kernel layout from BTF");
        let clock = layout.clock.ok_or_else(|| {
            ProbeError::NoBtf(
                "kernel BTF has no task_struct.se.cfs_rq -> cfs_rq.rq -> rq.clock \
                 (a kernel without CONFIG_FAIR_GROUP_SCHED): the probes time events on the run queue's clock"
                    .to_owned(),
            )
        })?;
        let mut ebpf = EbpfLoader::new()
            .override_global("TASK_PID_OFFSET", &layout.pid, true)
            .override_global("TASK_TGID_OFFSET", &layout.tgid, true)
            .override_global("TASK_CPU_OFFSET", &layout.cpu, true)
            .override_global("TASK_STATE_OFFSET", &layout.state, true)
            .override_global("TASK_CFS_RQ_OFFSET", &clock.task_cfs_rq, true)
            .override_global("CFS_RQ_RQ_OFFSET", &clock.cfs_rq_rq, true)
            .override_global("RQ_CLOCK_OFFSET", &clock.rq_clock, true)
            .map_max_entries("CPU_WAIT", nr_cpus as u32)
            .load(EBPF_OBJECT)?;
        let maps = StealMaps::take(&mut ebpf)?;
        let (switch, switch_flat) = if layout.switch_has_prev_state {
            ("steal_sched_switch", "steal_sched_switch_flat")
        } else {
            (
                "steal_sched_switch_legacy",
                "steal_sched_switch_legacy_flat",
            )
        };
        let mut meter = Self {
            ebpf,
            maps,
            trainings: BTreeMap::new(),
            programs: Vec::new(),
            links: Vec::new(),
            jobs: BTreeMap::new(),
            nr_cpus,
            ancestors: true,
            trainings_refused: 0,
            indices_used: 0,
        };
        let programs = [
            (switch, "sched_switch"),
            ("steal_sched_migrate_task", "sched_migrate_task"),
            ("steal_sched_wakeup", "sched_wakeup"),
            ("steal_sched_wakeup_new", "sched_wakeup_new"),
            ("steal_sched_process_fork", "sched_process_fork"),
            ("steal_sched_process_exit", "sched_process_exit"),
        ];
        let btf = aya::Btf::from_sys_fs().map_err(|e| ProbeError::NoBtf(e.to_string()))?;
        let mut programs = programs;
        for (i, (name, tracepoint)) in programs.into_iter().enumerate() {
            let Err(source) = meter.tracepoint(name)?.load(tracepoint, &btf) else {
                continue;
            };
            if name != switch {
                return Err(ProbeError::Program { name, source });
            }
            // Tracing programs may call bpf_get_current_ancestor_cgroup_id
            // only on newer kernels: fall back to the program that matches
            // exact cgroup ids, and enter child cgroups from here instead.
            tracing::debug!(error = %source, "sched_switch with the ancestor helper refused; using {switch_flat}");
            meter
                .tracepoint(switch_flat)?
                .load(tracepoint, &btf)
                .map_err(|_| ProbeError::Program { name, source })?;
            meter.ancestors = false;
            programs[i].0 = switch_flat;
        }
        meter.programs = programs.iter().map(|(name, _)| *name).collect();
        Ok(meter)
    }

    /// Attaches the loaded programs (no-op while attached). They are
    /// attached back to back, so the window in which only some run is a
    /// few system calls long; attach before registering a training, so
    /// that no wait can start while only some are attached.
    pub fn attach(&mut self) -> Result<(), ProbeError> {
        if self.is_attached() {
            return Ok(());
        }
        // Detached, the programs saw no switch: a CPU's state may still say
        // that a training thread has run there since before the detach.
        // Back to the state of a fresh load; its calibration is redone by
        // the first event on each CPU.
        for cpu in 0..self.nr_cpus as u32 {
            self.maps
                .cpu_wait
                .set(cpu, CpuWait::default(), 0)
                .map_err(map_err("CPU_WAIT"))?;
        }
        for name in self.programs.clone() {
            let attached = self.tracepoint(name).and_then(|p| {
                p.attach()
                    .map_err(|source| ProbeError::Program { name, source })
            });
            match attached {
                Ok(link) => self.links.push((name, link)),
                Err(e) => {
                    self.detach();
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Detaches the programs (they stay loaded, their maps kept): the
    /// node's context switches no longer run them.
    pub fn detach(&mut self) {
        for (name, link) in std::mem::take(&mut self.links) {
            if let Err(error) = self.tracepoint(name).and_then(|p| {
                p.detach(link)
                    .map_err(|source| ProbeError::Program { name, source })
            }) {
                tracing::warn!(program = name, %error, "detaching a steal program failed");
            }
        }
    }

    /// Whether the programs run on the node's context switches now.
    pub fn is_attached(&self) -> bool {
        !self.links.is_empty()
    }

    /// Loads and attaches the programs and registers `training` as
    /// [`SOLE_TRAINING`]: the meter of one `enforcer run --protect` or
    /// `enforcer meter`.
    pub fn start(training: TrainingSpec) -> Result<Self, ProbeError> {
        let mut meter = Self::load()?;
        meter.attach()?;
        meter.add_training(SOLE_TRAINING, training)?;
        Ok(meter)
    }

    fn tracepoint(&mut self, name: &'static str) -> Result<&mut BtfTracePoint, ProbeError> {
        self.ebpf
            .program_mut(name)
            .ok_or(missing("program", name))?
            .try_into()
            .map_err(|source| ProbeError::Program { name, source })
    }

    /// Starts metering the training `spec` as `id`: it takes a free
    /// training index, and its threads are entered at once (the fork hook
    /// adds the ones it creates from then on). Fails when `MAX_TRAININGS`
    /// are registered (counted, see [`StealMeter::trainings_refused`]) or
    /// the training has no threads; nothing stays registered then.
    pub fn add_training(&mut self, id: &str, spec: TrainingSpec) -> Result<(), ProbeError> {
        if self.trainings.contains_key(id) {
            return Err(ProbeError::TrainingExists(id.to_owned()));
        }
        let used: BTreeSet<u32> = self.trainings.values().map(|t| t.index).collect();
        let Some(index) = (0..MAX_TRAININGS).find(|i| !used.contains(i)) else {
            self.trainings_refused += 1;
            return Err(ProbeError::TooManyTrainings(MAX_TRAININGS));
        };
        // Threads a fork entered with this index while its last training
        // was being removed.
        if self.indices_used & (1 << index) != 0 {
            self.forget_threads(index)?;
        }
        self.indices_used |= 1 << index;
        let follow_children = match &spec {
            TrainingSpec::Pid {
                follow_children, ..
            } => u32::from(*follow_children),
            TrainingSpec::Cgroup(_) => 1,
        };
        self.bump_generation(index, follow_children)?;
        let baseline = self
            .maps
            .training_totals
            .get(&index, 0)
            .map_err(map_err("TRAINING_TOTALS"))?
            .iter()
            .copied()
            .collect();
        self.trainings.insert(
            id.to_owned(),
            Training {
                spec,
                index,
                seeded: 0,
                baseline,
            },
        );
        // Twice: the second pass enters the threads created between the
        // first pass's scan of /proc and the entry of their parent (which
        // the fork hook could not know yet).
        let found = self
            .refresh_training(id)
            .and_then(|_| self.refresh_training(id));
        match found {
            Ok(n) if n > 0 => Ok(()),
            Ok(_) => {
                let spec = self.trainings[id].spec.clone();
                self.remove_training(id)?;
                Err(ProbeError::NoTraining(format!("{spec:?}")))
            }
            Err(e) => {
                let _ = self.remove_training(id);
                Err(e)
            }
        }
    }

    /// Stops metering training `id`: its jobs and its threads leave the
    /// kernel's tables, and its index is free for the next registration.
    /// Returns the keys of the jobs that were metered against it.
    pub fn remove_training(&mut self, id: &str) -> Result<Vec<String>, ProbeError> {
        let Some(training) = self.trainings.get(id) else {
            return Err(ProbeError::NoSuchTraining(id.to_owned()));
        };
        let index = training.index;
        let jobs: Vec<String> = self
            .jobs
            .iter()
            .filter(|(_, j)| j.training == id)
            .map(|(k, _)| k.clone())
            .collect();
        for job in &jobs {
            self.remove_job(job)?;
        }
        self.forget_threads(index)?;
        self.trainings.remove(id);
        // The old generation's waiters are dropped on each CPU at its next
        // switch, instead of keeping that CPU off the fast path until the
        // index is used again.
        self.bump_generation(index, 0)?;
        Ok(jobs)
    }

    /// Starts a new generation of training `index` (see the kernel
    /// module's doc on the reuse of an index).
    fn bump_generation(&mut self, index: u32, follow_children: u32) -> Result<(), ProbeError> {
        let conf = &mut self.maps.training_conf;
        let old = conf.get(&index, 0).map_err(map_err("TRAINING_CONF"))?;
        conf.set(
            index,
            TrainingConf {
                generation: old.generation.wrapping_add(1),
                follow_children,
            },
            0,
        )
        .map_err(map_err("TRAINING_CONF"))
    }

    /// Removes every thread of training `index` from the kernel's tables.
    fn forget_threads(&mut self, index: u32) -> Result<(), ProbeError> {
        let slots = &mut self.maps.training_slots;
        for i in 0..TRAINING_SLOT_COUNT {
            let task = slots.get(&i, 0).map_err(map_err("TRAINING_SLOTS"))?;
            if task.tid != 0 && task.training == index {
                slots
                    .set(i, TrainingTask::default(), 0)
                    .map_err(map_err("TRAINING_SLOTS"))?;
            }
        }
        let tasks = &mut self.maps.training_tasks;
        let stale: Vec<u32> = tasks
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, task)| task.training == index)
            .map(|(tid, _)| tid)
            .collect();
        for tid in stale {
            match tasks.remove(&tid) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(aya::maps::MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(map_err("TRAINING_TASKS")(e)),
            }
        }
        Ok(())
    }

    /// The trainings metered now, by id.
    pub fn trainings(&self) -> impl Iterator<Item = (&str, &TrainingSpec)> {
        self.trainings.iter().map(|(id, t)| (id.as_str(), &t.spec))
    }

    /// Registrations refused since the programs were loaded because
    /// `MAX_TRAININGS` trainings were metered.
    pub fn trainings_refused(&self) -> u64 {
        self.trainings_refused
    }

    /// Adds the threads of training `id` that the kernel does not know yet
    /// (the fork hook finds new ones at once; this catches threads moved
    /// into a training cgroup): into their slot when it is free, else into
    /// the overflow map. Existing entries are left untouched (a thread
    /// already entered for another training stays in that one). Returns how
    /// many threads the training has now.
    pub fn refresh_training(&mut self, id: &str) -> Result<usize, ProbeError> {
        let training = self
            .trainings
            .get_mut(id)
            .ok_or_else(|| ProbeError::NoSuchTraining(id.to_owned()))?;
        let index = training.index;
        let tids = training_tids(&training.spec);
        // The maps key threads by their kernel pid_t, as u32.
        let seed = |tid: Pid| TrainingTask {
            state: TASK_UNKNOWN,
            cpu: 0,
            since_ns: 0,
            tid: tid.as_u32(),
            training: index,
        };
        let mut overflow = Vec::new();
        let mut new_tgids = BTreeSet::new();
        {
            let slots = &mut self.maps.training_slots;
            for &tid in &tids {
                let slot = tid.as_u32() % TRAINING_SLOT_COUNT;
                let held = slots.get(&slot, 0).map_err(map_err("TRAINING_SLOTS"))?.tid;
                if held == tid.as_u32() {
                    continue;
                }
                if held != 0 {
                    overflow.push(tid);
                    continue;
                }
                slots
                    .set(slot, seed(tid), 0)
                    .map_err(map_err("TRAINING_SLOTS"))?;
                training.seeded += 1;
                new_tgids.extend(tgid_of(tid));
            }
        }
        let tasks = &mut self.maps.training_tasks;
        for tid in overflow {
            match tasks.insert(tid.as_u32(), seed(tid), BPF_NOEXIST) {
                Ok(()) => {
                    training.seeded += 1;
                    new_tgids.extend(tgid_of(tid));
                }
                Err(aya::maps::MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
                Err(aya::maps::MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::E2BIG) =>
                {
                    tracing::warn!(%tid, "training thread table full; thread not tracked");
                }
                Err(e) => return Err(map_err("TRAINING_TASKS")(e)),
            }
        }
        self.add_to_filter(new_tgids)?;
        Ok(tids.len())
    }

    /// Enters training TGIDs in the kernel's direct-mapped filter; a slot
    /// taken by another TGID switches the filter off (slower, never wrong).
    fn add_to_filter(&mut self, tgids: BTreeSet<Pid>) -> Result<(), ProbeError> {
        if tgids.is_empty() {
            return Ok(());
        }
        let filter = &mut self.maps.tgid_filter;
        for tgid in tgids.into_iter().map(Pid::as_u32) {
            let index = tgid % TGID_FILTER_SLOTS;
            let current = filter.get(&index, 0).map_err(map_err("TGID_FILTER"))?;
            if current == tgid {
                continue;
            }
            if current == 0 {
                filter.set(index, tgid, 0).map_err(map_err("TGID_FILTER"))?;
            } else {
                tracing::debug!(tgid, current, "TGID filter collision: filter bypassed");
                filter
                    .set(TGID_FILTER_SLOTS, 1, 0)
                    .map_err(map_err("TGID_FILTER"))?;
            }
        }
        Ok(())
    }

    /// Starts attributing the wait of training `training` to `key`: the
    /// tasks of `cgroup` (and, when its level is known, of its
    /// descendants). A job is charged its own training's wait only.
    pub fn add_job(
        &mut self,
        training: &str,
        key: &str,
        cgroup: JobCgroup,
    ) -> Result<(), ProbeError> {
        let index = self
            .trainings
            .get(training)
            .ok_or_else(|| ProbeError::NoSuchTraining(training.to_owned()))?
            .index;
        if self.jobs.contains_key(key) {
            self.remove_job(key)?;
        }
        let used: BTreeSet<u32> = self.jobs.values().map(|j| j.slot).collect();
        let slot = (0..MAX_JOBS)
            .find(|s| !used.contains(s))
            .ok_or(ProbeError::TooManyJobs(MAX_JOBS))?;
        let baseline = self.slot_counters(slot)?;
        self.maps
            .jobs
            .insert(
                cgroup.id,
                JobRef {
                    slot,
                    training: index,
                },
                0,
            )
            .map_err(map_err("JOBS"))?;
        self.jobs.insert(
            key.to_owned(),
            Job {
                training: training.to_owned(),
                slot,
                ids: BTreeSet::from([cgroup.id]),
                cgroup,
                baseline,
                cgroups_dropped: 0,
            },
        );
        self.write_levels()?;
        self.refresh_job_cgroups()
    }

    /// Without the ancestor helper, enters the child cgroups of every job
    /// (games) in `JOBS`; they are found by walking the job's directory.
    fn refresh_job_cgroups(&mut self) -> Result<(), ProbeError> {
        if self.ancestors {
            return Ok(());
        }
        let jobs_map = &mut self.maps.jobs;
        for job in self.jobs.values_mut() {
            let Some(dir) = &job.cgroup.dir else { continue };
            let Some(index) = self.trainings.get(&job.training).map(|t| t.index) else {
                continue;
            };
            let entry = JobRef {
                slot: job.slot,
                training: index,
            };
            let mut found = Vec::new();
            collect_child_cgroup_ids(dir, &mut found, 0);
            for id in found {
                if job.ids.contains(&id) {
                    continue;
                }
                match jobs_map.insert(id, entry, 0) {
                    Ok(()) => {
                        job.ids.insert(id);
                    }
                    Err(e) => {
                        job.cgroups_dropped += 1;
                        tracing::warn!(id, error = %e, "job cgroup table full: a child cgroup of a job is not metered");
                    }
                }
            }
        }
        Ok(())
    }

    /// Stops attributing steal to `key`; its counters are gone.
    pub fn remove_job(&mut self, key: &str) -> Result<(), ProbeError> {
        let Some(job) = self.jobs.remove(key) else {
            return Ok(());
        };
        for id in &job.ids {
            match self.maps.jobs.remove(id) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(aya::maps::MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(map_err("JOBS")(e)),
            }
        }
        self.write_levels()
    }

    fn write_levels(&mut self) -> Result<(), ProbeError> {
        let levels: BTreeSet<u32> = self
            .jobs
            .values()
            .filter_map(|j| j.cgroup.level)
            .filter(|&l| l > 0)
            .collect();
        if levels.len() > MAX_JOB_LEVELS as usize {
            tracing::warn!(
                ?levels,
                "job cgroups at more than {MAX_JOB_LEVELS} depths: tasks in child cgroups of the deepest ones are not matched"
            );
        }
        let array = &mut self.maps.job_levels;
        let mut it = levels.into_iter();
        for i in 0..MAX_JOB_LEVELS {
            array
                .set(i, it.next().unwrap_or(0), 0)
                .map_err(map_err("JOB_LEVELS"))?;
        }
        Ok(())
    }

    fn slot_counters(&self, slot: u32) -> Result<JobCounters, ProbeError> {
        let values = self
            .maps
            .job_steal
            .get(&slot, 0)
            .map_err(map_err("JOB_STEAL"))?;
        Ok(values
            .iter()
            .fold(JobCounters::default(), |acc, v| JobCounters {
                steal_ns: acc.steal_ns + v.steal_ns,
                preemptions: acc.preemptions + v.preemptions,
            }))
    }

    /// Reads training `id`'s counters and those of its jobs (cumulative,
    /// since it was registered).
    pub fn read(&mut self, id: &str) -> Result<StealSnapshot, ProbeError> {
        let shared = self.read_shared()?;
        self.read_training(id, &shared)
    }

    /// Reads every training's counters; a training whose read failed is
    /// reported with its error, the others are still read.
    pub fn read_all(&mut self) -> BTreeMap<String, Result<StealSnapshot, ProbeError>> {
        let ids: Vec<String> = self.trainings.keys().cloned().collect();
        match self.read_shared() {
            Ok(shared) => ids
                .into_iter()
                .map(|id| {
                    let snapshot = self.read_training(&id, &shared);
                    (id, snapshot)
                })
                .collect(),
            Err(e) => {
                let reason = e.to_string();
                ids.into_iter()
                    .map(|id| (id, Err(ProbeError::Read(reason.clone()))))
                    .collect()
            }
        }
    }

    /// What every training's reading needs: the time, each CPU's running
    /// training slice, the node-wide counters.
    fn read_shared(&mut self) -> Result<SharedReading, ProbeError> {
        self.refresh_job_cgroups()?;
        let at = monotonic_now();
        let now_ns = at.as_nanos() as u64;
        let mut running = Vec::with_capacity(self.nr_cpus);
        for cpu in 0..self.nr_cpus {
            let w = self
                .maps
                .cpu_wait
                .get(&(cpu as u32), 0)
                .map_err(map_err("CPU_WAIT"))?;
            if w.training_since_ns == 0 {
                running.push(None);
                continue;
            }
            // The programs' timestamps are this CPU's run-queue clock, last
            // calibrated against CLOCK_MONOTONIC (ktime) within a second.
            let now = (now_ns + w.calibrated_clock_ns).saturating_sub(w.calibrated_ktime_ns);
            let slice = now.saturating_sub(w.training_since_ns);
            running.push(Some((w.running_training as u32, slice)));
        }
        let node = self
            .maps
            .training_totals
            .get(&NODE_TOTALS, 0)
            .map_err(map_err("TRAINING_TOTALS"))?;
        let cpu_out_of_range = node.iter().map(|t| t.cpu_out_of_range).sum();
        Ok(SharedReading {
            at,
            running,
            cpu_out_of_range,
        })
    }

    fn read_training(
        &mut self,
        id: &str,
        shared: &SharedReading,
    ) -> Result<StealSnapshot, ProbeError> {
        if matches!(
            self.trainings.get(id).map(|t| &t.spec),
            Some(TrainingSpec::Cgroup(_))
        ) {
            self.refresh_training(id)?;
        }
        let training = self
            .trainings
            .get(id)
            .ok_or_else(|| ProbeError::NoSuchTraining(id.to_owned()))?;
        let per_cpu = self
            .maps
            .training_totals
            .get(&training.index, 0)
            .map_err(map_err("TRAINING_TOTALS"))?;
        let mut t = TrainingTotals::default();
        let mut on_cpu_per_cpu: Vec<u64> = Vec::with_capacity(self.nr_cpus);
        let zero = TrainingTotals::default();
        for (cpu, v) in per_cpu.iter().take(self.nr_cpus).enumerate() {
            let b = training.baseline.get(cpu).unwrap_or(&zero);
            let since = |now: u64, then: u64| now.saturating_sub(then);
            on_cpu_per_cpu.push(since(v.on_cpu_ns, b.on_cpu_ns));
            t.on_cpu_ns += since(v.on_cpu_ns, b.on_cpu_ns);
            t.runq_wait_ns += since(v.runq_wait_ns, b.runq_wait_ns);
            t.attributed_wait_ns += since(v.attributed_wait_ns, b.attributed_wait_ns);
            t.threads_dropped += since(v.threads_dropped, b.threads_dropped);
            t.waiter_underflow += since(v.waiter_underflow, b.waiter_underflow);
            t.threads_forked += since(v.threads_forked, b.threads_forked);
            t.threads_exited += since(v.threads_exited, b.threads_exited);
            t.migrations += since(v.migrations, b.migrations);
        }
        // Slices in progress: a thread that spins alone on a CPU is switched
        // out rarely, and its time must not show up only then.
        let mut running_ns = 0;
        for (cpu, total) in on_cpu_per_cpu.iter_mut().enumerate() {
            if let Some(Some((index, slice))) = shared.running.get(cpu)
                && *index == training.index
            {
                running_ns += slice;
                *total += slice;
            }
        }
        // Seeded threads join the kernel's forked ones; exits leave both.
        let threads = (training.seeded + t.threads_forked).saturating_sub(t.threads_exited);
        let mut jobs = BTreeMap::new();
        let mut job_cgroups_dropped = 0;
        for (key, job) in self.jobs.iter().filter(|(_, j)| j.training == id) {
            let c = self.slot_counters(job.slot)?;
            job_cgroups_dropped += job.cgroups_dropped;
            jobs.insert(
                key.clone(),
                JobCounters {
                    steal_ns: c.steal_ns.saturating_sub(job.baseline.steal_ns),
                    preemptions: c.preemptions.saturating_sub(job.baseline.preemptions),
                },
            );
        }
        Ok(StealSnapshot {
            at: shared.at,
            training: TrainingCounters {
                on_cpu_ns: t.on_cpu_ns + running_ns,
                runq_wait_ns: t.runq_wait_ns,
                attributed_wait_ns: t.attributed_wait_ns,
                threads,
                threads_forked: t.threads_forked,
                threads_exited: t.threads_exited,
                migrations: t.migrations,
            },
            training_on_cpu_per_cpu_ns: on_cpu_per_cpu,
            jobs,
            overflow: Overflow {
                threads_dropped: t.threads_dropped,
                cpu_out_of_range: shared.cpu_out_of_range,
                waiter_underflow: t.waiter_underflow,
                job_cgroups_dropped,
            },
        })
    }

    /// Per-program cost, meaningful while `kernel.bpf_stats_enabled` is 1.
    pub fn program_stats(&self) -> Vec<ProgramStats> {
        program_stats(&self.ebpf, self.programs.iter().copied())
    }
}

/// The part of a reading shared by all trainings.
struct SharedReading {
    at: Duration,
    /// Per CPU: the training index running there and its slice so far.
    running: Vec<Option<(u32, u64)>>,
    cpu_out_of_range: u64,
}

/// The tids of the training workload as /proc and cgroupfs show them now.
fn training_tids(spec: &TrainingSpec) -> Vec<Pid> {
    match spec {
        TrainingSpec::Pid {
            pid,
            follow_children,
        } => {
            let proc = ProcFs::new();
            let mut pids = vec![*pid];
            if *follow_children {
                pids.extend(proc.descendants(*pid).into_iter().map(|s| s.pid));
            }
            pids.into_iter().flat_map(|p| proc.threads(p)).collect()
        }
        TrainingSpec::Cgroup(dir) => {
            let mut tids = Vec::new();
            collect_cgroup_threads(dir, &mut tids, 0);
            tids
        }
    }
}

/// The thread group of thread `tid`, from /proc.
fn tgid_of(tid: Pid) -> Option<Pid> {
    ProcFs::new().status(tid).ok()?.tgid
}

/// The ids (inode numbers) of the cgroups below `dir`.
fn collect_child_cgroup_ids(dir: &Path, out: &mut Vec<u64>, depth: u32) {
    use std::os::unix::fs::MetadataExt;
    if depth >= 32 {
        return;
    }
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            if let Ok(meta) = entry.metadata() {
                out.push(meta.ino());
            }
            collect_child_cgroup_ids(&entry.path(), out, depth + 1);
        }
    }
}

fn collect_cgroup_threads(dir: &Path, out: &mut Vec<Pid>, depth: u32) {
    // cgroup.threads in v2; `tasks` in v1.
    let list = std::fs::read_to_string(dir.join("cgroup.threads"))
        .or_else(|_| std::fs::read_to_string(dir.join("tasks")))
        .unwrap_or_default();
    out.extend(list.lines().filter_map(|l| l.trim().parse::<Pid>().ok()));
    if depth >= 32 {
        return;
    }
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            collect_cgroup_threads(&entry.path(), out, depth + 1);
        }
    }
}
