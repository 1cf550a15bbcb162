//! What `enforcer top` shows, apart from how it is drawn: the rows built
//! from the agent's `status` answers, the rates derived from two answers
//! (in this one place), the client-side history, sorting, selection, the
//! keys and what they ask for.

use std::{
    collections::{BTreeMap, VecDeque},
    time::Duration,
};

use crate::agent::proto::{AgentCost, JobStatus, MeterState};

/// Samples of CPU use kept per job for its sparkline.
pub const HISTORY: usize = 24;

/// One `status` answer and when it came (a monotonic clock).
#[derive(Debug, Clone)]
pub struct Sample {
    pub at: Duration,
    pub jobs: Vec<JobStatus>,
    /// The budget part of `status`, as the agent's budget reports it.
    pub budget: serde_json::Value,
    pub agent: Option<AgentCost>,
    /// The agent's steal programs (`None` from an agent that does not say).
    pub meter: Option<MeterState>,
}

/// The columns the job table can be sorted by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortKey {
    Id,
    User,
    State,
    Memory,
    Cpu,
    Throttled,
    Steal,
}

impl SortKey {
    const ALL: [SortKey; 7] = [
        SortKey::Id,
        SortKey::User,
        SortKey::State,
        SortKey::Memory,
        SortKey::Cpu,
        SortKey::Throttled,
        SortKey::Steal,
    ];

    pub fn next(self) -> SortKey {
        let i = Self::ALL.iter().position(|k| *k == self).unwrap_or(0);
        Self::ALL[(i + 1) % Self::ALL.len()]
    }

    pub fn prev(self) -> SortKey {
        let i = Self::ALL.iter().position(|k| *k == self).unwrap_or(0);
        Self::ALL[(i + Self::ALL.len() - 1) % Self::ALL.len()]
    }

    /// Numbers sort largest first (what costs most on top), names A–Z.
    pub fn descending(self) -> bool {
        matches!(
            self,
            SortKey::Memory | SortKey::Cpu | SortKey::Throttled | SortKey::Steal
        )
    }
}

/// One protected training.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainingRow {
    pub id: String,
    /// The budget, a fraction.
    pub budget: Option<f64>,
    /// Stolen fraction of all its jobs together over the last 10 s.
    pub used: Option<f64>,
    /// ...over the last second.
    pub used_recent: Option<f64>,
    pub slowdown: Option<f64>,
    /// Cores its jobs may use together; `None`: unlimited.
    pub quota_cores: Option<f64>,
    pub phase: String,
    pub frozen: bool,
    pub jobs: usize,
}

/// The counters a rate is derived from, as of one sample.
#[derive(Debug, Clone, Copy)]
struct Counters {
    at: Duration,
    cpu_s: Option<f64>,
    throttled_s: Option<f64>,
    steal_s: Option<f64>,
}

/// One job.
#[derive(Debug, Clone)]
pub struct JobRow {
    pub id: String,
    pub uid: u32,
    pub user: String,
    /// `running` or `finished`.
    pub state: String,
    /// The exit status of a finished job.
    pub status: Option<u8>,
    pub training: Option<String>,
    pub memory: Option<u64>,
    pub memory_limit: Option<u64>,
    /// CPUs used since the previous sample.
    pub cpu_cores: Option<f64>,
    /// Share of the time since the previous sample its tasks spent held
    /// back by its CPU quota.
    pub throttled: Option<f64>,
    /// Seconds of the training's run-queue wait it caused per second.
    pub steal_rate: Option<f64>,
    /// Its part of its training's stolen fraction over the last second:
    /// the training's fraction split among its jobs by the steal each
    /// caused since the previous sample.
    pub stolen: Option<f64>,
    /// CPUs used, oldest first.
    pub history: VecDeque<f64>,
    /// The counters of the previous answer.
    last: Option<Counters>,
}

impl JobRow {
    pub fn running(&self) -> bool {
        self.state == "running"
    }
}

/// The agent's own cost.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgentRow {
    pub pid: u32,
    /// CPUs used by the agent process since the previous sample.
    pub cpu: Option<f64>,
    pub rss: Option<u64>,
    pub shims: u32,
    /// CPUs used by the shims; `None` when a shim came or went meanwhile.
    pub shims_cpu: Option<f64>,
    pub shims_rss: u64,
}

/// What the screen is in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    Normal,
    Help,
    /// Asking whether to cancel this job.
    Confirm(String),
}

/// A key, as the model sees it (the terminal's keys are mapped to these).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    Char(char),
    Up,
    Down,
    Home,
    End,
    Esc,
    Enter,
    /// Ctrl-C: raw mode turns it into a key.
    Interrupt,
}

/// What a key asks of the program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    None,
    Quit,
    /// Send the agent `cancel` for this job.
    Cancel(String),
}

/// Everything on the screen.
#[derive(Debug, Clone)]
pub struct Model {
    pub jobs: BTreeMap<String, JobRow>,
    pub trainings: Vec<TrainingRow>,
    pub agent: Option<AgentRow>,
    /// The agent's steal programs, as its last answer said.
    pub meter: Option<MeterState>,
    agent_last: Option<(Duration, AgentCost)>,
    pub sort: SortKey,
    pub selected: Option<String>,
    pub mode: Mode,
    /// The last thing to tell (a refusal, a lost agent); cleared by the
    /// next key.
    pub message: Option<String>,
    /// Whether the last attempt to reach the agent failed.
    pub disconnected: bool,
}

impl Default for Model {
    fn default() -> Self {
        Model {
            jobs: BTreeMap::new(),
            trainings: Vec::new(),
            agent: None,
            meter: None,
            agent_last: None,
            sort: SortKey::Cpu,
            selected: None,
            mode: Mode::Normal,
            message: None,
            disconnected: false,
        }
    }
}

/// A training's entries in the budget part of `status`, read leniently:
/// an agent whose budget does not meter gives fewer fields.
fn trainings_of(budget: &serde_json::Value) -> Vec<(TrainingRow, BTreeMap<String, f64>)> {
    let num = |v: &serde_json::Value, k: &str| v.get(k).and_then(serde_json::Value::as_f64);
    let Some(list) = budget.get("trainings").and_then(|t| t.as_array()) else {
        return Vec::new();
    };
    list.iter()
        .map(|t| {
            let jobs = t.get("jobs").and_then(|j| j.as_array());
            let steal: BTreeMap<String, f64> = jobs
                .into_iter()
                .flatten()
                .filter_map(|j| Some((j.get("job")?.as_str()?.to_owned(), num(j, "steal_s")?)))
                .collect();
            let id = t
                .get("id")
                .or_else(|| t.get("training"))
                .and_then(|v| v.as_str())
                .unwrap_or("?")
                .to_owned();
            let row = TrainingRow {
                id,
                budget: num(t, "budget").or_else(|| num(t, "budget_fraction")),
                used: num(t, "used"),
                used_recent: num(t, "used_recent"),
                slowdown: num(t, "slowdown"),
                quota_cores: num(t, "quota_cores"),
                phase: t
                    .get("phase")
                    .and_then(|v| v.as_str())
                    .unwrap_or("-")
                    .to_owned(),
                frozen: t
                    .get("frozen")
                    .and_then(serde_json::Value::as_bool)
                    .unwrap_or(false),
                // A non-root caller's status names only its own jobs and
                // counts the others'.
                jobs: jobs.map_or(0, Vec::len)
                    + t.get("other_jobs")
                        .and_then(serde_json::Value::as_u64)
                        .and_then(|n| usize::try_from(n).ok())
                        .unwrap_or(0),
            };
            (row, steal)
        })
        .collect()
}

/// `(now - before) / dt`, `None` without both or when it went backwards.
fn rate(now: Option<f64>, before: Option<f64>, dt: f64) -> Option<f64> {
    let d = now? - before?;
    (d >= 0.0 && dt > 0.0).then(|| d / dt)
}

impl Model {
    /// Takes a new `status` answer: rows are added, updated and dropped,
    /// rates derived from the previous answer. `user` names a uid.
    pub fn update(&mut self, sample: Sample, user: &mut dyn FnMut(u32) -> String) {
        if self.disconnected {
            self.disconnected = false;
            self.message = None;
        }
        let trainings = trainings_of(&sample.budget);
        let steal: BTreeMap<&str, f64> = trainings
            .iter()
            .flat_map(|(_, jobs)| jobs.iter().map(|(j, s)| (j.as_str(), *s)))
            .collect();
        let mut seen = Vec::with_capacity(sample.jobs.len());
        for job in sample.jobs {
            seen.push(job.id.clone());
            let usage = job.usage.clone().unwrap_or_default();
            let now = Counters {
                // The agent's reading time when it says (its readings may
                // be reused across answers), else the answer's.
                at: if usage.read_unix_ms > 0 {
                    Duration::from_millis(usage.read_unix_ms)
                } else {
                    sample.at
                },
                cpu_s: usage.cpu_s,
                throttled_s: usage.throttled_s,
                steal_s: steal.get(job.id.as_str()).copied(),
            };
            let row = self.jobs.entry(job.id.clone()).or_insert_with(|| JobRow {
                id: job.id.clone(),
                uid: job.uid,
                user: user(job.uid),
                state: String::new(),
                status: None,
                training: None,
                memory: None,
                memory_limit: None,
                cpu_cores: None,
                throttled: None,
                steal_rate: None,
                stolen: None,
                history: VecDeque::new(),
                last: None,
            });
            row.state = job.state;
            row.status = job.status;
            row.training = job.training;
            row.memory = usage.memory_bytes;
            row.memory_limit = usage.memory_limit_bytes;
            if row.last.is_some_and(|l| l.at >= now.at) {
                continue;
            }
            let before = row.last.replace(now);
            if !row.running() {
                row.cpu_cores = None;
                row.throttled = None;
                row.steal_rate = None;
                continue;
            }
            let Some(before) = before else { continue };
            let dt = now.at.saturating_sub(before.at).as_secs_f64();
            row.cpu_cores = rate(now.cpu_s, before.cpu_s, dt);
            row.throttled = rate(now.throttled_s, before.throttled_s, dt).map(|f| f.min(1.0));
            row.steal_rate = rate(now.steal_s, before.steal_s, dt);
            if let Some(c) = row.cpu_cores {
                if row.history.len() == HISTORY {
                    row.history.pop_front();
                }
                row.history.push_back(c);
            }
        }
        self.jobs.retain(|id, _| seen.contains(id));
        // A job's part of its training's fraction: by the steal each job
        // caused over the same interval.
        let mut stolen: BTreeMap<String, Option<f64>> = BTreeMap::new();
        for (t, _) in &trainings {
            let of_t: Vec<&JobRow> = self
                .jobs
                .values()
                .filter(|r| r.training.as_deref() == Some(t.id.as_str()) && r.running())
                .collect();
            let total: f64 = of_t.iter().filter_map(|r| r.steal_rate).sum();
            for r in of_t {
                let share = match (r.steal_rate, t.used_recent) {
                    (Some(s), Some(f)) if total > 0.0 => Some(f * s / total),
                    (Some(_), Some(_)) => Some(0.0),
                    _ => None,
                };
                stolen.insert(r.id.clone(), share);
            }
        }
        for r in self.jobs.values_mut() {
            r.stolen = stolen.remove(&r.id).flatten();
        }
        self.trainings = trainings.into_iter().map(|(t, _)| t).collect();
        self.meter = sample.meter;
        if let Some(cost) = sample.agent {
            let mut row = AgentRow {
                pid: cost.pid,
                rss: cost.rss_bytes,
                shims: cost.shims,
                shims_rss: cost.shims_rss_bytes,
                ..AgentRow::default()
            };
            if let Some((at, before)) = &self.agent_last {
                let dt = sample.at.saturating_sub(*at).as_secs_f64();
                row.cpu = rate(Some(cost.cpu_s), Some(before.cpu_s), dt);
                if before.shims == cost.shims && before.pid == cost.pid {
                    row.shims_cpu = rate(Some(cost.shims_cpu_s), Some(before.shims_cpu_s), dt);
                }
            }
            self.agent = Some(row);
            self.agent_last = Some((sample.at, cost));
        }
        self.keep_selection();
    }

    /// The agent could not be reached or answered badly.
    pub fn lost(&mut self, why: String) {
        self.disconnected = true;
        self.message = Some(why);
    }

    /// The agent's answer to a `cancel` of job `id`.
    pub fn cancelled(&mut self, id: &str, answer: Result<(), String>) {
        self.message = Some(match answer {
            Ok(()) => format!("job {id}: cancel sent (a second cancel kills the whole job)"),
            Err(why) => format!("job {id} not cancelled: {why}"),
        });
    }

    /// The job rows in the order of the sort column (ties by id).
    pub fn rows(&self) -> Vec<&JobRow> {
        let mut rows: Vec<&JobRow> = self.jobs.values().collect();
        let num = |r: &JobRow| -> Option<f64> {
            match self.sort {
                SortKey::Memory => r.memory.map(|m| m as f64),
                SortKey::Cpu => r.cpu_cores,
                SortKey::Throttled => r.throttled,
                SortKey::Steal => r.steal_rate,
                _ => None,
            }
        };
        rows.sort_by(|a, b| {
            let by_key = match self.sort {
                SortKey::Id => a.id.cmp(&b.id),
                SortKey::User => a.user.cmp(&b.user),
                // Running jobs first.
                SortKey::State => b.state.cmp(&a.state),
                _ => match (num(a), num(b)) {
                    (Some(x), Some(y)) => y.total_cmp(&x),
                    // Unknown values last.
                    (Some(_), None) => std::cmp::Ordering::Less,
                    (None, Some(_)) => std::cmp::Ordering::Greater,
                    (None, None) => std::cmp::Ordering::Equal,
                },
            };
            by_key.then_with(|| a.id.cmp(&b.id))
        });
        rows
    }

    /// Where the selected job is in [`Model::rows`].
    pub fn selected_index(&self) -> Option<usize> {
        let id = self.selected.as_ref()?;
        self.rows().iter().position(|r| &r.id == id)
    }

    fn keep_selection(&mut self) {
        if self.jobs.is_empty() {
            self.selected = None;
        } else if self.selected_index().is_none() {
            self.select_at(0);
        }
    }

    /// Selects row `i` (the last row when there are fewer).
    fn select_at(&mut self, i: usize) {
        let id = {
            let rows = self.rows();
            rows.get(i.min(rows.len().saturating_sub(1)))
                .map(|r| r.id.clone())
        };
        if id.is_some() {
            self.selected = id;
        }
    }

    /// What `key` does.
    pub fn on_key(&mut self, key: Key) -> Action {
        if key == Key::Interrupt {
            return Action::Quit;
        }
        match std::mem::replace(&mut self.mode, Mode::Normal) {
            Mode::Help => match key {
                Key::Char('q') => Action::Quit,
                _ => Action::None,
            },
            Mode::Confirm(id) => match key {
                Key::Char('y' | 'Y') => Action::Cancel(id),
                _ => {
                    self.message = Some(format!("job {id}: not cancelled"));
                    Action::None
                }
            },
            Mode::Normal => {
                self.message = None;
                self.normal_key(key)
            }
        }
    }

    fn normal_key(&mut self, key: Key) -> Action {
        let at = self.selected_index();
        match key {
            Key::Char('q') => return Action::Quit,
            Key::Char('s') => self.sort = self.sort.next(),
            Key::Char('S') => self.sort = self.sort.prev(),
            Key::Char('?') | Key::Char('h') => self.mode = Mode::Help,
            Key::Up | Key::Char('k') => self.select_at(at.map_or(0, |i| i.saturating_sub(1))),
            Key::Down | Key::Char('j') => self.select_at(at.map_or(0, |i| i + 1)),
            Key::Home => self.select_at(0),
            Key::End => self.select_at(usize::MAX),
            Key::Char('c') => match self.selected.as_ref().and_then(|id| self.jobs.get(id)) {
                Some(r) if r.running() => self.mode = Mode::Confirm(r.id.clone()),
                Some(r) => self.message = Some(format!("job {} has already ended", r.id)),
                None => self.message = Some("no job selected".to_owned()),
            },
            _ => {}
        }
        Action::None
    }
}

/// `1.5K`, `734M`, `1.0G`: binary units, three significant digits at most.
pub fn bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "K", "M", "G", "T"];
    let mut v = b as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 || v >= 100.0 {
        format!("{v:.0}{}", UNITS[unit])
    } else {
        format!("{v:.1}{}", UNITS[unit])
    }
}

/// `3.1%`, or `-` when unknown.
pub fn percent(f: Option<f64>) -> String {
    f.map_or_else(|| "-".to_owned(), |f| format!("{:.1}%", f * 100.0))
}

/// `0.58`, or `-` when unknown.
pub fn cores(c: Option<f64>) -> String {
    c.map_or_else(|| "-".to_owned(), |c| format!("{c:.2}"))
}

/// Memory as `current/limit` (`-` for no limit).
pub fn memory(current: Option<u64>, limit: Option<u64>) -> String {
    match (current, limit) {
        (None, _) => "-".to_owned(),
        (Some(c), None) => format!("{}/-", bytes(c)),
        (Some(c), Some(l)) => format!("{}/{}", bytes(c), bytes(l)),
    }
}

/// The samples as block characters, scaled to their largest (at least a
/// twentieth of a core, so that an idle job stays flat).
pub fn sparkline(samples: &VecDeque<f64>) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let top = samples.iter().copied().fold(0.05, f64::max);
    samples
        .iter()
        .map(|v| {
            let i = (v / top * (BARS.len() - 1) as f64).round();
            BARS[(i.max(0.0) as usize).min(BARS.len() - 1)]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::proto::JobUsage;

    fn job(id: &str, cpu_s: f64, mem: u64, training: Option<&str>) -> JobStatus {
        JobStatus {
            id: id.to_owned(),
            uid: 1000,
            command: vec!["true".to_owned()],
            state: "running".to_owned(),
            deadline_unix_ms: 0,
            status: None,
            training: training.map(str::to_owned),
            quota: None,
            usage: Some(JobUsage {
                read_unix_ms: 0,
                memory_bytes: Some(mem),
                memory_limit_bytes: Some(100 << 20),
                cpu_s: Some(cpu_s),
                throttled_s: Some(0.0),
                pids: Some(1),
            }),
        }
    }

    fn sample(at_ms: u64, jobs: Vec<JobStatus>, budget: serde_json::Value) -> Sample {
        Sample {
            at: Duration::from_millis(at_ms),
            jobs,
            budget,
            agent: None,
            meter: None,
        }
    }

    fn names(uid: u32) -> String {
        format!("u{uid}")
    }

    #[test]
    fn cpu_is_the_rate_between_two_answers_and_feeds_the_history() {
        let mut m = Model::default();
        m.update(
            sample(0, vec![job("a", 10.0, 1, None)], serde_json::Value::Null),
            &mut names,
        );
        assert_eq!(m.jobs["a"].cpu_cores, None, "one answer gives no rate");
        m.update(
            sample(2000, vec![job("a", 13.0, 1, None)], serde_json::Value::Null),
            &mut names,
        );
        assert_eq!(m.jobs["a"].cpu_cores, Some(1.5));
        assert_eq!(m.jobs["a"].history, [1.5]);
        assert_eq!(m.jobs["a"].user, "u1000");
        for i in 0..(HISTORY as u64 + 5) {
            m.update(
                sample(
                    3000 + i * 1000,
                    vec![job("a", 14.0 + i as f64, 1, None)],
                    serde_json::Value::Null,
                ),
                &mut names,
            );
        }
        assert_eq!(m.jobs["a"].history.len(), HISTORY, "the history is bounded");
    }

    #[test]
    fn a_job_gone_from_the_answer_goes_and_the_selection_moves_to_the_first_row() {
        let mut m = Model::default();
        let both = vec![job("a", 1.0, 1, None), job("b", 1.0, 1, None)];
        m.update(sample(0, both, serde_json::Value::Null), &mut names);
        m.on_key(Key::Down);
        assert_eq!(m.selected.as_deref(), Some("b"));
        m.update(
            sample(1000, vec![job("a", 1.0, 1, None)], serde_json::Value::Null),
            &mut names,
        );
        assert!(!m.jobs.contains_key("b"));
        assert_eq!(m.selected.as_deref(), Some("a"));
    }

    #[test]
    fn s_and_shift_s_cycle_the_sort_column_and_rows_follow_it() {
        let mut m = Model::default();
        let jobs = vec![
            job("a", 0.0, 300, None),
            job("b", 0.0, 100, None),
            job("c", 0.0, 200, None),
        ];
        m.update(sample(0, jobs, serde_json::Value::Null), &mut names);
        let ids = |m: &Model| m.rows().iter().map(|r| r.id.clone()).collect::<Vec<_>>();
        assert_eq!(m.sort, SortKey::Cpu);
        m.on_key(Key::Char('S'));
        m.on_key(Key::Char('S'));
        assert_eq!(m.sort, SortKey::State);
        m.on_key(Key::Char('s'));
        assert_eq!(m.sort, SortKey::Memory);
        assert_eq!(ids(&m), ["a", "c", "b"], "largest memory first");
        m.on_key(Key::Char('s'));
        m.on_key(Key::Char('s'));
        m.on_key(Key::Char('s'));
        m.on_key(Key::Char('s'));
        assert_eq!(m.sort, SortKey::Id, "cycles round");
        assert_eq!(ids(&m), ["a", "b", "c"]);
    }

    #[test]
    fn c_asks_first_and_only_y_cancels_the_selected_running_job() {
        let mut m = Model::default();
        m.update(
            sample(0, vec![job("a", 0.0, 1, None)], serde_json::Value::Null),
            &mut names,
        );
        assert_eq!(m.on_key(Key::Char('c')), Action::None);
        assert_eq!(m.mode, Mode::Confirm("a".to_owned()));
        assert_eq!(
            m.on_key(Key::Char('n')),
            Action::None,
            "anything but y declines"
        );
        assert_eq!(m.mode, Mode::Normal);
        m.on_key(Key::Char('c'));
        assert_eq!(m.on_key(Key::Char('y')), Action::Cancel("a".to_owned()));
        m.cancelled("a", Err("no job \"a\" of uid 1000".to_owned()));
        assert!(
            m.message.as_deref().unwrap().contains("no job"),
            "the refusal is shown"
        );

        let mut ended = job("a", 0.0, 1, None);
        ended.state = "finished".to_owned();
        ended.status = Some(143);
        m.update(
            sample(1000, vec![ended], serde_json::Value::Null),
            &mut names,
        );
        assert_eq!(m.on_key(Key::Char('c')), Action::None);
        assert_eq!(
            m.mode,
            Mode::Normal,
            "an ended job is not offered for cancel"
        );
        assert!(m.message.as_deref().unwrap().contains("already ended"));
    }

    #[test]
    fn q_and_ctrl_c_quit_and_help_is_closed_by_any_other_key() {
        let mut m = Model::default();
        assert_eq!(m.on_key(Key::Char('?')), Action::None);
        assert_eq!(m.mode, Mode::Help);
        assert_eq!(m.on_key(Key::Esc), Action::None);
        assert_eq!(m.mode, Mode::Normal);
        assert_eq!(m.on_key(Key::Char('q')), Action::Quit);
        m.on_key(Key::Char('c'));
        assert_eq!(m.on_key(Key::Interrupt), Action::Quit);
    }

    #[test]
    fn steal_is_a_rate_and_a_training_fraction_is_split_by_it() {
        let budget = |steal_a: f64, steal_b: f64| {
            serde_json::json!({"trainings": [{
                "id": "pid-7", "training": "pid-7", "budget": 0.05, "used": 0.03,
                "used_recent": 0.04, "slowdown": null, "quota_cores": 1.5,
                "frozen": false, "phase": "regulating",
                "jobs": [{"job": "a", "steal_s": steal_a}, {"job": "b", "steal_s": steal_b}]
            }]})
        };
        let jobs = || {
            vec![
                job("a", 0.0, 1, Some("pid-7")),
                job("b", 0.0, 1, Some("pid-7")),
            ]
        };
        let mut m = Model::default();
        m.update(sample(0, jobs(), budget(1.0, 1.0)), &mut names);
        m.update(sample(1000, jobs(), budget(1.3, 1.1)), &mut names);
        let (a, b) = (&m.jobs["a"], &m.jobs["b"]);
        assert!((a.steal_rate.unwrap() - 0.3).abs() < 1e-9);
        assert!((a.stolen.unwrap() - 0.03).abs() < 1e-9, "{:?}", a.stolen);
        assert!((b.stolen.unwrap() - 0.01).abs() < 1e-9, "{:?}", b.stolen);
        let t = &m.trainings[0];
        assert_eq!((t.id.as_str(), t.budget, t.jobs), ("pid-7", Some(0.05), 2));
        assert_eq!(t.phase, "regulating");
    }

    #[test]
    fn a_training_counts_the_jobs_a_non_root_caller_is_not_shown() {
        let budget = serde_json::json!({"trainings": [{
            "id": "pid-7", "jobs": [{"job": "a", "steal_s": 0.0}], "other_jobs": 2
        }]});
        let mut m = Model::default();
        m.update(
            sample(0, vec![job("a", 0.0, 1, Some("pid-7"))], budget),
            &mut names,
        );
        assert_eq!(m.trainings[0].jobs, 3);
        assert!(!m.jobs.contains_key("b"));
    }

    #[test]
    fn the_agents_cpu_is_a_rate_and_the_shims_only_while_the_same_shims_live() {
        let cost = |cpu_s: f64, shims: u32, shims_cpu_s: f64| AgentCost {
            pid: 9,
            cpu_s,
            rss_bytes: Some(20 << 20),
            shims,
            shims_cpu_s,
            shims_rss_bytes: 0,
        };
        let mut m = Model::default();
        let mut s = sample(0, Vec::new(), serde_json::Value::Null);
        s.agent = Some(cost(1.0, 1, 5.0));
        m.update(s, &mut names);
        let mut s = sample(2000, Vec::new(), serde_json::Value::Null);
        s.agent = Some(cost(1.1, 1, 5.2));
        m.update(s, &mut names);
        let a = m.agent.clone().unwrap();
        assert!((a.cpu.unwrap() - 0.05).abs() < 1e-9);
        assert!((a.shims_cpu.unwrap() - 0.1).abs() < 1e-9);
        let mut s = sample(3000, Vec::new(), serde_json::Value::Null);
        s.agent = Some(cost(1.2, 0, 0.0));
        m.update(s, &mut names);
        assert_eq!(m.agent.as_ref().unwrap().shims_cpu, None);
    }

    #[test]
    fn formats_are_short_and_say_unknown_with_a_dash() {
        assert_eq!(bytes(512), "512B");
        assert_eq!(bytes(1536), "1.5K");
        assert_eq!(bytes(100 << 20), "100M");
        assert_eq!(bytes(3 << 30), "3.0G");
        assert_eq!(memory(Some(2 << 20), Some(100 << 20)), "2.0M/100M");
        assert_eq!(memory(Some(2 << 20), None), "2.0M/-");
        assert_eq!(percent(Some(0.031)), "3.1%");
        assert_eq!(percent(None), "-");
        assert_eq!(cores(Some(0.5)), "0.50");
        let h: VecDeque<f64> = [0.0, 0.5, 1.0].into();
        assert_eq!(sparkline(&h), "▁▅█");
        let idle: VecDeque<f64> = [0.0, 0.001].into();
        assert_eq!(sparkline(&idle), "▁▁");
    }
}
