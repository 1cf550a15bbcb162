//! The subtree this agent owns, and where job cgroups go in it.
//!
//! By default the agent owns the cgroup it was started in, per hierarchy,
//! like a systemd service with `Delegate=yes`; `cgroup_root` (a path as in
//! `/proc/self/cgroup`) names another one.
//!
//! - v1 / hybrid: jobs are `<own>/enforcer/<job>` in each controller
//!   hierarchy (and in the unified one on hybrid hosts).
//! - v2: a cgroup with processes cannot delegate controllers to children (no
//!   internal processes), so the agent first moves itself into the leaf
//!   `<own>/agent` (away from the root, never towards it), enables the
//!   controllers in `<own>`, and makes jobs under `<own>/eval/<job>`. The
//!   root cgroup is exempt from that rule, so there the agent stays put.

use std::{
    collections::BTreeMap,
    ffi::OsStr,
    path::{Path, PathBuf},
};

use super::{
    CgroupError, CgroupMode, JobCgroup, JobLocation, Layout, MAIN_LEAF,
    fs::CgFs,
    v1::{self, V1Job},
    v2::{self, V2Job},
};
use crate::host::{ProcCgroup, ProcFs};

/// The v1 directory under `<own>` that holds the jobs.
pub const V1_BASE: &str = "enforcer";
/// The v2 leaf the agent moves itself into.
pub const V2_AGENT: &str = "agent";
/// The v2 directory under `<own>` that holds the jobs.
pub const V2_BASE: &str = "eval";

#[derive(Debug)]
pub struct Subtree {
    pub layout: Layout,
    fs: CgFs,
    bases: Bases,
}

#[derive(Debug)]
enum Bases {
    V2(PathBuf),
    V1 {
        per_controller: BTreeMap<String, PathBuf>,
        unified: Option<PathBuf>,
    },
}

/// The evaluation slice's CPU class: idle (`cpu.idle`, else the lowest
/// weight), or the normal class at a weight. A job lifted out of the idle
/// class takes the slice with it at the lowest weight, since the slice is
/// what competes with the training.
///
/// Jobs side by side share the slice, and may belong to different
/// enforcer processes. So the slice stays out of the idle class while any
/// job in it is out (its own cgroup's `cpu.idle` reads 0: lifted by its
/// loop, or started without the idle class). A job going back, or a new
/// job starting in the idle class, leaves the slice out for the others.
/// No lock is needed. A lift writes its job's `cpu.idle` before it looks
/// at the slice, and whoever puts the slice back in the idle class looks at
/// the jobs again after writing. Between them, a lift made in the meantime
/// is always seen. Without `cpu.idle` (before 5.15) nothing tells a lifted
/// job apart, and the slice follows the job that changed last. Writes go
/// through the subtree's owned-roots handle.
#[derive(Debug, Clone)]
pub struct SliceClass {
    fs: CgFs,
    dir: PathBuf,
    /// `cpu.weight` (v2) or `cpu.shares` (v1)...
    weight_file: &'static str,
    /// ...its lowest value, the idle class's stand-in...
    lowest: &'static str,
    /// ...and a weight on the v2 scale in its units.
    scale: fn(u64) -> u64,
}

impl SliceClass {
    /// For a job lifted out of the idle class (its own cgroup already out):
    /// the slice goes out at the lowest weight. If the slice is out already,
    /// for another lifted job or at the weight of a job started without the
    /// idle class, it is left as it is.
    pub fn lift(&self) -> Result<(), CgroupError> {
        if reads_out_of_idle(&self.dir) {
            return Ok(());
        }
        self.write(false, 1)
    }

    /// For the job `job` going back to the idle class (its own cgroup is
    /// written after this), or for a new job starting in it (`None`): the
    /// slice goes back, unless another job in it is still out of the idle
    /// class. The jobs are looked at again after the write, because a job
    /// lifted in the meantime may have found the slice still out and left
    /// it; if one is out, the slice goes out again.
    pub fn lower(&self, job: Option<&OsStr>) -> Result<(), CgroupError> {
        if self.other_job_out_of_idle(job) {
            return Ok(());
        }
        self.write(true, 1)?;
        if self.other_job_out_of_idle(job) {
            tracing::debug!(slice = %self.dir.display(), "a job was lifted while the slice went back to the idle class: out again");
            self.write(false, 1)?;
        }
        Ok(())
    }

    /// Whether a job cgroup in the slice other than `except` reads
    /// `cpu.idle` 0. The files are the kernel's, in cgroups this agent
    /// made; a job whose file cannot be read counts as idle, and the hooks'
    /// cgroups (never in the idle class themselves) are not jobs.
    fn other_job_out_of_idle(&self, except: Option<&OsStr>) -> bool {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return false;
        };
        entries.flatten().any(|e| {
            let name = e.file_name();
            Some(name.as_os_str()) != except
                && !name.to_string_lossy().ends_with(HOOKS_SUFFIX)
                && e.file_type().is_ok_and(|t| t.is_dir())
                && reads_out_of_idle(&e.path())
        })
    }

    /// Idle, or out of it at `weight` (1..=10000, the v2 scale). A weight
    /// is written after `cpu.idle` is cleared: the kernel refuses one on an
    /// idle group. Without `cpu.idle` (before 5.15) the lowest weight
    /// stands in for the idle class.
    fn write(&self, idle: bool, weight: u64) -> Result<(), CgroupError> {
        let has_idle = self.dir.join("cpu.idle").exists();
        if has_idle {
            self.fs
                .write(&self.dir.join("cpu.idle"), if idle { "1" } else { "0" })?;
        }
        let file = self.dir.join(self.weight_file);
        if !file.exists() {
            return Ok(());
        }
        match (idle, has_idle) {
            (true, true) => Ok(()),
            (true, false) => self.fs.write(&file, self.lowest),
            (false, _) => self.fs.write(&file, &(self.scale)(weight).to_string()),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Whether the cgroup `dir` is out of the idle class: its `cpu.idle` reads
/// 0 (no file, before 5.15, or an unreadable one: not known to be out).
fn reads_out_of_idle(dir: &Path) -> bool {
    super::fs::read(&dir.join("cpu.idle")).is_ok_and(|v| v.trim() == "0")
}

impl Subtree {
    /// Detects the layout and prepares the subtree (on v2 this moves the
    /// calling process into `<own>/agent`).
    pub fn open(cgroup_root: Option<&Path>) -> Result<Self, CgroupError> {
        Self::open_with(Layout::detect()?, cgroup_root, std::process::id() as i32)
    }

    pub fn open_with(
        layout: Layout,
        cgroup_root: Option<&Path>,
        self_pid: i32,
    ) -> Result<Self, CgroupError> {
        let rooted = |mount: &Path, own: &Path| match cgroup_root {
            Some(r) => mount.join(r.strip_prefix("/").unwrap_or(r)),
            None => own.to_owned(),
        };
        match layout.mode {
            CgroupMode::Unified => {
                let mount = layout.unified_mount.clone().unwrap_or_default();
                let own = layout.unified_own.clone().unwrap_or_else(|| mount.clone());
                // The agent moved itself into `<own>/agent`, and the shims it
                // starts are born there: `<own>` is still the subtree they own.
                let own = match (own.file_name(), own.parent()) {
                    (Some(leaf), Some(parent))
                        if leaf == V2_AGENT && cgroup_root.is_none() && own != mount =>
                    {
                        parent.to_owned()
                    }
                    _ => own,
                };
                let own = rooted(&mount, &own);
                let fs = CgFs::new(vec![own.clone()]);
                let base = prepare_v2(&fs, &own, own == mount, cgroup_root.is_none(), self_pid)?;
                Ok(Subtree {
                    layout,
                    fs,
                    bases: Bases::V2(base),
                })
            }
            CgroupMode::Hybrid | CgroupMode::Legacy => {
                let mut per_controller: BTreeMap<String, PathBuf> = BTreeMap::new();
                let mut owned = Vec::new();
                for c in v1::CONTROLLERS {
                    let Some(info) = layout.controllers.get(c) else {
                        continue;
                    };
                    if info.version != 1 {
                        continue;
                    }
                    if !info.usable {
                        // cpuacct is for statistics, cpuset for placement;
                        // the rest enforce.
                        if v1::OPTIONAL.contains(&c) {
                            continue;
                        }
                        return Err(CgroupError::Controller {
                            controller: c.to_owned(),
                            reason: info.reason.clone().unwrap_or_default(),
                        });
                    }
                    let own = rooted(&info.mount, &info.own_cgroup);
                    owned.push(own.clone());
                    per_controller.insert(c.to_owned(), own.join(V1_BASE));
                }
                for c in ["cpu", "memory", "pids"] {
                    if !per_controller.contains_key(c) {
                        return Err(CgroupError::Controller {
                            controller: c.to_owned(),
                            reason: "not mounted as a cgroup v1 hierarchy".to_owned(),
                        });
                    }
                }
                let unified = match (&layout.unified_mount, &layout.unified_own) {
                    (Some(m), Some(o)) => {
                        let own = rooted(m, o);
                        owned.push(own.clone());
                        Some(own.join(V1_BASE))
                    }
                    _ => None,
                };
                let fs = CgFs::new(owned);
                for base in per_controller.values().chain(unified.iter()) {
                    fs.mkdir(base)?;
                }
                if let Some(base) = per_controller.get("cpuset")
                    && let Err(error) = v1::init_cpuset_base(&fs, base)
                {
                    // Jobs still run everywhere, just never placed on CPUs
                    // (the empty base stays: it may hold other agents' jobs).
                    tracing::warn!(%error, "the v1 cpuset cannot hold jobs: not used");
                    per_controller.remove("cpuset");
                }
                Ok(Subtree {
                    layout,
                    fs,
                    bases: Bases::V1 {
                        per_controller,
                        unified,
                    },
                })
            }
        }
    }

    /// The roots every write is confined to.
    pub fn owned(&self) -> &[PathBuf] {
        self.fs.owned()
    }

    /// Creates the job cgroup `name` (refusing a name in use).
    pub fn create_job(&self, name: &str) -> Result<JobCgroup, CgroupError> {
        super::validate_name(name)?;
        self.create(name)
    }

    /// Creates the cgroup that job `job`'s `on_event` hooks run in: a
    /// sibling of the job named [`hooks_name`], which no job name can take.
    pub fn create_hooks(&self, job: &str) -> Result<JobCgroup, CgroupError> {
        super::validate_name(job)?;
        self.create(&hooks_name(job))
    }

    fn create(&self, name: &str) -> Result<JobCgroup, CgroupError> {
        match &self.bases {
            Bases::V2(base) => Ok(JobCgroup::V2(V2Job::create(self.fs.clone(), base, name)?)),
            Bases::V1 {
                per_controller,
                unified,
            } => Ok(JobCgroup::V1(V1Job::create(
                self.fs.clone(),
                per_controller,
                unified.as_deref(),
                name,
            )?)),
        }
    }

    /// Gives the whole evaluation slice (the parent of the job cgroups, which
    /// this subtree created) the CPU standing of the job being started: the
    /// idle class, or out of it at the job's weight (`--cpu-weight`; the
    /// default weight without one).
    ///
    /// A job's own `cpu.idle` or weight only ranks it among its siblings in
    /// the slice: the slice itself competes with the training, so it is the
    /// slice that must be idle or light (docs/measurements.md has what the
    /// contention bench showed; a job at weight 1 under a default-weight
    /// slice slowed the training more than no limit at all). A job started
    /// without the idle class sets the slice's weight, and of such jobs
    /// side by side the last one started wins. A job started in the idle
    /// class leaves the slice out of it while another job is out
    /// ([`SliceClass::lower`]). Without `cpu.idle` (before 5.15) the lowest
    /// weight stands in for the idle class. A weight is written after
    /// `cpu.idle` is cleared: the kernel refuses one on an idle group.
    pub fn set_slice_cpu(&self, idle: bool, weight: Option<u64>) -> Result<(), CgroupError> {
        let weight = weight.unwrap_or(100).clamp(1, 10_000);
        match self.slice_class() {
            Some(slice) if idle => slice.lower(None),
            Some(slice) => slice.write(false, weight),
            None => Ok(()),
        }
    }

    /// A handle on the slice's CPU class for a job's budget loop, which
    /// lifts the job (and so the slice) out of the idle class on trial and
    /// back (see [`SliceClass`]); `None` where jobs have no CPU controller.
    pub fn slice_class(&self) -> Option<SliceClass> {
        let (dir, weight_file, lowest, scale): (_, _, _, fn(u64) -> u64) = match &self.bases {
            Bases::V2(base) => (base.clone(), "cpu.weight", "1", |w| w),
            Bases::V1 { per_controller, .. } => (
                per_controller.get("cpu")?.clone(),
                "cpu.shares",
                "2",
                super::v1::shares,
            ),
        };
        Some(SliceClass {
            fs: self.fs.clone(),
            dir,
            weight_file,
            lowest,
            scale,
        })
    }

    /// Where the job `name` is (or would be) in each hierarchy: what
    /// [`Subtree::create_job`] makes.
    pub fn job_location(&self, name: &str) -> Result<JobLocation, CgroupError> {
        super::validate_name(name)?;
        Ok(match &self.bases {
            Bases::V2(base) => JobLocation {
                unified: Some(base.join(name)),
                controllers: BTreeMap::new(),
            },
            Bases::V1 {
                per_controller,
                unified,
            } => JobLocation {
                unified: unified.as_ref().map(|u| u.join(name)),
                controllers: per_controller
                    .iter()
                    .map(|(c, b)| (c.clone(), b.join(name)))
                    .collect(),
            },
        })
    }

    /// A handle on the existing job `name` of this subtree.
    pub fn open_job(&self, name: &str) -> Result<JobCgroup, CgroupError> {
        self.reopen_job(&self.job_location(name)?)
    }

    /// A handle on the job at `location` (an orphan to clean up), refused
    /// unless every directory of it is inside this subtree and of this
    /// subtree's cgroup mode: an enforcer never touches the jobs of another.
    pub fn reopen_job(&self, location: &JobLocation) -> Result<JobCgroup, CgroupError> {
        let outside = |path: &Path| CgroupError::OutsideSubtree {
            path: path.to_owned(),
            value: String::new(),
            owned: self.owned().to_vec(),
        };
        if let Some(dir) = location.dirs().find(|d| !self.fs.contains(d)) {
            return Err(outside(dir));
        }
        match &self.bases {
            Bases::V2(_) => match (&location.unified, location.controllers.values().next()) {
                (Some(dir), None) => Ok(JobCgroup::V2(V2Job::open(
                    self.fs.clone(),
                    dir.clone(),
                    dir.join(MAIN_LEAF),
                ))),
                (_, Some(dir)) => Err(outside(dir)),
                (None, None) => Err(outside(Path::new(""))),
            },
            Bases::V1 { .. } if location.controllers.is_empty() => Err(outside(
                location.unified.as_deref().unwrap_or(Path::new("")),
            )),
            Bases::V1 { .. } => Ok(JobCgroup::V1(V1Job::open(
                self.fs.clone(),
                location.controllers.clone(),
                location.unified.clone(),
                Some(MAIN_LEAF),
            ))),
        }
    }

    /// Where job `name` would live (for messages and tests).
    pub fn job_path(&self, name: &str) -> PathBuf {
        match &self.bases {
            Bases::V2(base) => base.join(name),
            Bases::V1 { per_controller, .. } => per_controller
                .get("memory")
                .map(|b| b.join(name))
                .unwrap_or_default(),
        }
    }
}

/// The suffix of hooks cgroups, refused at the end of job names.
pub const HOOKS_SUFFIX: &str = ".hooks";

/// The name of the cgroup job `job`'s hooks run in.
pub fn hooks_name(job: &str) -> String {
    format!("{job}{HOOKS_SUFFIX}")
}

/// On v2: moves this process out of `own` into `own/agent` (unless `own` is
/// the root cgroup or a configured `cgroup_root` we do not live in), enables
/// the controllers down to `own/eval`, and returns `own/eval`.
fn prepare_v2(
    fs: &CgFs,
    own: &Path,
    own_is_root: bool,
    we_live_in_own: bool,
    self_pid: i32,
) -> Result<PathBuf, CgroupError> {
    if we_live_in_own && !own_is_root {
        let agent = own.join(V2_AGENT);
        fs.mkdir(&agent)?;
        fs.write(&agent.join("cgroup.procs"), &self_pid.to_string())?;
        if let Err(e) = v2::enable_controllers(fs, own) {
            let others: Vec<i32> = super::fs::read(&own.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect();
            if !others.is_empty() {
                return Err(CgroupError::Busy {
                    own: own.to_owned(),
                    agent,
                    pids: others,
                });
            }
            return Err(e);
        }
    } else {
        v2::enable_controllers(fs, own)?;
    }
    let base = own.join(V2_BASE);
    fs.mkdir(&base)?;
    v2::enable_controllers(fs, &base)?;
    Ok(base)
}

/// The job cgroup the calling process runs in (its `main` leaf), for
/// `enforcer game`. Writes are confined to that job's directories.
pub fn current_job(layout: &Layout) -> Result<JobCgroup, CgroupError> {
    let proc = ProcFs::new();
    let membership = proc.self_cgroup().map_err(|e| CgroupError::Read {
        path: e.path,
        source: e.source,
    })?;
    current_job_from(layout, &membership)
}

pub fn current_job_from(
    layout: &Layout,
    membership: &ProcCgroup,
) -> Result<JobCgroup, CgroupError> {
    let membership = membership.by_controller();
    let job_dir = |mount: &Path, key: &str| -> Result<PathBuf, CgroupError> {
        let rel = membership.get(key).ok_or_else(|| {
            CgroupError::NotInJob(format!("no {key:?} line in /proc/self/cgroup"))
        })?;
        let own = mount.join(rel.trim_start_matches('/'));
        if own.file_name().and_then(|n| n.to_str()) != Some(MAIN_LEAF) {
            return Err(CgroupError::NotInJob(format!(
                "this process is in {} (not the {MAIN_LEAF:?} leaf of a job); run it inside `enforcer run`",
                own.display()
            )));
        }
        Ok(own.parent().map(Path::to_owned).unwrap_or_default())
    };
    match layout.mode {
        CgroupMode::Unified => {
            let mount = layout.unified_mount.clone().unwrap_or_default();
            let dir = job_dir(&mount, "")?;
            let fs = CgFs::new(vec![dir.clone()]);
            Ok(JobCgroup::V2(V2Job::open(
                fs,
                dir.clone(),
                dir.join(MAIN_LEAF),
            )))
        }
        CgroupMode::Hybrid | CgroupMode::Legacy => {
            let mut dirs = BTreeMap::new();
            for c in v1::CONTROLLERS {
                if let Some(info) = layout.controllers.get(c)
                    && info.version == 1
                    && membership.contains_key(c)
                {
                    dirs.insert(c.to_owned(), job_dir(&info.mount, c)?);
                }
            }
            let unified = match &layout.unified_mount {
                Some(m) if layout.mode == CgroupMode::Hybrid => Some(job_dir(m, "")?),
                _ => None,
            };
            let mut owned: Vec<PathBuf> = dirs.values().cloned().collect();
            owned.extend(unified.clone());
            Ok(JobCgroup::V1(V1Job::open(
                CgFs::new(owned),
                dirs,
                unified,
                Some(MAIN_LEAF),
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::cgroup::ControllerInfo;

    fn v2_layout(mount: &Path, own: &Path) -> Layout {
        Layout {
            mode: CgroupMode::Unified,
            unified_mount: Some(mount.to_owned()),
            unified_own: Some(own.to_owned()),
            controllers: BTreeMap::new(),
        }
    }

    /// A fake v2 service cgroup `svc` (with its `agent` leaf and `eval`
    /// base; fake mkdir does not make the kernel's files, so they are
    /// precreated) in a temporary cgroupfs.
    fn fake_v2_service() -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let own = d.path().join("svc");
        fs::create_dir(&own).unwrap();
        fs::write(own.join("cgroup.controllers"), "cpu memory pids").unwrap();
        fs::write(own.join("cgroup.procs"), "").unwrap();
        fs::write(own.join("cgroup.subtree_control"), "").unwrap();
        fs::create_dir(own.join(V2_AGENT)).unwrap();
        fs::write(own.join("agent/cgroup.procs"), "").unwrap();
        fs::create_dir(own.join(V2_BASE)).unwrap();
        fs::write(own.join("eval/cgroup.controllers"), "cpu memory pids").unwrap();
        fs::write(own.join("eval/cgroup.subtree_control"), "").unwrap();
        (d, own)
    }

    #[test]
    fn v2_agent_moves_itself_into_a_leaf_and_jobs_go_under_eval() {
        let (d, own) = fake_v2_service();
        let st = Subtree::open_with(v2_layout(d.path(), &own), None, 4242).unwrap();
        assert_eq!(
            fs::read_to_string(own.join("agent/cgroup.procs")).unwrap(),
            "4242"
        );
        assert_eq!(
            fs::read_to_string(own.join("cgroup.subtree_control")).unwrap(),
            "+cpu +memory +pids"
        );
        assert_eq!(st.job_path("j"), own.join("eval/j"));
        assert_eq!(st.owned(), std::slice::from_ref(&own));
    }

    #[test]
    fn a_process_already_in_the_agent_leaf_owns_the_service_cgroup() {
        let (d, own) = fake_v2_service();
        // The agent and the shims it starts run in `<own>/agent`.
        let st = Subtree::open_with(v2_layout(d.path(), &own.join(V2_AGENT)), None, 4242).unwrap();
        assert_eq!(st.job_path("j"), own.join("eval/j"));
        assert_eq!(st.owned(), std::slice::from_ref(&own));
        assert!(!own.join("agent/agent").exists());
        assert_eq!(
            fs::read_to_string(own.join("cgroup.subtree_control")).unwrap(),
            "+cpu +memory +pids"
        );
    }

    #[test]
    fn a_recorded_job_is_reopened_only_inside_this_subtree() {
        let (d, own) = fake_v2_service();
        let st = Subtree::open_with(v2_layout(d.path(), &own), None, 4242).unwrap();
        let here = st.job_location("j").unwrap();
        assert_eq!(here.unified.as_deref(), Some(own.join("eval/j").as_path()));
        assert!(here.controllers.is_empty());
        assert_eq!(st.reopen_job(&here).unwrap().path(), own.join("eval/j"));

        // A job of a sibling subtree, a path climbing out with `..`, and a
        // v1 record on a v2 subtree are all refused.
        let sibling = JobLocation {
            unified: Some(d.path().join("other/eval/j")),
            controllers: BTreeMap::new(),
        };
        let climbing = JobLocation {
            unified: Some(own.join("eval/../../other/eval/j")),
            controllers: BTreeMap::new(),
        };
        let v1 = JobLocation {
            unified: None,
            controllers: [("memory".to_owned(), own.join("enforcer/j"))].into(),
        };
        for loc in [sibling, climbing, v1] {
            let e = st.reopen_job(&loc).unwrap_err();
            assert!(matches!(e, CgroupError::OutsideSubtree { .. }), "{e}");
        }
    }

    #[test]
    fn slice_follows_the_job_into_the_idle_class_or_the_lowest_weight_without_cpu_idle() {
        let (d, own) = fake_v2_service();
        let weight = || fs::read_to_string(own.join("eval/cpu.weight")).unwrap();
        // A kernel before 5.15: no cpu.idle, only the weight.
        fs::write(own.join("eval/cpu.weight"), "100").unwrap();
        let st = Subtree::open_with(v2_layout(d.path(), &own), None, 4242).unwrap();
        st.set_slice_cpu(true, None).unwrap();
        assert_eq!(weight(), "1");
        st.set_slice_cpu(false, None).unwrap();
        assert_eq!(weight(), "100");
        // With cpu.idle, that is what changes; the weight is left alone
        // (the kernel refuses a weight on an idle group).
        fs::write(own.join("eval/cpu.idle"), "0").unwrap();
        st.set_slice_cpu(true, Some(5)).unwrap();
        assert_eq!(fs::read_to_string(own.join("eval/cpu.idle")).unwrap(), "1");
        assert_eq!(weight(), "100");
    }

    #[test]
    fn a_non_idle_job_gives_the_slice_its_weight_so_that_it_counts_against_the_training() {
        let (d, own) = fake_v2_service();
        let read = |f: &str| fs::read_to_string(own.join("eval").join(f)).unwrap();
        fs::write(own.join("eval/cpu.weight"), "100").unwrap();
        fs::write(own.join("eval/cpu.idle"), "1").unwrap();
        let st = Subtree::open_with(v2_layout(d.path(), &own), None, 4242).unwrap();
        st.set_slice_cpu(false, Some(1)).unwrap();
        assert_eq!(
            (read("cpu.idle").as_str(), read("cpu.weight").as_str()),
            ("0", "1")
        );
        // The next job without a weight puts the default back.
        st.set_slice_cpu(false, None).unwrap();
        assert_eq!(read("cpu.weight"), "100");
    }

    #[test]
    fn a_job_lifted_out_of_the_idle_class_takes_the_slice_to_the_lowest_weight_and_back() {
        let (d, own) = fake_v2_service();
        let read = |f: &str| fs::read_to_string(own.join("eval").join(f)).unwrap();
        fs::write(own.join("eval/cpu.weight"), "100").unwrap();
        fs::write(own.join("eval/cpu.idle"), "1").unwrap();
        let st = Subtree::open_with(v2_layout(d.path(), &own), None, 4242).unwrap();
        let slice = st.slice_class().expect("a v2 slice");
        slice.lift().unwrap();
        assert_eq!(
            (read("cpu.idle").as_str(), read("cpu.weight").as_str()),
            ("0", "1")
        );
        slice.lower(None).unwrap();
        assert_eq!(read("cpu.idle"), "1");
        // Without cpu.idle (before 5.15) the lowest weight is the idle
        // class's stand-in, and out of it the slice stays at that weight.
        fs::remove_file(own.join("eval/cpu.idle")).unwrap();
        fs::write(own.join("eval/cpu.weight"), "100").unwrap();
        slice.lift().unwrap();
        assert_eq!(read("cpu.weight"), "1");
        slice.lower(None).unwrap();
        assert_eq!(read("cpu.weight"), "1");
    }

    /// A fake v2 slice whose jobs' `cpu.idle` read as given, the slice
    /// itself out of the idle class at the lowest weight.
    fn slice_with_jobs(jobs: &[(&str, &str)]) -> (tempfile::TempDir, PathBuf, Subtree) {
        let (d, own) = fake_v2_service();
        fs::write(own.join("eval/cpu.weight"), "1").unwrap();
        fs::write(own.join("eval/cpu.idle"), "0").unwrap();
        for (job, idle) in jobs {
            fs::create_dir_all(own.join("eval").join(job)).unwrap();
            fs::write(own.join("eval").join(job).join("cpu.idle"), idle).unwrap();
        }
        let st = Subtree::open_with(v2_layout(d.path(), &own), None, 4242).unwrap();
        (d, own, st)
    }

    #[test]
    fn a_job_going_back_to_the_idle_class_leaves_the_slice_out_while_another_job_is_lifted() {
        let (_d, own, st) = slice_with_jobs(&[("a", "0"), ("b", "0")]);
        let idle = || fs::read_to_string(own.join("eval/cpu.idle")).unwrap();
        let slice = st.slice_class().unwrap();
        slice.lower(Some(OsStr::new("a"))).unwrap();
        assert_eq!(idle(), "0", "b is still lifted");
        fs::write(own.join("eval/b/cpu.idle"), "1").unwrap();
        slice.lower(Some(OsStr::new("a"))).unwrap();
        assert_eq!(idle(), "1", "no other job is out");
    }

    #[test]
    fn a_job_started_in_the_idle_class_does_not_put_the_slice_back_under_a_lifted_job() {
        let (_d, own, st) = slice_with_jobs(&[("lifted", "0"), ("new", "1")]);
        let read = |f: &str| fs::read_to_string(own.join("eval").join(f)).unwrap();
        st.set_slice_cpu(true, None).unwrap();
        assert_eq!(
            (read("cpu.idle").as_str(), read("cpu.weight").as_str()),
            ("0", "1")
        );
        // Once the lifted job is back, the next idle job takes the slice back.
        fs::write(own.join("eval/lifted/cpu.idle"), "1").unwrap();
        st.set_slice_cpu(true, None).unwrap();
        assert_eq!(read("cpu.idle"), "1");
    }

    #[test]
    fn a_lift_keeps_the_weight_a_job_started_out_of_the_idle_class_gave_the_slice() {
        let (_d, own, st) = slice_with_jobs(&[("weighted", "0"), ("lifted", "0")]);
        let read = |f: &str| fs::read_to_string(own.join("eval").join(f)).unwrap();
        fs::write(own.join("eval/cpu.weight"), "300").unwrap();
        st.slice_class().unwrap().lift().unwrap();
        assert_eq!(
            (read("cpu.idle").as_str(), read("cpu.weight").as_str()),
            ("0", "300")
        );
        // From the idle class, a lift takes the slice out at the lowest weight.
        fs::write(own.join("eval/cpu.idle"), "1").unwrap();
        st.slice_class().unwrap().lift().unwrap();
        assert_eq!(
            (read("cpu.idle").as_str(), read("cpu.weight").as_str()),
            ("0", "1")
        );
    }

    #[test]
    fn a_hooks_cgroup_out_of_the_idle_class_does_not_hold_the_slice_out() {
        let (_d, own, st) = slice_with_jobs(&[("a", "0"), ("b.hooks", "0")]);
        st.slice_class()
            .unwrap()
            .lower(Some(OsStr::new("a")))
            .unwrap();
        assert_eq!(fs::read_to_string(own.join("eval/cpu.idle")).unwrap(), "1");
    }

    #[test]
    fn v2_own_cgroup_with_other_processes_fails_naming_them() {
        let d = tempfile::tempdir().unwrap();
        let own = d.path().join("session.scope");
        fs::create_dir(&own).unwrap();
        fs::write(own.join("cgroup.procs"), "77\n78\n").unwrap();
        fs::create_dir(own.join(V2_AGENT)).unwrap();
        fs::write(own.join("agent/cgroup.procs"), "").unwrap();
        // No cgroup.controllers: the subtree_control write fails like the
        // kernel's EBUSY would.
        fs::create_dir(own.join("cgroup.subtree_control")).unwrap();
        fs::write(own.join("cgroup.controllers"), "cpu").unwrap();
        let e = Subtree::open_with(v2_layout(d.path(), &own), None, 1).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("[77, 78]") && msg.contains("cgroup_root"),
            "{msg}"
        );
    }

    #[test]
    fn game_finds_its_job_from_proc_self_cgroup_and_refuses_outside_a_job() {
        let d = tempfile::tempdir().unwrap();
        let mut controllers = BTreeMap::new();
        for c in ["cpu", "memory", "pids"] {
            controllers.insert(
                c.to_string(),
                ControllerInfo {
                    version: 1,
                    mount: d.path().join(c),
                    own_cgroup: d.path().join(c),
                    usable: true,
                    reason: None,
                },
            );
        }
        let layout = Layout {
            mode: CgroupMode::Hybrid,
            unified_mount: Some(d.path().join("unified")),
            unified_own: Some(d.path().join("unified")),
            controllers,
        };
        let job = current_job_from(
            &layout,
            &ProcCgroup::parse("3:cpu:/enforcer/j/main\n2:memory:/x/enforcer/j/main\n1:pids:/enforcer/j/main\n0::/enforcer/j/main\n"),
        )
        .unwrap();
        assert_eq!(job.path(), d.path().join("memory/x/enforcer/j"));
        assert_eq!(job.join_files().len(), 4);
        let e = current_job_from(
            &layout,
            &ProcCgroup::parse("3:cpu:/\n2:memory:/\n1:pids:/\n0::/\n"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("enforcer run"), "{e}");
    }
}
