//! The workload matrix's three targets (issue #14), judged from one run's
//! medians, so that `bench contention --matrix` says itself whether they
//! hold instead of leaving it to whoever reads the table:
//!
//! 1. in every pair where a static policy keeps the training's slowdown
//!    within the budget, the enforcer does too, with evaluation work at
//!    least [`WORK_SHARE`] of the best such policy's;
//! 2. in no pair does a static policy beat the enforcer on both axes by
//!    more than the noise: [`SLOWDOWN_MARGIN`] of slowdown and
//!    [`WORK_MARGIN`] of work. Each win also says whether its slowdown
//!    margin is beyond the spread of `training alone` between that pair's
//!    rounds, the noise this machine actually showed;
//! 3. the thread-per-step × threads pair keeps at most
//!    [`FLAGSHIP_SLOWDOWN`] of slowdown with at least [`WORK_SHARE`] of
//!    SCHED_IDLE's work.
//!
//! The medians decide. Where the matrix kept each round's numbers, a miss
//! of target 1 and a win of target 2 also say in how many rounds the same
//! comparison, made within the round (its policies run one after another,
//! within about a minute), went the same way: a miss in every round is the
//! enforcer's; a miss that some rounds meet is as much the evaluation's
//! work rate varying between rounds as anything the enforcer did. Each
//! round's work is compared with that round's own, so a machine that
//! drifts between rounds does not count.
//!
//! "Static" is every row that sets its controls once: unlimited, nice 19,
//! SCHED_IDLE (also as measured by the enforcer), the static quota and the
//! minimal weight; the in-bench loop rows are the enforcer's own controller
//! and do not count. A verdict needs the rows it compares: a pair without
//! an enforcer row, or whose rows have no slowdown, is left out, and a
//! target no pair could judge says so instead of passing.

use anyhow::{Context, Result};
use clap::ValueEnum;
use serde::Serialize;

use super::contention::{Policy, policy_slug};

/// Target 1 and 3: the share of the reference's evaluation work kept.
pub const WORK_SHARE: f64 = 0.9;
/// Target 2: a slowdown lower by more than this (1 point) is a win...
pub const SLOWDOWN_MARGIN: f64 = 0.01;
/// ...and so is evaluation work larger by more than this (5 %).
pub const WORK_MARGIN: f64 = 0.05;
/// Target 3: the flagship pair's slowdown.
pub const FLAGSHIP_SLOWDOWN: f64 = 0.03;

/// One policy's medians in one pair.
#[derive(Debug, Clone)]
pub struct Cell {
    pub policy: Policy,
    /// The training's slowdown against `training alone` (a fraction).
    pub slowdown: f64,
    /// Evaluation work relative to SCHED_IDLE's (1.0 = the same).
    pub work: f64,
    /// The same policy round by round; empty where the matrix did not keep
    /// them (written before they were).
    pub rounds: Vec<RoundPoint>,
}

/// One policy's numbers in one round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundPoint {
    pub round: usize,
    /// Against that round's `training alone`.
    pub slowdown: f64,
    /// Evaluation work units per second (compared only within a round).
    pub work_per_s: f64,
}

/// In how many of the rounds both rows ran a comparison went the same way
/// as the medians'.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct RoundCount {
    pub agreeing: usize,
    pub of: usize,
}

/// Target 1's rule, on medians or on one round: the enforcer's slowdown
/// within `budget` and its work at least [`WORK_SHARE`] of the reference's.
fn keeps_up(slowdown: f64, work: f64, reference_work: f64, budget: f64) -> bool {
    slowdown <= budget && work >= WORK_SHARE * reference_work
}

/// Target 2's rule, on medians or on one round: a static policy (`slowdown`,
/// `work`) beats the enforcer's by more than [`SLOWDOWN_MARGIN`] of
/// slowdown and [`WORK_MARGIN`] of work.
fn beats(slowdown: f64, work: f64, enforcer_slowdown: f64, enforcer_work: f64) -> bool {
    enforcer_slowdown - slowdown > SLOWDOWN_MARGIN && work > (1.0 + WORK_MARGIN) * enforcer_work
}

/// Compares two rows round by round: `holds(a, b)` for every round both
/// have. `None` where no round has both (rounds not kept).
fn by_round(
    a: &Cell,
    b: &Cell,
    holds: impl Fn(&RoundPoint, &RoundPoint) -> bool,
) -> Option<RoundCount> {
    let mut count = RoundCount { agreeing: 0, of: 0 };
    for x in &a.rounds {
        if let Some(y) = b.rounds.iter().find(|y| y.round == x.round) {
            count.of += 1;
            if holds(x, y) {
                count.agreeing += 1;
            }
        }
    }
    (count.of > 0).then_some(count)
}

/// What one pair contributes to the verdict.
#[derive(Debug, Clone)]
pub struct PairCells {
    /// `training × evaluation`.
    pub name: String,
    /// The thread-per-step × threads pair (target 3).
    pub flagship: bool,
    /// Spread of `training alone` between rounds.
    pub noise: Option<f64>,
    pub cells: Vec<Cell>,
}

/// Target 1 in one pair where a static policy kept the budget.
#[derive(Debug, Clone, Serialize)]
pub struct WithinBudget {
    pub pair: String,
    /// The in-budget static policy with the most evaluation work.
    pub best: Policy,
    pub enforcer_slowdown: f64,
    /// The enforcer's work over `best`'s.
    pub work_share: f64,
    pub met: bool,
    /// Rounds in which the enforcer missed target 1 against `best`'s
    /// round (over budget, or under [`WORK_SHARE`] of its work).
    pub rounds_missed: Option<RoundCount>,
}

/// Target 2: a static policy that beat the enforcer on both axes.
#[derive(Debug, Clone, Serialize)]
pub struct Beaten {
    pub pair: String,
    pub by: Policy,
    /// Enforcer's slowdown minus the policy's.
    pub slowdown_margin: f64,
    /// The policy's work over the enforcer's.
    pub work_ratio: f64,
    /// Whether `slowdown_margin` is also larger than the pair's noise;
    /// `None` where the noise was not measured (one round).
    pub beyond_noise: Option<bool>,
    /// Rounds in which the policy beat the enforcer's round on both axes
    /// by the same margins.
    pub rounds_won: Option<RoundCount>,
}

/// Target 3.
#[derive(Debug, Clone, Serialize)]
pub struct Flagship {
    pub slowdown: f64,
    /// The enforcer's work over SCHED_IDLE's.
    pub work: f64,
    pub met: bool,
}

/// The three targets over one run.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub budget: f64,
    pub within_budget: Vec<WithinBudget>,
    pub beaten: Vec<Beaten>,
    /// Pairs target 2 could judge (an enforcer row and a static row).
    pub compared_pairs: usize,
    pub flagship: Option<Flagship>,
}

fn is_static(p: Policy) -> bool {
    matches!(
        p,
        Policy::Unlimited
            | Policy::Nice
            | Policy::Idle
            | Policy::IdleMeasured
            | Policy::Quota
            | Policy::Weight
    )
}

/// Judges the three targets over `pairs` with the budget `budget` (a
/// fraction of the training's CPU time, e.g. 0.05).
pub fn judge(pairs: &[PairCells], budget: f64) -> Verdict {
    let mut verdict = Verdict {
        budget,
        within_budget: Vec::new(),
        beaten: Vec::new(),
        compared_pairs: 0,
        flagship: None,
    };
    for pair in pairs {
        let Some(enforcer) = pair.cells.iter().find(|c| c.policy == Policy::Enforcer) else {
            continue;
        };
        let statics: Vec<&Cell> = pair.cells.iter().filter(|c| is_static(c.policy)).collect();
        if !statics.is_empty() {
            verdict.compared_pairs += 1;
        }
        // Target 1: the best static policy that kept the budget.
        let best = statics
            .iter()
            .filter(|c| c.slowdown <= budget)
            .max_by(|a, b| a.work.total_cmp(&b.work));
        if let Some(best) = best {
            let work_share = enforcer.work / best.work;
            verdict.within_budget.push(WithinBudget {
                pair: pair.name.clone(),
                best: best.policy,
                enforcer_slowdown: enforcer.slowdown,
                work_share,
                met: keeps_up(enforcer.slowdown, enforcer.work, best.work, budget),
                rounds_missed: by_round(enforcer, best, |e, b| {
                    !keeps_up(e.slowdown, e.work_per_s, b.work_per_s, budget)
                }),
            });
        }
        // Target 2: every static policy better on both axes.
        for c in &statics {
            if beats(c.slowdown, c.work, enforcer.slowdown, enforcer.work) {
                let slowdown_margin = enforcer.slowdown - c.slowdown;
                verdict.beaten.push(Beaten {
                    pair: pair.name.clone(),
                    by: c.policy,
                    slowdown_margin,
                    work_ratio: c.work / enforcer.work,
                    beyond_noise: pair.noise.map(|n| slowdown_margin > n),
                    rounds_won: by_round(enforcer, c, |e, s| {
                        beats(s.slowdown, s.work_per_s, e.slowdown, e.work_per_s)
                    }),
                });
            }
        }
        if pair.flagship {
            verdict.flagship = Some(Flagship {
                slowdown: enforcer.slowdown,
                work: enforcer.work,
                met: enforcer.slowdown <= FLAGSHIP_SLOWDOWN && enforcer.work >= WORK_SHARE,
            });
        }
    }
    verdict
}

/// The pairs and the budget (a fraction) of a `contention-matrix.json` that
/// `bench contention --matrix` wrote.
pub fn from_matrix_json(text: &str) -> Result<(Vec<PairCells>, f64)> {
    let v: serde_json::Value = serde_json::from_str(text).context("not JSON")?;
    let budget = v["config"]["budget_pct"]
        .as_f64()
        .context("no config.budget_pct")?
        / 100.0;
    let pairs = v["pairs"].as_array().context("no pairs")?;
    let pairs = pairs
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let shape = |key: &str| {
                p[key]
                    .as_str()
                    .map(str::to_owned)
                    .with_context(|| format!("pair {i}: no {key}"))
            };
            let (training, eval) = (shape("training")?, shape("eval")?);
            let rows = p["rows"]
                .as_array()
                .with_context(|| format!("pair {i}: no rows"))?;
            // Each round's numbers, where the matrix kept them.
            let no_rounds = Vec::new();
            let rounds = p["rounds"].as_array().unwrap_or(&no_rounds);
            let mut cells = Vec::new();
            for row in rows {
                let name = row["policy"].as_str().unwrap_or_default();
                let policy = Policy::from_str(name, false)
                    .map_err(|e| anyhow::anyhow!("pair {i}: policy {name:?}: {e}"))?;
                if let (Some(slowdown), Some(work)) =
                    (row["slowdown"].as_f64(), row["eval_vs_idle"].as_f64())
                {
                    let rounds = rounds
                        .iter()
                        .filter(|r| r["policy"].as_str() == Some(name))
                        .filter_map(|r| {
                            Some(RoundPoint {
                                round: usize::try_from(r["round"].as_u64()?).ok()?,
                                slowdown: r["slowdown"].as_f64()?,
                                work_per_s: r["eval_work_per_s"].as_f64()?,
                            })
                        })
                        .collect();
                    cells.push(Cell {
                        policy,
                        slowdown,
                        work,
                        rounds,
                    });
                }
            }
            Ok(PairCells {
                flagship: training == "thread-per-step" && eval == "threads",
                name: format!("{training} × {eval}"),
                noise: p["alone_spread"].as_f64(),
                cells,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((pairs, budget))
}

/// The pairs of several matrices (each read by [`from_matrix_json`], named
/// by its file) as one: rows of one matrix re-run apart (`--matrix
/// --matrix-training`) judged together. They must share the budget, and no
/// pair may come from two of them: which run's cells would count is not
/// for the judge to pick.
pub fn merge(matrices: Vec<(String, Vec<PairCells>, f64)>) -> Result<(Vec<PairCells>, f64)> {
    let mut budget: Option<(String, f64)> = None;
    let mut from: Vec<(String, String)> = Vec::new();
    let mut pairs = Vec::new();
    for (file, cells, b) in matrices {
        match &budget {
            Some((first, fb)) if (fb - b).abs() > 1e-9 => anyhow::bail!(
                "{file} has a {:.1}% budget, {first} {:.1}%: matrices judged together must share it",
                b * 100.0,
                fb * 100.0
            ),
            Some(_) => {}
            None => budget = Some((file.clone(), b)),
        }
        for pair in cells {
            if let Some((_, other)) = from.iter().find(|(name, _)| *name == pair.name) {
                anyhow::bail!("pair {} is in both {other} and {file}", pair.name);
            }
            from.push((pair.name.clone(), file.clone()));
            pairs.push(pair);
        }
    }
    let (_, budget) = budget.context("no matrix to judge")?;
    Ok((pairs, budget))
}

/// A work share as a percentage rounded down to a tenth, so that a share
/// just under [`WORK_SHARE`] (0.8998) does not print as the target (90.0).
fn share_down(share: f64) -> f64 {
    (share * 1000.0).floor() / 10.0
}

impl Verdict {
    /// The verdict as the lines printed under the matrix.
    pub fn lines(&self) -> Vec<String> {
        let pct = |v: f64| format!("{:.1}", v * 100.0);
        let mut out = Vec::new();
        let met = self.within_budget.iter().filter(|w| w.met).count();
        if self.within_budget.is_empty() {
            out.push(format!(
                "target 1: not judged: no pair had a static policy within the {}% budget beside an enforcer row",
                pct(self.budget)
            ));
        } else {
            let misses: Vec<&WithinBudget> = self.within_budget.iter().filter(|w| !w.met).collect();
            let every_round = misses
                .iter()
                .filter(|w| w.rounds_missed.is_some_and(|r| r.agreeing == r.of))
                .count();
            let with_rounds = misses.iter().filter(|w| w.rounds_missed.is_some()).count();
            out.push(format!(
                "target 1 (where a static policy keeps the slowdown within {}%, the enforcer does too with >= {:.0}% of its work): met in {met} of {} pairs{}",
                pct(self.budget),
                WORK_SHARE * 100.0,
                self.within_budget.len(),
                if with_rounds > 0 {
                    format!(
                        "; {every_round} of the {} misses missed in every round{}",
                        misses.len(),
                        if with_rounds < misses.len() {
                            format!(" ({} without rounds kept)", misses.len() - with_rounds)
                        } else {
                            String::new()
                        }
                    )
                } else {
                    String::new()
                }
            ));
            for w in misses {
                out.push(format!(
                    "  not met: {}: enforcer {}% slowdown, {:.1}% of {}'s work{}",
                    w.pair,
                    pct(w.enforcer_slowdown),
                    share_down(w.work_share),
                    policy_slug(w.best),
                    w.rounds_missed.map_or(String::new(), |r| format!(
                        "; missed in {} of {} rounds",
                        r.agreeing, r.of
                    ))
                ));
            }
        }
        if self.compared_pairs == 0 {
            out.push("target 2: not judged: no pair had both a static and an enforcer row".into());
        } else {
            let beyond = self
                .beaten
                .iter()
                .filter(|b| b.beyond_noise == Some(true))
                .count();
            let unmeasured = self
                .beaten
                .iter()
                .filter(|b| b.beyond_noise.is_none())
                .count();
            out.push(format!(
                "target 2 (no static policy better on both axes by > {:.0} point of slowdown and > {:.0}% of work): {} in {} pairs, {beyond} of them by more than the pair's noise{}",
                SLOWDOWN_MARGIN * 100.0,
                WORK_MARGIN * 100.0,
                if self.beaten.is_empty() {
                    "met, none".to_owned()
                } else {
                    format!("not met, {} wins", self.beaten.len())
                },
                self.compared_pairs,
                if unmeasured > 0 {
                    format!(" ({unmeasured} in pairs whose noise one round cannot show)")
                } else {
                    String::new()
                },
            ));
            for b in &self.beaten {
                out.push(format!(
                    "  {} beat by {}: {} points less slowdown, {:.2}x the work{}{}",
                    b.pair,
                    policy_slug(b.by),
                    pct(b.slowdown_margin),
                    b.work_ratio,
                    match b.beyond_noise {
                        Some(true) => ", beyond the noise",
                        Some(false) => "",
                        None => ", noise not measured",
                    },
                    b.rounds_won.map_or(String::new(), |r| format!(
                        "; won in {} of {} rounds",
                        r.agreeing, r.of
                    ))
                ));
            }
        }
        out.push(match &self.flagship {
            Some(f) => format!(
                "target 3 (thread-per-step × threads <= {:.0}% slowdown, >= {:.0}% of SCHED_IDLE's work): {} ({}% / {:.1}%)",
                FLAGSHIP_SLOWDOWN * 100.0,
                WORK_SHARE * 100.0,
                if f.met { "met" } else { "not met" },
                pct(f.slowdown),
                share_down(f.work)
            ),
            None => "target 3: not judged: the thread-per-step × threads pair has no enforcer row"
                .into(),
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(policy: Policy, slowdown_pct: f64, work_pct: f64) -> Cell {
        Cell {
            policy,
            slowdown: slowdown_pct / 100.0,
            work: work_pct / 100.0,
            rounds: Vec::new(),
        }
    }

    /// A cell with its rounds, each `(slowdown %, work units/s)`.
    fn cell_by_round(
        policy: Policy,
        slowdown_pct: f64,
        work_pct: f64,
        rounds: &[(f64, f64)],
    ) -> Cell {
        Cell {
            rounds: rounds
                .iter()
                .enumerate()
                .map(|(round, &(slowdown, work))| RoundPoint {
                    round,
                    slowdown: slowdown / 100.0,
                    work_per_s: work,
                })
                .collect(),
            ..cell(policy, slowdown_pct, work_pct)
        }
    }

    fn pair(name: &str, noise_pct: f64, cells: Vec<Cell>) -> PairCells {
        PairCells {
            name: name.into(),
            flagship: name == "thread-per-step × threads",
            noise: Some(noise_pct / 100.0),
            cells,
        }
    }

    #[test]
    fn target_one_compares_the_enforcer_with_the_best_static_policy_within_budget() {
        let pairs = [
            // SCHED_IDLE within budget at 100 %; nice 19 has more work but
            // is over budget, so it is not the reference.
            pair(
                "a × b",
                2.0,
                vec![
                    cell(Policy::Idle, 3.0, 100.0),
                    cell(Policy::Nice, 9.0, 130.0),
                    cell(Policy::Enforcer, 2.0, 91.0),
                ],
            ),
            pair(
                "c × d",
                2.0,
                vec![
                    cell(Policy::Idle, 4.0, 100.0),
                    cell(Policy::Enforcer, 2.0, 80.0),
                ],
            ),
            // No static policy within budget: target 1 does not apply.
            pair(
                "e × f",
                2.0,
                vec![
                    cell(Policy::Idle, 20.0, 100.0),
                    cell(Policy::Enforcer, 4.0, 60.0),
                ],
            ),
        ];
        let v = judge(&pairs, 0.05);
        assert_eq!(v.within_budget.len(), 2);
        assert!(v.within_budget[0].met);
        assert_eq!(v.within_budget[0].best, Policy::Idle);
        assert!(!v.within_budget[1].met, "80 % of the work is under 90 %");
        assert!(
            v.lines()[0].contains("met in 1 of 2 pairs"),
            "{:?}",
            v.lines()
        );
    }

    #[test]
    fn target_two_counts_only_wins_on_both_axes_and_says_which_are_beyond_the_noise() {
        let pairs = [pair(
            "a × b",
            2.0,
            vec![
                // Less slowdown by 3 points and 20 % more work: a win,
                // beyond the 2-point noise.
                cell(Policy::Idle, 5.0, 120.0),
                // More work but only 0.5 point less slowdown: no win.
                cell(Policy::Nice, 7.5, 150.0),
                // Less slowdown, less work: no win.
                cell(Policy::Quota, 1.0, 40.0),
                // The loop rows are not static.
                cell(Policy::Loop, 0.0, 200.0),
                cell(Policy::Enforcer, 8.0, 100.0),
            ],
        )];
        let v = judge(&pairs, 0.05);
        assert_eq!(v.beaten.len(), 1, "{:?}", v.beaten);
        assert_eq!(v.beaten[0].by, Policy::Idle);
        assert_eq!(v.beaten[0].beyond_noise, Some(true));
        let lines = v.lines();
        let line = lines
            .iter()
            .find(|l| l.starts_with("target 2"))
            .expect("a target 2 line");
        assert!(
            line.contains("not met, 1 wins in 1 pairs, 1 of them"),
            "{line}"
        );
    }

    #[test]
    fn a_target_one_miss_says_in_how_many_rounds_the_enforcer_missed_its_rounds_reference() {
        let pairs = [
            // Medians: 85 % of SCHED_IDLE's work, a miss. Round by round:
            // 80 of 100 (a miss), 95 of 100 (met), 2 400 of 2 000 but 6 %
            // slowdown (a miss, over budget).
            pair(
                "a × b",
                2.0,
                vec![
                    cell_by_round(
                        Policy::Idle,
                        3.0,
                        100.0,
                        &[(3.0, 100.0), (2.0, 100.0), (4.0, 2000.0)],
                    ),
                    cell_by_round(
                        Policy::Enforcer,
                        2.0,
                        85.0,
                        &[(2.0, 80.0), (1.0, 95.0), (6.0, 2400.0)],
                    ),
                ],
            ),
            // Missed in both of its rounds.
            pair(
                "c × d",
                2.0,
                vec![
                    cell_by_round(Policy::Nice, 1.0, 100.0, &[(1.0, 100.0), (1.0, 100.0)]),
                    cell_by_round(Policy::Enforcer, 1.0, 70.0, &[(1.0, 60.0), (1.0, 80.0)]),
                ],
            ),
            // Rounds not kept.
            pair(
                "e × f",
                2.0,
                vec![
                    cell(Policy::Idle, 1.0, 100.0),
                    cell(Policy::Enforcer, 1.0, 50.0),
                ],
            ),
        ];
        let v = judge(&pairs, 0.05);
        let missed: Vec<_> = v.within_budget.iter().map(|w| w.rounds_missed).collect();
        assert_eq!(
            missed,
            [
                Some(RoundCount { agreeing: 2, of: 3 }),
                Some(RoundCount { agreeing: 2, of: 2 }),
                None
            ]
        );
        let lines = v.lines();
        assert!(
            lines[0].ends_with(
                "met in 0 of 3 pairs; 1 of the 3 misses missed in every round (1 without rounds kept)"
            ),
            "{lines:?}"
        );
        assert!(lines[1].ends_with("; missed in 2 of 3 rounds"), "{lines:?}");
        assert!(lines[3].ends_with("50.0% of idle's work"), "{lines:?}");
    }

    #[test]
    fn a_target_two_win_says_in_how_many_rounds_the_policy_won_on_both_axes() {
        let pairs = [pair(
            "a × b",
            2.0,
            vec![
                // Medians: 3 points less slowdown, 1.2x the work. Rounds:
                // a win; less slowdown but the same work; a win.
                cell_by_round(
                    Policy::Idle,
                    5.0,
                    120.0,
                    &[(5.0, 120.0), (4.0, 100.0), (6.0, 130.0)],
                ),
                cell_by_round(
                    Policy::Enforcer,
                    8.0,
                    100.0,
                    &[(8.0, 100.0), (9.0, 100.0), (8.0, 100.0)],
                ),
            ],
        )];
        let v = judge(&pairs, 0.05);
        assert_eq!(
            v.beaten[0].rounds_won,
            Some(RoundCount { agreeing: 2, of: 3 })
        );
        let lines = v.lines();
        assert!(
            lines.iter().any(|l| l.ends_with("; won in 2 of 3 rounds")),
            "{lines:?}"
        );
    }

    #[test]
    fn a_win_in_a_pair_without_measured_noise_is_not_called_beyond_it() {
        let mut one_round = pair(
            "a × b",
            0.0,
            vec![
                cell(Policy::Idle, 2.0, 120.0),
                cell(Policy::Enforcer, 8.0, 100.0),
            ],
        );
        one_round.noise = None;
        let v = judge(&[one_round], 0.05);
        assert_eq!(v.beaten[0].beyond_noise, None);
        let lines = v.lines();
        let line = lines
            .iter()
            .find(|l| l.starts_with("target 2"))
            .expect("a target 2 line");
        assert!(line.contains("0 of them by more than the pair's noise (1 in pairs whose noise one round cannot show)"), "{line}");
    }

    #[test]
    fn the_flagship_pair_is_held_to_three_percent_and_ninety_percent_of_the_work() {
        let judged = |slowdown, work| {
            judge(
                &[pair(
                    "thread-per-step × threads",
                    2.0,
                    vec![
                        cell(Policy::Idle, 25.0, 100.0),
                        cell(Policy::Enforcer, slowdown, work),
                    ],
                )],
                0.05,
            )
            .flagship
            .expect("the flagship pair has an enforcer row")
            .met
        };
        assert!(judged(2.9, 95.0));
        assert!(!judged(5.6, 93.0));
        assert!(!judged(1.0, 85.0));
        // Just under 90 % is a miss, and the line does not round it up
        // to 90.
        assert!(!judged(-0.5, 89.98));
        assert!(!judged(-0.5, 89.8));
        let lines = judge(
            &[pair(
                "thread-per-step × threads",
                2.0,
                vec![
                    cell(Policy::Idle, 9.7, 100.0),
                    cell(Policy::Enforcer, -0.5, 89.98),
                ],
            )],
            0.05,
        )
        .lines();
        assert!(
            lines.iter().any(|l| l.ends_with("not met (-0.5% / 89.9%)")),
            "{lines:?}"
        );
    }

    #[test]
    fn a_written_matrix_is_read_back_with_its_budget_noise_and_cells() {
        let text = r#"{"config": {"budget_pct": 5.0}, "pairs": [
            {"training": "thread-per-step", "eval": "threads", "alone_spread": 0.02,
             "rows": [
                {"policy": "alone", "slowdown": null, "eval_vs_idle": null},
                {"policy": "idle", "slowdown": 0.25, "eval_vs_idle": 1.0},
                {"policy": "enforcer", "slowdown": 0.02, "eval_vs_idle": 0.95}]}]}"#;
        let (pairs, budget) = from_matrix_json(text).expect("a valid matrix");
        assert_eq!(budget, 0.05);
        assert_eq!(pairs.len(), 1);
        assert!(pairs[0].flagship);
        assert_eq!(pairs[0].noise, Some(0.02));
        assert_eq!(pairs[0].cells.len(), 2, "the alone row has no cell");
        assert!(pairs[0].cells.iter().all(|c| c.rounds.is_empty()));
        assert!(judge(&pairs, budget).flagship.expect("judged").met);

        // A matrix that kept its rounds: each row gets its own.
        let with_rounds = text.replace(
            r#""alone_spread": 0.02,"#,
            r#""alone_spread": 0.02, "rounds": [
                {"policy": "idle", "round": 0, "slowdown": 0.25, "eval_work_per_s": 1000.0},
                {"policy": "enforcer", "round": 0, "slowdown": 0.02, "eval_work_per_s": 950.0},
                {"policy": "enforcer", "round": 1, "slowdown": 0.03, "eval_work_per_s": 900.0},
                {"policy": "alone", "round": 0, "slowdown": null, "eval_work_per_s": null}],"#,
        );
        let (pairs, _) = from_matrix_json(&with_rounds).expect("a valid matrix");
        let enforcer = &pairs[0].cells[1];
        assert_eq!(
            enforcer.rounds,
            [
                RoundPoint {
                    round: 0,
                    slowdown: 0.02,
                    work_per_s: 950.0
                },
                RoundPoint {
                    round: 1,
                    slowdown: 0.03,
                    work_per_s: 900.0
                }
            ]
        );
        assert_eq!(pairs[0].cells[0].rounds.len(), 1);
        let bad = text.replace("\"idle\"", "\"sched-idle\"");
        let err = format!("{:#}", from_matrix_json(&bad).expect_err("unknown policy"));
        assert!(err.contains("sched-idle"), "{err}");
    }

    #[test]
    fn rows_run_apart_are_judged_as_one_matrix_if_they_share_the_budget_and_no_pair() {
        let row = |names: &[&str]| -> Vec<PairCells> {
            names
                .iter()
                .map(|n| pair(n, 2.0, vec![cell(Policy::Idle, 1.0, 100.0)]))
                .collect()
        };
        let (pairs, budget) = merge(vec![
            ("a.json".into(), row(&["a × x", "a × y"]), 0.05),
            ("b.json".into(), row(&["b × x"]), 0.05),
        ])
        .expect("two rows");
        assert_eq!(budget, 0.05);
        let names: Vec<&str> = pairs.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["a × x", "a × y", "b × x"]);

        let err = merge(vec![
            ("a.json".into(), row(&["a × x"]), 0.05),
            ("b.json".into(), row(&["b × x"]), 0.03),
        ])
        .expect_err("budgets differ");
        let err = err.to_string();
        assert!(err.contains("b.json") && err.contains("3.0%"), "{err}");

        let err = merge(vec![
            ("a.json".into(), row(&["a × x"]), 0.05),
            ("b.json".into(), row(&["a × x"]), 0.05),
        ])
        .expect_err("a pair twice");
        assert_eq!(err.to_string(), "pair a × x is in both a.json and b.json");
        assert!(merge(Vec::new()).is_err());
    }

    #[test]
    fn a_run_without_the_rows_a_target_needs_says_it_was_not_judged() {
        let v = judge(
            &[pair(
                "a × b",
                2.0,
                vec![
                    cell(Policy::Idle, 1.0, 100.0),
                    cell(Policy::Nice, 2.0, 90.0),
                ],
            )],
            0.05,
        );
        let lines = v.lines();
        assert!(lines.iter().all(|l| l.contains("not judged")), "{lines:?}");
    }
}
