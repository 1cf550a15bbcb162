//! The CPU burner of the duty-cycle root tests.

use std::process::{Command, Stdio};

use enforcer_tests::ChildGuard;

/// A busy-looping shell, killed on drop.
pub fn burner() -> ChildGuard {
    ChildGuard(
        Command::new("/bin/sh")
            .args(["-c", "while :; do :; done"])
            .stdin(Stdio::null())
            .spawn()
            .expect("starting /bin/sh"),
    )
}
