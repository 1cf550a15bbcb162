//! The job session's exit codes, the same for `run` and `game`: 126 for a
//! command that exists but cannot be executed, 127 for one that does not
//! exist.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use enforcer_tests::{EnforcerRun, Scratch, enforcer_bin, root_tests, unique_name};

/// A file in `s` that exists but has no execute bit.
fn not_executable(s: &Scratch) -> PathBuf {
    let p = s.path("not-executable");
    std::fs::write(&p, "#!/bin/sh\nexit 0\n").expect("file");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    p
}

/// `enforcer run` of `sh -c script`; returns its stdout.
fn run_script(cfg: &Path, script: &str) -> String {
    let out = EnforcerRun::new(cfg, &unique_name("session")).output(["/bin/sh", "-c", script]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `run` and `game` of `command` exit with `code`.
fn run_and_game_exit_with(s: &Scratch, command: &Path, code: i32) {
    let cfg = s.config("");
    let out = EnforcerRun::new(&cfg, &unique_name("session-run")).output([command]);
    assert_eq!(out.status.code(), Some(code), "run: {out:?}");
    let script = format!(
        "{e} game --config {c} -- {f}; echo game=$?",
        e = enforcer_bin().display(),
        c = cfg.display(),
        f = command.display()
    );
    let stdout = run_script(&cfg, &script);
    assert!(stdout.contains(&format!("game={code}")), "game: {stdout}");
}

fn run_and_game_give_126_for_a_command_that_cannot_be_executed() {
    let s = Scratch::new("enforcer-session");
    let file = not_executable(&s);
    run_and_game_exit_with(&s, &file, 126);
}

fn run_and_game_give_127_for_a_command_that_does_not_exist() {
    let s = Scratch::new("enforcer-session");
    run_and_game_exit_with(&s, &s.path("no-such-command"), 127);
}

root_tests!(
    run_and_game_give_126_for_a_command_that_cannot_be_executed,
    run_and_game_give_127_for_a_command_that_does_not_exist,
);
