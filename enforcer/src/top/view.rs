//! Drawing the [`Model`] with ratatui: a header line with the agent's own
//! cost, the protected trainings, the jobs, and a status line. Nothing
//! here decides anything; it only lays out what the model holds.

use ratatui::{
    Frame,
    layout::{Constraint, Flex, Layout, Rect},
    style::{Color, Modifier, Style},
    text::{Line, Span},
    widgets::{Block, Borders, Clear, Paragraph, Row, Table, TableState},
};

use super::model::{self, HISTORY, JobRow, Mode, Model, SortKey};
use crate::agent::proto::MeterState;

/// The keys, as the help and the status line give them.
pub const HELP: &[(&str, &str)] = &[
    ("q, Ctrl-C", "quit"),
    ("s / S", "sort by the next / previous column"),
    ("↑ ↓ (k j), Home End", "select a job"),
    (
        "c",
        "cancel the selected job (asks first; a second cancel kills it)",
    ),
    ("?", "this help (any key closes it)"),
];

/// What the job columns mean, for the help.
const COLUMNS: &[(&str, &str)] = &[
    ("MEM", "memory now / its limit"),
    ("CPU", "CPUs used since the last refresh"),
    ("THR", "share of that time held back by its CPU quota"),
    ("STEAL/s", "training run-queue wait it caused, per second"),
    (
        "STOLEN",
        "its part of its training's stolen fraction (last 1 s)",
    ),
    ("CPU HISTORY", "CPUs used at each refresh, oldest left"),
];

/// Where `enforcer top` reads from, for the header.
pub struct Source<'a> {
    pub socket: &'a str,
    pub interval: std::time::Duration,
}

pub fn draw(frame: &mut Frame, m: &Model, source: &Source<'_>) {
    let trainings = if m.trainings.is_empty() {
        0
    } else {
        m.trainings.len() as u16 + 2
    };
    let [header, trainings_area, jobs_area, status] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(trainings),
        Constraint::Min(3),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    frame.render_widget(Paragraph::new(header_line(m, source)), header);
    if trainings > 0 {
        frame.render_widget(trainings_table(m), trainings_area);
    }
    let mut state = TableState::default().with_selected(m.selected_index());
    frame.render_stateful_widget(jobs_table(m), jobs_area, &mut state);
    frame.render_widget(Paragraph::new(status_line(m)), status);
    if m.mode == Mode::Help {
        help(frame);
    }
}

fn header_line(m: &Model, source: &Source<'_>) -> Line<'static> {
    let mut spans = vec![Span::styled(
        "enforcer top",
        Style::new().add_modifier(Modifier::BOLD),
    )];
    spans.push(Span::raw(format!(
        "  {}  every {:?}",
        source.socket, source.interval
    )));
    if m.disconnected {
        spans.push(Span::styled(
            "  agent unreachable",
            Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        ));
    } else if let Some(a) = &m.agent {
        spans.push(Span::raw(format!(
            "  agent pid {} cpu {} rss {}  shims {} cpu {} rss {}",
            a.pid,
            model::percent(a.cpu),
            a.rss.map_or_else(|| "-".to_owned(), model::bytes),
            a.shims,
            model::percent(a.shims_cpu),
            model::bytes(a.shims_rss),
        )));
    }
    // Only a meter that is not working is worth the room: without it the
    // budget column means nothing and `protect` is refused.
    match &m.meter {
        Some(MeterState::Loading) if !m.disconnected => {
            spans.push(Span::styled(
                "  steal meter loading",
                Style::new().fg(Color::Yellow),
            ));
        }
        Some(MeterState::Failed(reason)) if !m.disconnected => {
            spans.push(Span::styled(
                format!("  no steal meter: {reason}"),
                Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
            ));
        }
        _ => {}
    }
    Line::from(spans)
}

fn trainings_table(m: &Model) -> Table<'static> {
    let header = Row::new([
        "TRAINING", "BUDGET", "USED 10s", "USED 1s", "SLOWDOWN", "QUOTA", "PHASE", "JOBS",
    ])
    .style(Style::new().add_modifier(Modifier::REVERSED));
    let rows = m.trainings.iter().map(|t| {
        Row::new([
            t.id.clone(),
            model::percent(t.budget),
            model::percent(t.used),
            model::percent(t.used_recent),
            model::percent(t.slowdown),
            t.quota_cores
                .map_or_else(|| "none".to_owned(), |c| format!("{c:.2}")),
            if t.frozen {
                format!("{} (frozen)", t.phase)
            } else {
                t.phase.clone()
            },
            t.jobs.to_string(),
        ])
    });
    Table::new(
        rows,
        [
            Constraint::Length(16),
            Constraint::Length(7),
            Constraint::Length(9),
            Constraint::Length(8),
            Constraint::Length(9),
            Constraint::Length(6),
            Constraint::Length(22),
            Constraint::Length(4),
        ],
    )
    .header(header)
    .block(Block::new().title("Protected trainings"))
}

/// A column title, marked when the rows are sorted by it.
fn title(name: &str, key: Option<SortKey>, sort: SortKey) -> String {
    match key {
        Some(k) if k == sort && k.descending() => format!("{name}▼"),
        Some(k) if k == sort => format!("{name}▲"),
        _ => name.to_owned(),
    }
}

fn state(r: &JobRow) -> String {
    match (r.running(), r.status) {
        (true, _) => r.state.clone(),
        (false, Some(s)) => format!("exit {s}"),
        (false, None) => r.state.clone(),
    }
}

fn jobs_table(m: &Model) -> Table<'static> {
    let columns: [(&str, Option<SortKey>); 9] = [
        ("ID", Some(SortKey::Id)),
        ("USER", Some(SortKey::User)),
        ("STATE", Some(SortKey::State)),
        ("MEM", Some(SortKey::Memory)),
        ("CPU", Some(SortKey::Cpu)),
        ("THR", Some(SortKey::Throttled)),
        ("STEAL/s", Some(SortKey::Steal)),
        ("STOLEN", None),
        ("CPU HISTORY", None),
    ];
    let header = Row::new(columns.map(|(n, k)| title(n, k, m.sort)))
        .style(Style::new().add_modifier(Modifier::REVERSED));
    let rows: Vec<&JobRow> = m.rows();
    let id_width = rows
        .iter()
        .map(|r| r.id.chars().count())
        .max()
        .unwrap_or(2)
        .clamp(4, 40) as u16;
    let body = rows.into_iter().map(|r| {
        let style = if r.running() {
            Style::new()
        } else {
            Style::new().add_modifier(Modifier::DIM)
        };
        Row::new([
            r.id.clone(),
            r.user.clone(),
            state(r),
            model::memory(r.memory, r.memory_limit),
            model::cores(r.cpu_cores),
            model::percent(r.throttled),
            r.steal_rate
                .map_or_else(|| "-".to_owned(), |s| format!("{:.0}ms", s * 1000.0)),
            model::percent(r.stolen),
            model::sparkline(&r.history),
        ])
        .style(style)
    });
    Table::new(
        body,
        [
            Constraint::Length(id_width),
            Constraint::Length(8),
            Constraint::Length(9),
            Constraint::Length(13),
            Constraint::Length(5),
            Constraint::Length(6),
            Constraint::Length(8),
            Constraint::Length(7),
            Constraint::Length(HISTORY as u16),
        ],
    )
    .header(header)
    .block(Block::new().title("Jobs"))
    .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED | Modifier::BOLD))
    .highlight_symbol("> ")
}

fn status_line(m: &Model) -> Line<'static> {
    if let Mode::Confirm(id) = &m.mode {
        return Line::from(Span::styled(
            format!("cancel job {id}? y: yes, any other key: no"),
            Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD),
        ));
    }
    match &m.message {
        Some(msg) => Line::from(Span::styled(msg.clone(), Style::new().fg(Color::Yellow))),
        None => Line::from("q quit  s/S sort  ↑/↓ select  c cancel  ? help"),
    }
}

fn help(frame: &mut Frame) {
    let mut lines: Vec<Line> = HELP
        .iter()
        .map(|(k, what)| Line::from(format!("{k:<22}{what}")))
        .collect();
    lines.push(Line::from(""));
    lines.extend(
        COLUMNS
            .iter()
            .map(|(c, what)| Line::from(format!("{c:<22}{what}"))),
    );
    let width = lines.iter().map(Line::width).max().unwrap_or(20) as u16 + 4;
    let area = centered(frame.area(), width, lines.len() as u16 + 2);
    frame.render_widget(Clear, area);
    frame.render_widget(
        Paragraph::new(lines).block(Block::new().borders(Borders::ALL).title("help")),
        area,
    );
}

fn centered(area: Rect, width: u16, height: u16) -> Rect {
    let [row] = Layout::vertical([Constraint::Length(height.min(area.height))])
        .flex(Flex::Center)
        .areas(area);
    let [cell] = Layout::horizontal([Constraint::Length(width.min(area.width))])
        .flex(Flex::Center)
        .areas(row);
    cell
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ratatui::{Terminal, backend::TestBackend};

    use super::*;
    use crate::{
        agent::proto::{JobStatus, JobUsage},
        top::model::{Key, Sample},
    };

    fn screen(m: &Model) -> String {
        let mut t = Terminal::new(TestBackend::new(110, 16)).unwrap();
        let source = Source {
            socket: "/run/enforcer/enforcer.sock",
            interval: Duration::from_secs(1),
        };
        t.draw(|f| draw(f, m, &source)).unwrap();
        let buf = t.backend().buffer().clone();
        let mut text = String::new();
        for y in 0..buf.area.height {
            for x in 0..buf.area.width {
                text.push_str(buf[(x, y)].symbol());
            }
            text.push('\n');
        }
        text
    }

    fn model() -> Model {
        let mut m = Model::default();
        let job = JobStatus {
            id: "eval-42".to_owned(),
            uid: 0,
            command: vec!["sleep".to_owned()],
            state: "running".to_owned(),
            deadline_unix_ms: 0,
            status: None,
            training: None,
            quota: None,
            usage: Some(JobUsage {
                memory_bytes: Some(3 << 20),
                memory_limit_bytes: Some(100 << 20),
                ..JobUsage::default()
            }),
        };
        let sample = Sample {
            at: Duration::ZERO,
            jobs: vec![job],
            budget: serde_json::Value::Null,
            agent: None,
            meter: Some(MeterState::Loaded),
        };
        m.update(sample, &mut |_| "root".to_owned());
        m
    }

    #[test]
    fn the_job_row_shows_its_id_user_and_memory_and_the_sorted_column_is_marked() {
        let mut m = model();
        let s = screen(&m);
        assert!(s.contains("CPU▼"), "{s}");
        let row = s.lines().find(|l| l.contains("eval-42")).expect(&s);
        assert!(row.starts_with("> "), "the only job is selected: {row}");
        assert!(row.contains("root") && row.contains("3.0M/100M"), "{row}");
        m.on_key(Key::Char('s'));
        let s = screen(&m);
        assert!(s.contains("THR▼") && !s.contains("CPU▼"), "{s}");
    }

    #[test]
    fn the_header_names_a_steal_meter_that_failed_or_is_still_loading() {
        let mut m = model();
        assert!(!screen(&m).contains("steal meter"), "loaded: nothing said");
        m.meter = Some(MeterState::Failed("BTF missing".to_owned()));
        let s = screen(&m);
        let header = s.lines().next().expect("a header line");
        assert!(header.contains("no steal meter: BTF missing"), "{s}");
        m.meter = Some(MeterState::Loading);
        assert!(screen(&m).contains("steal meter loading"));
    }

    #[test]
    fn the_status_line_asks_before_a_cancel_and_help_lists_the_keys() {
        let mut m = model();
        m.on_key(Key::Char('c'));
        assert!(screen(&m).contains("cancel job eval-42? y: yes"));
        m.on_key(Key::Char('n'));
        m.on_key(Key::Char('?'));
        let s = screen(&m);
        assert!(s.contains("help") && s.contains("sort by the next"), "{s}");
    }
}
