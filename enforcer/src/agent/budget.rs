//! The seam between the agent and its node-wide steal budget: one meter
//! for every job and one budget loop per protected training, shared by the
//! jobs that protect it ([`NodeBudget`]).
//!
//! How a job's CPU quota is applied: the budget never writes a cgroup
//! file. Each job has one actuator (`job::controls`), owned by the session
//! its shim runs. [`NodeBudget::tick`] returns per-job [`QuotaWish`]es; the
//! agent writes each changed wish atomically to the job's record
//! ([`WISH_FILE`]), and the session's [`ExternalBudget`] policy states it as
//! the job's `Budget` controls, merged there with the job's other policies
//! (its static `--cpu` ceiling, placement, duty cycle) and written through
//! that one actuator. So there stays one writer per cgroup file, and when
//! the agent dies the file stays: the job keeps the last wish (or its start
//! quota, before any). A job gets this policy instead of its own budget
//! loop only for a training the node budget [`holds`](NodeBudget::holds).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A training a client registered with `protect`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainingSpec {
    /// The training process, or
    pub pid: Option<i32>,
    /// the cgroup it runs in (path relative to the hierarchy root).
    pub cgroup: Option<PathBuf>,
    pub follow_children: bool,
    /// The file the training writes its step count to, for slowdown.
    pub progress_file: Option<PathBuf>,
    /// The share of the training's CPU time its jobs may take together.
    pub budget_fraction: f64,
    /// Who registered it (only they and root may protect or change it).
    pub owner_uid: u32,
}

/// The id of the training with this pid or cgroup (the pid wins): one
/// spelling for the agent's jobs and every [`NodeBudget`].
pub fn training_id(pid: Option<i32>, cgroup: Option<&std::path::Path>) -> Option<String> {
    match (pid, cgroup) {
        (Some(pid), _) => Some(format!("pid-{pid}")),
        (None, Some(cg)) => Some(format!("cgroup-{}", cg.display())),
        (None, None) => None,
    }
}

/// What the budget wants for one job at this tick.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct QuotaWish {
    /// CPU quota in CPUs; `None`: no quota from the budget.
    pub cpu: Option<f64>,
    /// Freeze the job (over budget with nothing left to give).
    pub freeze: bool,
}

/// The node's steal budgets, keyed by training id and job id. The agent
/// calls these from its one control loop; implementations must not block.
pub trait NodeBudget: Send {
    /// Registers (or updates) a training; returns its id, [`training_id`].
    fn register_training(&mut self, spec: TrainingSpec) -> Result<String, String>;
    /// A job protecting `training` started in `job_cgroup`: its directory
    /// in the v2 hierarchy (on a hybrid host, its v2 twin), whose tasks and
    /// child cgroups' tasks are metered; empty when the shim has not made it
    /// yet (the budget then finds it by the job's name).
    fn add_job(&mut self, training: &str, job: &str, job_cgroup: PathBuf) -> Result<(), String>;
    /// The job ended (or was found dead after a restart).
    fn remove_job(&mut self, job: &str);
    /// One control period: reads the meter, runs each training's loop and
    /// returns the quota each job should get.
    fn tick(&mut self) -> Vec<(String, QuotaWish)>;
    /// The budget part of `status`.
    fn status(&self) -> serde_json::Value;
    /// Whether this budget holds the jobs of `training` (they then get no
    /// budget loop of their own, only its wishes); `false` leaves each job
    /// its own loop, as without the agent.
    fn holds(&self, _training: &str) -> bool {
        false
    }
    /// Budget events since the last call, per job: `budget_exceeded`,
    /// `budget_recovered`; the agent streams them to subscribers.
    fn take_events(&mut self) -> Vec<(String, &'static str)> {
        Vec::new()
    }
    /// The metered trainings as typed values (what [`NodeBudget::status`]
    /// shows), for the metrics endpoint.
    fn trainings(&self) -> Vec<crate::budget::node::TrainingStatus> {
        Vec::new()
    }
    /// The meters' own health; their programs' cost only with
    /// `program_stats`.
    fn meter_health(&self, _program_stats: bool) -> Vec<crate::probe::node::MeterHealth> {
        Vec::new()
    }

    /// The steal figures of a job this budget holds, as of its last tick:
    /// the agent puts them in the job's report when it ends.
    fn job_figures(&self, _job: &str) -> Option<crate::budget::node::JobStealFigures> {
        None
    }

    /// The outcome of the agent's one load of the steal programs: the
    /// trainings registered meanwhile are metered from now on (`Ok`), or
    /// refused with the reason (`Err`).
    fn install_meter(&mut self, _meter: Result<crate::probe::steal::StealMeter, String>) {}
}

/// The budget of an agent whose trainings are not metered yet: it records
/// trainings and jobs and wishes nothing.
#[derive(Debug, Default)]
pub struct Unmetered {
    trainings: Vec<(String, TrainingSpec, Vec<String>)>,
}

impl NodeBudget for Unmetered {
    fn register_training(&mut self, spec: TrainingSpec) -> Result<String, String> {
        let id = training_id(spec.pid, spec.cgroup.as_deref())
            .ok_or_else(|| "protect needs a training pid or cgroup".to_owned())?;
        match self.trainings.iter_mut().find(|t| t.0 == id) {
            Some(t) => t.1 = spec,
            None => self.trainings.push((id.clone(), spec, Vec::new())),
        }
        Ok(id)
    }

    fn add_job(&mut self, training: &str, job: &str, _job_cgroup: PathBuf) -> Result<(), String> {
        let t = self
            .trainings
            .iter_mut()
            .find(|t| t.0 == training)
            .ok_or_else(|| format!("no training {training:?} is registered"))?;
        t.2.push(job.to_owned());
        Ok(())
    }

    fn remove_job(&mut self, job: &str) {
        for t in &mut self.trainings {
            t.2.retain(|j| j != job);
        }
    }

    fn tick(&mut self) -> Vec<(String, QuotaWish)> {
        Vec::new()
    }

    fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "trainings": self.trainings.iter().map(|(id, spec, jobs)| serde_json::json!({
                "id": id,
                "pid": spec.pid,
                "cgroup": spec.cgroup,
                "budget_fraction": spec.budget_fraction,
                "jobs": jobs,
            })).collect::<Vec<_>>()
        })
    }
}

/// The file in a job's record directory through which the agent hands the
/// job's shim its budget wish (written atomically by the agent, read by the
/// shim's session each control period).
pub const WISH_FILE: &str = "budget-wish.json";

/// The shim's side of the node budget: a policy of the job's session that
/// states the agent's latest [`QuotaWish`] as the job's `Budget` controls,
/// merged by the job's one actuator with its other policies. When the agent
/// dies the file stays, so the job keeps the last wish.
pub struct ExternalBudget {
    file: PathBuf,
    seen: Option<std::time::SystemTime>,
    /// The latest wish read.
    wish: Option<QuotaWish>,
}

impl ExternalBudget {
    pub fn new(file: PathBuf) -> Self {
        ExternalBudget {
            file,
            seen: None,
            wish: None,
        }
    }

    /// The wish in the file when it changed since the last call.
    pub fn poll(&mut self) -> Option<QuotaWish> {
        let meta = std::fs::symlink_metadata(&self.file).ok()?;
        let modified = meta.modified().ok()?;
        if !meta.is_file() || self.seen == Some(modified) {
            return None;
        }
        self.seen = Some(modified);
        let text = std::fs::read(&self.file).ok()?;
        match serde_json::from_slice(&text) {
            Ok(w) => Some(w),
            Err(error) => {
                tracing::warn!(file = %self.file.display(), %error, "ignoring an unreadable budget wish");
                None
            }
        }
    }
}

impl crate::job::Monitor for ExternalBudget {
    fn name(&self) -> &'static str {
        "node-budget"
    }

    fn start(
        &mut self,
        _job: &crate::job::monitor::JobInfo,
    ) -> Result<(), crate::job::monitor::MonitorError> {
        Ok(())
    }

    fn tick(
        &mut self,
        _sample: &crate::job::Sample,
        _ctx: &mut crate::job::monitor::TickContext<'_>,
    ) -> Result<crate::job::Wishes, crate::job::monitor::MonitorError> {
        if let Some(wish) = self.poll() {
            self.wish = Some(wish);
        }
        Ok(self
            .wish
            .iter()
            .map(|w| {
                (
                    crate::job::controls::Policy::Budget,
                    crate::job::controls::Controls {
                        quota: w.cpu,
                        frozen: w.freeze,
                        ..Default::default()
                    },
                )
            })
            .collect())
    }

    fn finish(&mut self, _report: &mut crate::report::Report) {}
}

/// The metered budgets: the node's one meter for every training, and one
/// budget loop per protected training, shared by its jobs (see `budget::node` for how a training's
/// quota is divided among them).
pub struct Metered {
    protections: crate::budget::protect::Protections,
    /// The programs' load: `None` while it runs, then its outcome.
    meter: Option<Result<(), String>>,
    /// Every registered training; while the programs load, those
    /// registered meanwhile (jobs re-adopted at the agent's start) are
    /// here only, and protected once they are in.
    specs: std::collections::BTreeMap<String, TrainingSpec>,
    /// Jobs added before their cgroup exists (the shim makes it): job →
    /// training, metered from the first tick that finds the cgroup.
    pending: std::collections::BTreeMap<String, String>,
    locate: JobLocator,
    /// Budget events per job since the last `take_events`.
    events: Vec<(String, &'static str)>,
}

/// Where a job's v2 cgroup directory is, by job id, once it exists.
pub type JobLocator = Box<dyn Fn(&str) -> Option<PathBuf> + Send>;

impl std::fmt::Debug for Metered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metered")
            .field("protections", &self.protections)
            .field("pending", &self.pending)
            .finish_non_exhaustive()
    }
}

impl Metered {
    /// `period`: the agent's control period; `locate`: where a job's v2
    /// cgroup is (see [`Metered::subtree_locator`]).
    pub fn new(period: std::time::Duration, locate: JobLocator) -> Self {
        Self {
            protections: crate::budget::protect::Protections::new(period),
            meter: None,
            specs: std::collections::BTreeMap::new(),
            pending: std::collections::BTreeMap::new(),
            locate,
            events: Vec::new(),
        }
    }

    /// Finds a job where a session started from this process's cgroup
    /// subtree (`cgroup_root` as configured) puts a job of that name.
    pub fn subtree_locator(cgroup_root: Option<PathBuf>) -> JobLocator {
        Box::new(move |job| {
            let subtree = crate::cgroup::subtree::Subtree::open(cgroup_root.as_deref()).ok()?;
            let dir = subtree.job_location(job).ok()?.unified?;
            dir.is_dir().then_some(dir)
        })
    }

    /// Stops metering each training process that has exited and has no
    /// job left: nothing will be stolen from it again, its index in the
    /// meter is freed, and with the last one the programs are detached
    /// (attached, they cost every context switch on the node).
    /// Protecting it again (a new process with that pid) registers it anew.
    fn forget_ended_trainings(&mut self) {
        let ended: Vec<String> = self
            .specs
            .iter()
            .filter(|(id, spec)| {
                spec.pid
                    .is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
                    && self.protections.job_count(id) == 0
                    && !self.pending.values().any(|t| t == *id)
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in ended {
            self.specs.remove(&id);
            if !self.protections.is_protected(&id) {
                continue;
            }
            match self.protections.unprotect(&id) {
                Ok(_) => {
                    tracing::info!(training = %id, "the training ended: it is no longer metered")
                }
                Err(e) => {
                    tracing::warn!(training = %id, error = %e, "removing an ended training from the meter")
                }
            }
        }
    }

    /// Meters the pending jobs whose cgroup exists now.
    fn resolve_pending(&mut self) {
        if self.meter.is_none() {
            return;
        }
        let pending = std::mem::take(&mut self.pending);
        for (job, training) in pending {
            let Some(dir) = (self.locate)(&job) else {
                self.pending.insert(job, training);
                continue;
            };
            if let Err(e) = self.protections.add_job(&training, &job, &dir) {
                tracing::warn!(job, training, error = %e, "the job's steal is not metered");
            }
        }
    }

    /// Protects a training now that the programs are in.
    fn protect(
        &mut self,
        id: &str,
        training: crate::probe::steal::TrainingSpec,
        spec: &TrainingSpec,
    ) -> Result<(), String> {
        let protect = crate::budget::protect::Protect {
            id: id.to_owned(),
            training,
            budget: spec.budget_fraction,
            progress_file: spec.progress_file.clone(),
        };
        self.protections.protect(protect).map_err(|e| e.to_string())
    }
}

/// The meter's view of a training: its process, or its cgroup directory
/// (a path relative to the v2 hierarchy's root is taken from there).
fn meter_spec(spec: &TrainingSpec) -> Result<crate::probe::steal::TrainingSpec, String> {
    use crate::probe::steal::TrainingSpec as Meter;
    match (spec.pid, &spec.cgroup) {
        (Some(pid), _) => {
            let pid = crate::host::Pid::new(pid)
                .ok_or_else(|| format!("training pid {pid} is invalid"))?;
            Ok(Meter::Pid {
                pid,
                follow_children: spec.follow_children,
            })
        }
        (None, Some(cg)) => {
            let dir = if cg.is_absolute() && cg.is_dir() {
                cg.clone()
            } else {
                let relative = cg.strip_prefix("/").unwrap_or(cg);
                crate::probe::monitor::cgroup2_mount().join(relative)
            };
            if !dir.is_dir() {
                return Err(format!(
                    "training cgroup {} does not exist (looked at {})",
                    cg.display(),
                    dir.display()
                ));
            }
            Ok(Meter::Cgroup(dir))
        }
        (None, None) => Err("protect needs a training pid or cgroup".to_owned()),
    }
}

impl NodeBudget for Metered {
    fn register_training(&mut self, spec: TrainingSpec) -> Result<String, String> {
        let id = training_id(spec.pid, spec.cgroup.as_deref())
            .ok_or_else(|| "protect needs a training pid or cgroup".to_owned())?;
        if let Some(known) = self.specs.get(&id) {
            // Registered again (by a client, or re-adopted after a restart):
            // the same budget is the same training; another budget would
            // change it under the jobs that share it.
            if known.budget_fraction != spec.budget_fraction {
                return Err(format!(
                    "training {id} is already protected with budget {:.1}%, not {:.1}%",
                    known.budget_fraction * 100.0,
                    spec.budget_fraction * 100.0
                ));
            }
            return Ok(id);
        }
        let training = meter_spec(&spec)?;
        match &self.meter {
            None => {
                tracing::info!(training = %id, "the training is metered once the steal programs are loaded");
            }
            Some(Err(reason)) => {
                return Err(format!(
                    "training {id}: the node's steal programs could not be loaded ({reason}); this agent meters no steal"
                ));
            }
            Some(Ok(())) => self.protect(&id, training, &spec)?,
        }
        self.specs.insert(id.clone(), spec);
        Ok(id)
    }

    fn install_meter(&mut self, meter: Result<crate::probe::steal::StealMeter, String>) {
        match meter {
            Ok(meter) => {
                self.protections.install_meter(meter);
                self.meter = Some(Ok(()));
                let waiting = std::mem::take(&mut self.specs);
                for (id, spec) in waiting {
                    let protected = meter_spec(&spec).and_then(|t| self.protect(&id, t, &spec));
                    match protected {
                        Ok(()) => {
                            self.specs.insert(id, spec);
                        }
                        Err(error) => {
                            tracing::warn!(training = %id, %error, "the training is not metered");
                            self.pending.retain(|_, t| *t != id);
                        }
                    }
                }
            }
            Err(reason) => {
                for id in std::mem::take(&mut self.specs).into_keys() {
                    tracing::warn!(training = %id, "the training is not metered: the steal programs could not be loaded");
                }
                self.pending.clear();
                self.meter = Some(Err(reason));
            }
        }
    }

    fn add_job(&mut self, training: &str, job: &str, job_cgroup: PathBuf) -> Result<(), String> {
        if self.meter.is_none() && self.specs.contains_key(training) {
            self.pending.insert(job.to_owned(), training.to_owned());
            return Ok(());
        }
        if !self.protections.is_protected(training) {
            return Err(format!("no training {training:?} is protected"));
        }
        if job_cgroup.is_dir() {
            return self
                .protections
                .add_job(training, job, &job_cgroup)
                .map_err(|e| e.to_string());
        }
        // Not made yet: found by the locator at a later tick.
        self.pending.insert(job.to_owned(), training.to_owned());
        Ok(())
    }

    fn remove_job(&mut self, job: &str) {
        self.pending.remove(job);
        self.protections.remove_job(job);
    }

    fn tick(&mut self) -> Vec<(String, QuotaWish)> {
        self.resolve_pending();
        self.forget_ended_trainings();
        let tick = self.protections.tick(std::time::Instant::now());
        for e in &tick.events {
            let name = match e.event {
                enforcer_model::BudgetEvent::Exceeded { .. } => "budget_exceeded",
                enforcer_model::BudgetEvent::Recovered { .. } => "budget_recovered",
            };
            self.events
                .extend(e.jobs.iter().map(|job| (job.clone(), name)));
        }
        tick.wishes
            .into_iter()
            .map(|w| {
                let wish = QuotaWish {
                    cpu: w.quota,
                    freeze: w.frozen,
                };
                (w.job, wish)
            })
            .collect()
    }

    fn holds(&self, training: &str) -> bool {
        self.protections.is_protected(training)
    }

    fn take_events(&mut self) -> Vec<(String, &'static str)> {
        std::mem::take(&mut self.events)
    }

    fn trainings(&self) -> Vec<crate::budget::node::TrainingStatus> {
        self.protections.status()
    }

    fn meter_health(&self, program_stats: bool) -> Vec<crate::probe::node::MeterHealth> {
        self.protections.meter_health(program_stats)
    }

    fn job_figures(&self, job: &str) -> Option<crate::budget::node::JobStealFigures> {
        self.protections.job_figures(job)
    }

    fn status(&self) -> serde_json::Value {
        let trainings: Vec<serde_json::Value> = self
            .protections
            .status()
            .into_iter()
            .map(|t| {
                let spec = self.specs.get(&t.training);
                let mut v = serde_json::to_value(&t).unwrap_or_default();
                if let (Some(obj), Some(spec)) = (v.as_object_mut(), spec) {
                    let pending: Vec<&String> = self
                        .pending
                        .iter()
                        .filter(|(_, training)| **training == t.training)
                        .map(|(job, _)| job)
                        .collect();
                    obj.insert("pending_jobs".into(), serde_json::json!(pending));
                    obj.insert("id".into(), t.training.clone().into());
                    obj.insert("pid".into(), serde_json::json!(spec.pid));
                    obj.insert("cgroup".into(), serde_json::json!(spec.cgroup));
                    obj.insert("owner_uid".into(), spec.owner_uid.into());
                }
                v
            })
            .collect();
        serde_json::json!({ "trainings": trainings })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(pid: i32) -> TrainingSpec {
        TrainingSpec {
            pid: Some(pid),
            cgroup: None,
            follow_children: false,
            progress_file: None,
            budget_fraction: 0.05,
            owner_uid: 0,
        }
    }

    #[test]
    fn trainings_registered_while_the_programs_load_are_refused_with_the_reason_when_it_fails() {
        let mut budget = Metered::new(std::time::Duration::from_secs(1), Box::new(|_| None));
        let id = budget
            .register_training(spec(4242))
            .expect("accepted while loading");
        assert_eq!(id, "pid-4242");
        assert!(!budget.holds(&id), "not metered before the programs are in");
        budget
            .add_job(&id, "job-1", PathBuf::new())
            .expect("a job of a training that waits for the programs");

        budget.install_meter(Err("no BTF".to_owned()));
        assert!(!budget.holds(&id));
        assert!(budget.pending.is_empty(), "its job is not left pending");
        let refused = budget.register_training(spec(4242)).unwrap_err();
        assert!(refused.contains("no BTF"), "{refused}");
        assert!(budget.add_job(&id, "job-2", PathBuf::new()).is_err());
    }

    #[test]
    fn a_wish_is_read_once_per_change_of_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(WISH_FILE);
        let mut ext = ExternalBudget::new(file.clone());
        assert_eq!(ext.poll(), None, "no file: no wish");
        let wish = QuotaWish {
            cpu: Some(0.25),
            freeze: false,
        };
        std::fs::write(&file, serde_json::to_vec(&wish).unwrap()).unwrap();
        assert_eq!(ext.poll(), Some(wish));
        assert_eq!(ext.poll(), None, "unchanged: nothing new");
    }
}
