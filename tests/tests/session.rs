//! The job session's exit codes, the same for `run` and `game`: 126 for a
//! command that exists but cannot be executed, 127 for one that does not
//! exist.

use std::{os::unix::fs::PermissionsExt, path::PathBuf};

use enforcer_tests::{enforcer, enforcer_bin, root_tests, unique_name};

/// A private directory with a config whose state_dir is inside it; removed
/// on drop.
struct Dir(PathBuf);

impl Dir {
    fn new() -> Self {
        let p = std::env::temp_dir().join(unique_name("enforcer-session"));
        std::fs::create_dir_all(&p).expect("scratch dir");
        Dir(p)
    }
    fn config(&self) -> PathBuf {
        let p = self.0.join("enforcer.toml");
        std::fs::write(
            &p,
            format!("state_dir = \"{}\"\n", self.0.join("state").display()),
        )
        .expect("config");
        p
    }
    /// A file that exists but has no execute bit.
    fn not_executable(&self) -> PathBuf {
        let p = self.0.join("not-executable");
        std::fs::write(&p, "#!/bin/sh\nexit 0\n").expect("file");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        p
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `enforcer run` of `sh -c script`; returns its stdout.
fn run_script(dir: &Dir, script: &str) -> String {
    let cfg = dir.config();
    let out = enforcer()
        .args(["run", "--config"])
        .arg(&cfg)
        .args([
            "--job",
            &unique_name("session"),
            "--",
            "/bin/sh",
            "-c",
            script,
        ])
        .output()
        .expect("running enforcer run");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn run_and_game_give_126_for_a_command_that_cannot_be_executed() {
    let dir = Dir::new();
    let cfg = dir.config();
    let file = dir.not_executable();
    let out = enforcer()
        .args(["run", "--config"])
        .arg(&cfg)
        .args(["--job", &unique_name("session-run"), "--"])
        .arg(&file)
        .output()
        .expect("running enforcer run");
    assert_eq!(out.status.code(), Some(126), "run: {out:?}");
    let script = format!(
        "{e} game --config {c} -- {f}; echo game=$?",
        e = enforcer_bin().display(),
        c = cfg.display(),
        f = file.display()
    );
    let stdout = run_script(&dir, &script);
    assert!(stdout.contains("game=126"), "game: {stdout}");
}

fn run_and_game_give_127_for_a_command_that_does_not_exist() {
    let dir = Dir::new();
    let cfg = dir.config();
    let missing = dir.0.join("no-such-command");
    let out = enforcer()
        .args(["run", "--config"])
        .arg(&cfg)
        .args(["--job", &unique_name("session-run"), "--"])
        .arg(&missing)
        .output()
        .expect("running enforcer run");
    assert_eq!(out.status.code(), Some(127), "run: {out:?}");
    let script = format!(
        "{e} game --config {c} -- {m}; echo game=$?",
        e = enforcer_bin().display(),
        c = cfg.display(),
        m = missing.display()
    );
    let stdout = run_script(&dir, &script);
    assert!(stdout.contains("game=127"), "game: {stdout}");
}

root_tests!(
    run_and_game_give_126_for_a_command_that_cannot_be_executed,
    run_and_game_give_127_for_a_command_that_does_not_exist,
);
