//! Reads a VM's serial console: the `@@vmtest` markers written by `init.sh`,
//! the `enforcer doctor --json` report, and libtest's per-test lines.

use std::collections::BTreeMap;

const MARK: &str = "@@vmtest ";
/// libtest's exit status when a test failed.
const LIBTEST_FAILED: i32 = 101;

/// Controllers the agent needs in the VM's root `cgroup.subtree_control`.
pub const REQUIRED_CONTROLLERS: [&str; 4] = ["cpu", "memory", "pids", "cpuset"];
/// Controllers `enforcer doctor` must report usable in every VM.
pub const DOCTOR_CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];

/// What one test binary did inside the VM.
#[derive(Debug, Default)]
pub struct BinaryRun {
    pub name: String,
    /// Exit status; `None` when the binary never finished.
    pub rc: Option<i32>,
    pub passed: Vec<String>,
    pub failed: Vec<String>,
    pub ignored: usize,
    /// Everything it printed.
    pub output: Vec<String>,
    /// Its failed tests, each run once more alone (`init.sh`).
    pub reruns: Vec<Rerun>,
}

/// A failed test run once more, alone, right after its binary.
#[derive(Debug, Default)]
pub struct Rerun {
    pub test: String,
    /// Exit status; `None` when it never finished.
    pub rc: Option<i32>,
    pub output: Vec<String>,
}

impl Rerun {
    /// Passed: exit 0 and libtest's count of exactly one test passed, so a
    /// name that matched nothing (0 passed, exit 0) is not a pass.
    pub fn passed(&self) -> bool {
        self.rc == Some(0)
            && self
                .output
                .iter()
                .any(|l| l.starts_with("test result: ok. 1 passed; 0 failed;"))
    }
}

impl BinaryRun {
    /// Every test passed, at once or on its rerun. A binary that failed
    /// without naming a failed test (a crash: no libtest exit 101) is not.
    pub fn ok(&self) -> bool {
        match self.rc {
            Some(0) => self.failed.is_empty(),
            Some(LIBTEST_FAILED) => !self.failed.is_empty() && self.still_failed().is_empty(),
            _ => false,
        }
    }

    /// The failed tests whose rerun did not pass (or that were not rerun).
    pub fn still_failed(&self) -> Vec<&str> {
        self.failed_whose_rerun(false)
    }

    /// The failed tests that passed their rerun.
    pub fn flaky(&self) -> Vec<&str> {
        self.failed_whose_rerun(true)
    }

    /// The failed tests whose rerun passed (`passed`) or did not.
    fn failed_whose_rerun(&self, passed: bool) -> Vec<&str> {
        self.failed
            .iter()
            .filter(|t| {
                let rerun_passed = self.reruns.iter().any(|r| &r.test == *t && r.passed());
                rerun_passed == passed
            })
            .map(String::as_str)
            .collect()
    }

    /// libtest's failure details (`---- name stdout ----` sections), or the
    /// last lines when the binary died before printing them.
    pub fn failure_output(&self) -> Vec<&str> {
        let start = self.output.iter().position(|l| l.starts_with("---- "));
        let end = self
            .output
            .iter()
            .rposition(|l| l.starts_with("test result:"));
        match (start, end) {
            (Some(s), Some(e)) if s < e => self.output[s..=e].iter().map(String::as_str).collect(),
            _ => tail(&self.output, 40),
        }
    }
}

/// The doctor's verdict inside the VM.
#[derive(Debug, Default)]
pub struct Doctor {
    pub rc: Option<i32>,
    pub mode: Option<String>,
    /// Controller name -> usable, for [`DOCTOR_CONTROLLERS`].
    pub usable: BTreeMap<String, bool>,
    pub switches_seen: Option<u64>,
    pub problems: Vec<String>,
    /// Why the JSON could not be read, if it could not.
    pub parse_error: Option<String>,
    pub text: Vec<String>,
}

impl Doctor {
    pub fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(e) = &self.parse_error {
            out.push(format!("doctor --json output unreadable: {e}"));
            return out;
        }
        if self.rc != Some(0) {
            out.push(format!(
                "doctor exited {:?}, problems: {:?}",
                self.rc, self.problems
            ));
        }
        if self.mode.as_deref() != Some("unified") {
            out.push(format!(
                "doctor saw cgroup mode {:?}, expected unified",
                self.mode
            ));
        }
        for c in DOCTOR_CONTROLLERS {
            if self.usable.get(c) != Some(&true) {
                out.push(format!("doctor: controller {c} not usable"));
            }
        }
        if self.switches_seen.unwrap_or(0) == 0 {
            out.push("doctor: the eBPF self-test counted no sched_switch".to_owned());
        }
        out
    }

    fn parse(&mut self) {
        let json = self.text.join("\n");
        let report: serde_json::Value = match serde_json::from_str(&json) {
            Ok(v) => v,
            Err(e) => {
                self.parse_error = Some(e.to_string());
                return;
            }
        };
        self.mode = report["cgroup"]["mode"].as_str().map(str::to_owned);
        for c in DOCTOR_CONTROLLERS {
            let usable = report["cgroup"]["controllers"][c]["usable"]
                .as_bool()
                .unwrap_or(false);
            self.usable.insert(c.to_owned(), usable);
        }
        self.switches_seen = report["ebpf"]["switches_seen"].as_u64();
        self.problems = report["problems"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|p| p.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
    }
}

/// Something worth a progress line while the VM runs.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    Release(String),
    DoctorDone,
    BinaryStarted(String),
    TestResult {
        binary: String,
        test: String,
        outcome: &'static str,
    },
    BinaryDone(String),
    RerunDone {
        binary: String,
        test: String,
        passed: bool,
    },
    Note(String),
    KernelPanic(String),
    Done,
}

#[derive(Debug, Default)]
enum Section {
    #[default]
    Boot,
    Doctor,
    DoctorStderr,
    Binary,
    Rerun,
    After,
}

/// Everything learnt from one VM's console.
#[derive(Debug, Default)]
pub struct Console {
    pub release: Option<String>,
    pub controllers: Option<String>,
    pub subtree_control: Option<String>,
    pub btf: Option<bool>,
    pub doctor: Option<Doctor>,
    pub binaries: Vec<BinaryRun>,
    pub notes: Vec<String>,
    pub panic: Option<String>,
    pub done: bool,
    section: Section,
    /// A `test name ... ` line whose verdict has not been printed yet (the
    /// test's own uncaptured output can come in between).
    pending_test: Option<String>,
}

impl Console {
    /// The test whose verdict is still missing, if one was running.
    pub fn running_test(&self) -> Option<&str> {
        self.pending_test.as_deref()
    }

    /// Feeds one console line (without its newline).
    pub fn feed(&mut self, line: &str) -> Option<Event> {
        if line.contains("Kernel panic - not syncing") && self.panic.is_none() {
            self.panic = Some(line.to_owned());
            return Some(Event::KernelPanic(line.to_owned()));
        }
        // A marker normally starts the line, but a kernel message may have
        // been printed just before it without a newline.
        if let Some(at) = line.find(MARK) {
            return self.marker(line[at + MARK.len()..].trim_end());
        }
        match self.section {
            Section::Doctor => {
                if let Some(d) = &mut self.doctor {
                    d.text.push(line.to_owned());
                }
                None
            }
            Section::Binary => self.binary_line(line),
            Section::Rerun => {
                if let Some(r) = self.binaries.last_mut().and_then(|b| b.reruns.last_mut()) {
                    r.output.push(line.to_owned());
                }
                None
            }
            Section::Boot | Section::DoctorStderr | Section::After => None,
        }
    }

    fn marker(&mut self, m: &str) -> Option<Event> {
        let (word, rest) = m.split_once(' ').unwrap_or((m, ""));
        match word {
            "uname" => {
                self.release = Some(rest.to_owned());
                return Some(Event::Release(rest.to_owned()));
            }
            "controllers" => self.controllers = Some(rest.to_owned()),
            "subtree_control" => self.subtree_control = Some(rest.to_owned()),
            "btf" => self.btf = Some(rest == "yes"),
            "doctor" => match rest {
                "begin" => {
                    self.doctor = Some(Doctor::default());
                    self.section = Section::Doctor;
                }
                "stderr" => self.section = Section::DoctorStderr,
                _ => {
                    self.section = Section::After;
                    if let Some(d) = &mut self.doctor {
                        d.rc = parse_rc(rest);
                        d.parse();
                    }
                    return Some(Event::DoctorDone);
                }
            },
            "begin" => {
                self.binaries.push(BinaryRun {
                    name: rest.to_owned(),
                    ..BinaryRun::default()
                });
                self.section = Section::Binary;
                self.pending_test = None;
                return Some(Event::BinaryStarted(rest.to_owned()));
            }
            "end" => {
                self.section = Section::After;
                if let Some(b) = self.binaries.last_mut() {
                    b.rc = parse_rc(rest);
                    // libtest's closing `failures:` list is authoritative.
                    for name in failures_list(&b.output) {
                        if !b.failed.contains(&name) {
                            b.failed.push(name);
                        }
                    }
                    return Some(Event::BinaryDone(b.name.clone()));
                }
            }
            "rerun-begin" => {
                let test = rest.split_whitespace().nth(1).unwrap_or_default();
                if let Some(b) = self.binaries.last_mut() {
                    b.reruns.push(Rerun {
                        test: test.to_owned(),
                        ..Rerun::default()
                    });
                    self.section = Section::Rerun;
                }
            }
            "rerun-end" => {
                self.section = Section::After;
                if let Some(b) = self.binaries.last_mut()
                    && let Some(r) = b.reruns.last_mut()
                {
                    r.rc = parse_rc(rest);
                    return Some(Event::RerunDone {
                        binary: b.name.clone(),
                        test: r.test.clone(),
                        passed: r.passed(),
                    });
                }
            }
            "done" => {
                self.done = true;
                self.section = Section::After;
                return Some(Event::Done);
            }
            "setup-error" | "note" => {
                self.notes.push(m.to_owned());
                return Some(Event::Note(m.to_owned()));
            }
            _ => self.notes.push(format!("unknown marker: {m}")),
        }
        None
    }

    fn binary_line(&mut self, line: &str) -> Option<Event> {
        let binary = self.binaries.last_mut()?;
        binary.output.push(line.to_owned());
        let mut text = line;
        // The test binaries pad names to a common width (`test a   ... ok`).
        if let Some(rest) = line.strip_prefix("test ")
            && let Some((name, verdict)) = rest.split_once(" ... ")
            && let name = name.trim_end()
            && !name.contains(' ')
        {
            self.pending_test = Some(name.to_owned());
            text = verdict;
        }
        let pending = self.pending_test.as_ref()?;
        let outcome = match text.trim_end() {
            t if t.ends_with("ok") && (t == "ok" || t.ends_with(" ok")) => "ok",
            t if t.ends_with("FAILED") => "FAILED",
            t if t.starts_with("ignored") || t.ends_with("ignored") => "ignored",
            _ => return None,
        };
        let test = pending.clone();
        self.pending_test = None;
        match outcome {
            "ok" => binary.passed.push(test.clone()),
            "FAILED" => binary.failed.push(test.clone()),
            _ => binary.ignored += 1,
        }
        Some(Event::TestResult {
            binary: binary.name.clone(),
            test,
            outcome,
        })
    }
}

/// The `rc=N` at the end of an `end` marker.
fn parse_rc(rest: &str) -> Option<i32> {
    rest.rsplit(' ')
        .next()?
        .strip_prefix("rc=")?
        .trim()
        .parse()
        .ok()
}

/// The names under libtest's final `failures:` heading (the one followed by
/// indented names, not the one followed by `---- ` sections).
fn failures_list(output: &[String]) -> Vec<String> {
    let Some(at) = output.iter().rposition(|l| l == "failures:") else {
        return Vec::new();
    };
    output[at + 1..]
        .iter()
        .take_while(|l| l.starts_with("    "))
        .map(|l| l.trim().to_owned())
        .collect()
}

/// The last `n` lines of `lines`.
pub fn tail<T: AsRef<str>>(lines: &[T], n: usize) -> Vec<&str> {
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(AsRef::as_ref)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"[    0.000000] Linux version 6.1.0-50-amd64
@@vmtest uname 6.1.0-50-amd64
@@vmtest controllers cpuset cpu io memory hugetlb pids rdma misc
@@vmtest subtree_control cpuset cpu io memory pids
@@vmtest btf yes
@@vmtest doctor begin
{
  "cgroup": {"mode": "unified", "controllers": {
    "cpu": {"usable": true}, "memory": {"usable": true}, "pids": {"usable": true}}},
  "ebpf": {"switches_seen": 12},
  "problems": []
}
@@vmtest doctor stderr
@@vmtest doctor end rc=0
@@vmtest begin doctor

running 3 tests
test a::passes ... ok
test b::fails ... FAILED
test c::noisy ... child output on the console
ok
test d::skipped ... ignored

failures:

---- b::fails stdout ----
thread 'b::fails' panicked at tests/tests/doctor.rs:1:1:
boom

failures:
    b::fails

test result: FAILED. 2 passed; 1 failed; 1 ignored; 0 measured; 0 filtered out
@@vmtest end doctor rc=101
@@vmtest done
"#;

    fn feed_all(text: &str) -> (Console, Vec<Event>) {
        let mut c = Console::default();
        let events = text.lines().filter_map(|l| c.feed(l)).collect();
        (c, events)
    }

    #[test]
    fn console_yields_release_doctor_and_per_test_verdicts() {
        let (c, events) = feed_all(SAMPLE);
        assert_eq!(c.release.as_deref(), Some("6.1.0-50-amd64"));
        assert!(c.done);
        let d = c.doctor.as_ref().unwrap();
        assert!(d.failures().is_empty(), "{:?}", d.failures());
        assert_eq!(d.switches_seen, Some(12));
        let b = &c.binaries[0];
        assert_eq!(b.passed, ["a::passes", "c::noisy"]);
        assert_eq!(b.failed, ["b::fails"]);
        assert_eq!(b.ignored, 1);
        assert_eq!(b.rc, Some(101));
        assert!(!b.ok());
        let details = b.failure_output();
        assert!(details[0].starts_with("---- b::fails"), "{details:?}");
        assert!(details.contains(&"boom"));
        assert!(events.contains(&Event::TestResult {
            binary: "doctor".into(),
            test: "b::fails".into(),
            outcome: "FAILED"
        }));
    }

    /// What `enforcer_tests::harness` prints (libtest-mimic): names padded
    /// to one width, a reason after `ignored`, and `---- name ----` headings.
    const PADDED: &str = "@@vmtest begin jobs
running 3 tests
test a_long_test_name ... ok
test short            ... ignored (needs root)
test mid_name         ... FAILED

failures:

---- mid_name ----
boom


failures:
    mid_name

test result: FAILED. 1 passed; 1 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s
@@vmtest end jobs rc=101
";

    #[test]
    fn padded_names_and_ignore_reasons_of_the_test_harness_are_read() {
        let (c, _) = feed_all(PADDED);
        let b = &c.binaries[0];
        assert_eq!(b.passed, ["a_long_test_name"]);
        assert_eq!(b.failed, ["mid_name"]);
        assert_eq!(b.ignored, 1);
        assert_eq!(b.failure_output()[0], "---- mid_name ----");
    }

    #[test]
    fn doctor_in_hybrid_mode_or_without_ebpf_is_a_failure() {
        let text = SAMPLE
            .replace("\"unified\"", "\"hybrid\"")
            .replace("\"switches_seen\": 12", "\"switches_seen\": 0");
        let (c, _) = feed_all(&text);
        let failures = c.doctor.unwrap().failures();
        assert_eq!(failures.len(), 2, "{failures:?}");
    }

    #[test]
    fn binary_that_never_ends_has_no_exit_status() {
        let cut = &SAMPLE[..SAMPLE.find("test b::fails").unwrap()];
        let (c, _) = feed_all(cut);
        assert!(!c.done);
        assert_eq!(c.binaries[0].rc, None);
        assert!(!c.binaries[0].ok());
    }

    /// `PADDED`'s failed test run once more, alone, with `verdict` as the
    /// rerun's summary line and `rc` as its exit status.
    fn rerun_of_mid_name(verdict: &str, rc: i32) -> Console {
        let text = format!(
            "{PADDED}@@vmtest rerun-begin jobs mid_name\n\
             running 1 test\n\
             test mid_name ... {}\n\
             {verdict}\n\
             @@vmtest rerun-end jobs mid_name rc={rc}\n\
             @@vmtest done\n",
            if rc == 0 { "ok" } else { "FAILED" }
        );
        feed_all(&text).0
    }

    #[test]
    fn a_failed_test_that_passes_its_rerun_is_named_flaky_and_the_binary_is_ok() {
        let c = rerun_of_mid_name(
            "test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 2 filtered out; finished in 0.01s",
            0,
        );
        let b = &c.binaries[0];
        assert!(b.ok());
        assert_eq!(b.flaky(), ["mid_name"]);
        assert!(b.still_failed().is_empty());
        // The rerun's lines are its own, not the binary's.
        assert!(!b.output.iter().any(|l| l.contains("1 passed; 0 failed")));
    }

    #[test]
    fn a_failed_test_that_fails_its_rerun_still_fails_the_binary() {
        let c = rerun_of_mid_name(
            "test result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 2 filtered out; finished in 0.01s",
            101,
        );
        let b = &c.binaries[0];
        assert!(!b.ok());
        assert_eq!(b.still_failed(), ["mid_name"]);
        assert!(b.flaky().is_empty());
    }

    #[test]
    fn a_rerun_whose_name_matched_no_test_is_not_a_pass() {
        let c = rerun_of_mid_name(
            "test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 3 filtered out; finished in 0.00s",
            0,
        );
        assert!(!c.binaries[0].ok());
    }

    #[test]
    fn a_binary_that_crashed_is_not_ok_even_if_its_named_failures_passed_a_rerun() {
        let text = format!(
            "{}@@vmtest rerun-begin jobs mid_name\n\
             test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 2 filtered out; finished in 0.01s\n\
             @@vmtest rerun-end jobs mid_name rc=0\n",
            PADDED.replace("rc=101", "rc=139")
        );
        let (c, _) = feed_all(&text);
        assert!(!c.binaries[0].ok());
    }

    #[test]
    fn kernel_panic_is_reported() {
        let (c, events) = feed_all("[ 1.0] Kernel panic - not syncing: Attempted to kill init!\n");
        assert!(c.panic.is_some());
        assert!(matches!(events[0], Event::KernelPanic(_)));
    }
}
