//! The contention bench's plot: training slowdown, stolen (wait) fraction,
//! evaluation CPU and quota over time for one run, as an SVG.

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::prelude::*;

/// One sample of a run.
pub struct Point {
    pub t: f64,
    pub step: u64,
    pub run_ns: u64,
    pub delay_ns: u64,
    pub eval_cpu_s: f64,
    pub quota: Option<f64>,
    /// The controller's (or the enforcer's) stolen fraction, when known.
    pub stolen: Option<f64>,
}

/// Trailing-window series derived from the samples.
pub struct Series {
    pub slowdown_pct: Vec<(f64, f64)>,
    pub wait_pct: Vec<(f64, f64)>,
    pub stolen_pct: Vec<(f64, f64)>,
    pub eval_cores: Vec<(f64, f64)>,
    pub quota_cores: Vec<(f64, f64)>,
}

impl Series {
    /// Slowdown and wait over a trailing 1 s, evaluation CPU over 0.5 s.
    pub fn from_ticks(points: &[Point], alone_steps_per_s: f64) -> Self {
        let mut s = Series {
            slowdown_pct: Vec::new(),
            wait_pct: Vec::new(),
            stolen_pct: Vec::new(),
            eval_cores: Vec::new(),
            quota_cores: Vec::new(),
        };
        for (i, b) in points.iter().enumerate() {
            let back = |w: f64| points[..i].iter().rev().find(|a| b.t - a.t >= w - 0.05);
            if let Some(a) = back(1.0) {
                let dt = b.t - a.t;
                let rate = b.step.saturating_sub(a.step) as f64 / dt;
                s.slowdown_pct
                    .push((b.t, (1.0 - rate / alone_steps_per_s) * 100.0));
                let d = b.delay_ns.saturating_sub(a.delay_ns) as f64;
                let r = b.run_ns.saturating_sub(a.run_ns) as f64;
                if d + r > 0.0 {
                    s.wait_pct.push((b.t, d / (d + r) * 100.0));
                }
            }
            if let Some(a) = back(0.5) {
                s.eval_cores
                    .push((b.t, (b.eval_cpu_s - a.eval_cpu_s) / (b.t - a.t)));
            }
            if let Some(q) = b.quota {
                s.quota_cores.push((b.t, q));
            }
            if let Some(f) = b.stolen {
                s.stolen_pct.push((b.t, f * 100.0));
            }
        }
        s
    }
}

pub fn draw(path: &Path, title: &str, s: &Series, budget_pct: f64, cpus: f64) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| anyhow!("drawing {}: {e}", path.display());
    let root = SVGBackend::new(path, (900, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (top, bottom) = root.split_vertically(320);
    let t_max = s
        .slowdown_pct
        .iter()
        .chain(&s.eval_cores)
        .map(|p| p.0)
        .fold(1.0, f64::max);
    let y_max = s
        .slowdown_pct
        .iter()
        .chain(&s.wait_pct)
        .chain(&s.stolen_pct)
        .map(|p| p.1)
        .fold(budget_pct * 3.0, f64::max)
        .min(100.0);
    let y_min = s
        .slowdown_pct
        .iter()
        .map(|p| p.1)
        .fold(-5.0, f64::min)
        .max(-50.0);

    let mut c = ChartBuilder::on(&top)
        .caption(format!("training under {title}"), ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..t_max, y_min..y_max)
        .map_err(|e| err(&e))?;
    c.configure_mesh()
        .x_desc("seconds since the evaluation started")
        .y_desc("%")
        .draw()
        .map_err(|e| err(&e))?;
    c.draw_series(LineSeries::new(s.slowdown_pct.iter().copied(), &BLUE))
        .map_err(|e| err(&e))?
        .label("training slowdown (1 s)")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE));
    c.draw_series(LineSeries::new(s.wait_pct.iter().copied(), &RED))
        .map_err(|e| err(&e))?
        .label("training run-queue wait, any cause (schedstat, 1 s)")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED));
    c.draw_series(LineSeries::new(s.stolen_pct.iter().copied(), &CYAN))
        .map_err(|e| err(&e))?
        .label("stolen fraction, as the loop measured it (1 s)")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], CYAN));
    c.draw_series(LineSeries::new(
        [(0.0, budget_pct), (t_max, budget_pct)],
        BLACK.stroke_width(1),
    ))
    .map_err(|e| err(&e))?
    .label("budget")
    .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK));
    c.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;

    let mut c = ChartBuilder::on(&bottom)
        .caption("evaluation CPU", ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..t_max, 0.0..cpus)
        .map_err(|e| err(&e))?;
    c.configure_mesh()
        .x_desc("seconds since the evaluation started")
        .y_desc("cores")
        .draw()
        .map_err(|e| err(&e))?;
    c.draw_series(LineSeries::new(s.eval_cores.iter().copied(), &GREEN))
        .map_err(|e| err(&e))?
        .label("evaluation CPU (0.5 s)")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], GREEN));
    c.draw_series(LineSeries::new(s.quota_cores.iter().copied(), &MAGENTA))
        .map_err(|e| err(&e))?
        .label("quota")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], MAGENTA));
    c.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// One pair of the matrix: its name and, per policy, (slowdown %,
/// evaluation work vs SCHED_IDLE %).
pub struct MatrixPanel {
    pub title: String,
    pub points: Vec<(String, f64, f64)>,
}

/// The matrix plot: one panel per pair, each policy a point of (slowdown,
/// evaluation work vs SCHED_IDLE); good is bottom right of the budget line
/// (left of it) and high. Policies share colours across panels.
pub fn draw_matrix(path: &Path, panels: &[MatrixPanel], budget_pct: f64) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| anyhow!("drawing {}: {e}", path.display());
    let cols = 5_usize;
    let rows = panels.len().div_ceil(cols).max(1);
    let root =
        SVGBackend::new(path, (300 * cols as u32, 260 * rows as u32 + 40)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (legend, grid) = root.split_vertically(40);
    let mut policies: Vec<&str> = Vec::new();
    for p in panels {
        for (name, _, _) in &p.points {
            if !policies.contains(&name.as_str()) {
                policies.push(name);
            }
        }
    }
    let colour = |name: &str| {
        let i = policies.iter().position(|p| *p == name).unwrap_or(0);
        Palette99::pick(i).to_rgba()
    };
    for (i, name) in policies.iter().enumerate() {
        let x = 10 + 160 * i as i32;
        legend
            .draw(&Circle::new((x, 20), 5, colour(name).filled()))
            .map_err(|e| err(&e))?;
        legend
            .draw(&Text::new(
                name.to_string(),
                (x + 10, 14),
                ("sans-serif", 13),
            ))
            .map_err(|e| err(&e))?;
    }
    for (area, p) in grid.split_evenly((rows, cols)).iter().zip(panels) {
        let x_max = p
            .points
            .iter()
            .map(|q| q.1)
            .fold(budget_pct * 3.0, f64::max)
            .min(100.0);
        let y_max = p
            .points
            .iter()
            .map(|q| q.2)
            .fold(120.0, f64::max)
            .min(400.0);
        let mut c = ChartBuilder::on(area)
            .caption(&p.title, ("sans-serif", 14))
            .margin(6)
            .x_label_area_size(28)
            .y_label_area_size(36)
            .build_cartesian_2d(-5.0..x_max, 0.0..y_max)
            .map_err(|e| err(&e))?;
        c.configure_mesh()
            .x_desc("slowdown %")
            .y_desc("eval vs idle %")
            .light_line_style(WHITE)
            .draw()
            .map_err(|e| err(&e))?;
        c.draw_series(LineSeries::new(
            [(budget_pct, 0.0), (budget_pct, y_max)],
            BLACK.stroke_width(1),
        ))
        .map_err(|e| err(&e))?;
        c.draw_series(
            p.points
                .iter()
                .map(|(name, x, y)| Circle::new((*x, *y), 4, colour(name).filled())),
        )
        .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_matrix_plot_has_a_panel_per_pair_and_a_legend_per_policy() {
        let dir = std::env::temp_dir().join(format!("xtask-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let svg = dir.join("m.svg");
        let panels: Vec<MatrixPanel> = ["a × b", "c × d"]
            .iter()
            .map(|t| MatrixPanel {
                title: (*t).to_owned(),
                points: vec![("idle".into(), 3.0, 100.0), ("enforcer".into(), 1.5, 96.0)],
            })
            .collect();
        draw_matrix(&svg, &panels, 5.0).expect("drawn");
        let text = std::fs::read_to_string(&svg).expect("svg written");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(text.contains("a × b") && text.contains("c × d"));
        assert_eq!(
            text.matches("enforcer").count(),
            1,
            "one legend entry: {text}"
        );
    }
}
