//! A test's scratch directory: configs, state dirs, reports, progress
//! files. Removed on drop.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

/// A directory under the temp dir, mode 0755 so that jobs run as another
/// user (65534) can reach the files a test puts there.
pub struct Scratch(PathBuf);

impl Scratch {
    /// A new empty directory; `prefix` names the test file in its name.
    pub fn new(prefix: &str) -> Self {
        let p = std::env::temp_dir().join(crate::unique_name(prefix));
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        Scratch(p)
    }

    pub fn dir(&self) -> &Path {
        &self.0
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// The private state directory the configs below name.
    pub fn state(&self) -> PathBuf {
        self.path("state")
    }

    /// Writes `enforcer.toml`: see [`Scratch::config_named`].
    pub fn config(&self, extra: &str) -> PathBuf {
        self.config_named("enforcer.toml", extra)
    }

    /// Writes config file `name` (mode 0644): `state_dir` = [`Scratch::state`]
    /// unless `extra` sets one, then the TOML lines of `extra`.
    pub fn config_named(&self, name: &str, extra: &str) -> PathBuf {
        let p = self.path(name);
        let state = if extra.contains("state_dir") {
            String::new()
        } else {
            format!("state_dir = \"{}\"\n", self.state().display())
        };
        std::fs::write(&p, format!("{state}{extra}\n"))
            .unwrap_or_else(|e| panic!("writing {}: {e}", p.display()));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
