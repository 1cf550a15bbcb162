//! `enforcer top`: the live view ([`crate::top`]) on a terminal, fed by
//! the agent's `status` every interval; `c` goes through the agent's
//! `cancel`, so the agent decides who may cancel what.

use std::{
    collections::BTreeMap,
    io::IsTerminal,
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use clap::Args;
use crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

use crate::{
    agent::{
        client::{self, Conn},
        proto::{Request, Response},
    },
    job::session::{EXIT_FAILURE, EXIT_USAGE},
    top::{
        model::{Action, Key, Model, Sample},
        view::{self, Source},
    },
    units::Dur,
    validate::{self, Checker, Node},
};

/// Show the node live: each protected training's budget use and
/// slowdown, each job's memory, CPU, throttling and steal with a short CPU
/// history, and what the agent itself costs. Keys: `q` quit, `s` / `S`
/// sort, up / down select, `c` cancel the selected job (the agent decides
/// whether you may), `?` help.
///
/// You see the jobs the agent shows you: your own, or every job as root.
/// Exit status: 0; 2 when no agent answers or the flags are wrong.
#[derive(Debug, Args)]
pub struct TopArgs {
    /// The agent's socket.
    #[arg(long, env = "ENFORCER_SOCKET", default_value = client::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// How often to ask the agent, from 100ms to 60s (rates are over this
    /// interval).
    #[arg(long, default_value = "1s")]
    pub interval: Dur,
}

/// How long an answer may take before the agent is shown as unreachable.
const ANSWER_LIMIT: Duration = Duration::from_secs(5);

pub fn run(args: TopArgs) -> ExitCode {
    let mut check = Checker::new(validate::Source::Flags, Node::detect());
    check.check(&validate::TOP_INTERVAL, Some(args.interval));
    if let Err(e) = check.finish() {
        tracing::error!("{e}");
        return ExitCode::from(EXIT_USAGE);
    }
    let conn = match Conn::open_within(&args.socket, Some(ANSWER_LIMIT)) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{}", client::no_agent_message(&args.socket, &e.to_string()));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if !std::io::stdout().is_terminal() {
        tracing::error!("enforcer top draws on a terminal, and stdout is not one");
        return ExitCode::from(EXIT_USAGE);
    }
    // Raw mode and the alternate screen; restored on return and on a
    // panic (ratatui's hook).
    let mut terminal = match ratatui::try_init() {
        Ok(t) => t,
        Err(e) => {
            let _ = ratatui::try_restore();
            tracing::error!("setting up the terminal failed: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let shown = show(&mut terminal, Some(conn), &args);
    let cursor = terminal.show_cursor();
    let restored = ratatui::try_restore().and(cursor);
    match (shown, restored) {
        (Ok(()), Ok(())) => ExitCode::SUCCESS,
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!("the terminal failed: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// The screen's loop: ask, draw, wait for a key or the next interval.
fn show(
    terminal: &mut ratatui::DefaultTerminal,
    mut conn: Option<Conn>,
    args: &TopArgs,
) -> std::io::Result<()> {
    let socket = args.socket.display().to_string();
    let source = Source {
        socket: &socket,
        interval: args.interval.0,
    };
    let start = Instant::now();
    let mut model = Model::default();
    let mut names = UserNames::default();
    let mut next = Instant::now();
    loop {
        if Instant::now() >= next {
            match status(&mut conn, &args.socket) {
                Ok(mut sample) => {
                    sample.at = start.elapsed();
                    model.update(sample, &mut |uid| names.name(uid));
                }
                Err(why) => model.lost(why),
            }
            next = Instant::now() + args.interval.0;
        }
        terminal.draw(|f| view::draw(f, &model, &source))?;
        if !event::poll(next.saturating_duration_since(Instant::now()))? {
            continue;
        }
        let Event::Key(k) = event::read()? else {
            // A resize: drawn again at once.
            continue;
        };
        let Some(key) = key_of(k) else { continue };
        match model.on_key(key) {
            Action::Quit => return Ok(()),
            Action::Cancel(id) => {
                let answer = cancel(&mut conn, &args.socket, &id);
                model.cancelled(&id, answer);
                // Show the job's new state without waiting an interval.
                next = Instant::now();
            }
            Action::None => {}
        }
    }
}

fn key_of(k: KeyEvent) -> Option<Key> {
    if k.kind != KeyEventKind::Press {
        return None;
    }
    Some(match k.code {
        KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => Key::Interrupt,
        KeyCode::Char(c) => Key::Char(c),
        KeyCode::Up => Key::Up,
        KeyCode::Down => Key::Down,
        KeyCode::Home => Key::Home,
        KeyCode::End => Key::End,
        KeyCode::Esc => Key::Esc,
        KeyCode::Enter => Key::Enter,
        _ => return None,
    })
}

/// One request and its answer; the connection is dropped (and made again
/// at the next request) when it fails, so that a restarted agent is found.
fn ask(conn: &mut Option<Conn>, socket: &Path, request: &Request) -> Result<Response, String> {
    let c = match conn {
        Some(c) => c,
        None => conn.insert(
            Conn::open_within(socket, Some(ANSWER_LIMIT))
                .map_err(|e| client::no_agent_message(socket, &e.to_string()))?,
        ),
    };
    let answer = c.send(request, &[]).and_then(|()| c.recv());
    match answer {
        Ok(Some(r)) => Ok(r),
        Ok(None) => {
            *conn = None;
            Err("the agent closed the connection".to_owned())
        }
        Err(e) => {
            *conn = None;
            Err(format!("lost the agent: {e}"))
        }
    }
}

fn status(conn: &mut Option<Conn>, socket: &Path) -> Result<Sample, String> {
    match ask(conn, socket, &Request::Status)? {
        Response::Status {
            jobs,
            budget,
            agent,
            meter,
        } => Ok(Sample {
            at: Duration::ZERO,
            jobs,
            budget,
            agent,
            meter,
        }),
        Response::Error { message, .. } => Err(message),
        other => {
            *conn = None;
            Err(format!("unexpected answer to status: {other:?}"))
        }
    }
}

/// The agent's answer to `cancel`: its refusal is the message shown.
fn cancel(conn: &mut Option<Conn>, socket: &Path, id: &str) -> Result<(), String> {
    let request = Request::Cancel { id: id.to_owned() };
    match ask(conn, socket, &request)? {
        Response::Cancelled { .. } => Ok(()),
        Response::Error { message, .. } => Err(message),
        other => {
            *conn = None;
            Err(format!("unexpected answer to cancel: {other:?}"))
        }
    }
}

/// User names by uid, looked up once each (the uid when there is none).
#[derive(Default)]
struct UserNames(BTreeMap<u32, String>);

impl UserNames {
    fn name(&mut self, uid: u32) -> String {
        self.0
            .entry(uid)
            .or_insert_with(|| {
                nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
                    .ok()
                    .flatten()
                    .map_or_else(|| uid.to_string(), |u| u.name)
            })
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctrl_c_is_an_interrupt_and_only_presses_count() {
        let press = |code, modifiers| KeyEvent::new(code, modifiers);
        assert_eq!(
            key_of(press(KeyCode::Char('c'), KeyModifiers::CONTROL)),
            Some(Key::Interrupt)
        );
        assert_eq!(
            key_of(press(KeyCode::Char('c'), KeyModifiers::NONE)),
            Some(Key::Char('c'))
        );
        assert_eq!(
            key_of(press(KeyCode::Char('S'), KeyModifiers::SHIFT)),
            Some(Key::Char('S'))
        );
        let mut release = press(KeyCode::Char('q'), KeyModifiers::NONE);
        release.kind = KeyEventKind::Release;
        assert_eq!(key_of(release), None);
        assert_eq!(key_of(press(KeyCode::F(5), KeyModifiers::NONE)), None);
    }

    #[test]
    fn the_interval_is_bounded_and_the_refusal_names_the_flag() {
        let mut check = Checker::new(validate::Source::Flags, Node::detect());
        check.check(&validate::TOP_INTERVAL, Some(Dur::millis(10)));
        let e = check.finish().unwrap_err().to_string();
        assert_eq!(e, "--interval 10ms: must be from 100ms to 1m");
        let mut check = Checker::new(validate::Source::Flags, Node::detect());
        check.check(&validate::TOP_INTERVAL, Some(Dur::secs(1)));
        assert!(check.finish().is_ok());
    }
}
