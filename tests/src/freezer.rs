//! A freezer that writes a test cgroup's control file directly, for the
//! root tests that drive the duty cycle on a cgroup of their own. The agent
//! itself freezes jobs only through its one write path (the job's actuator
//! and `CgFs`); this stays in the tests.

use std::path::{Path, PathBuf};

use enforcer::gpu::duty::{FreezeError, Freezer};

/// Freezes a test cgroup directory by writing its control file: `cgroup.freeze`
/// (`1`/`0`) on v2, `freezer.state` (`FROZEN`/`THAWED`) in a v1 freezer
/// hierarchy.
#[derive(Debug, Clone)]
pub enum FsFreezer {
    V2 { file: PathBuf },
    V1 { file: PathBuf },
}

impl FsFreezer {
    /// The freezer of cgroup directory `dir`, by which control file it has.
    pub fn for_dir(dir: &Path) -> Result<Self, FreezeError> {
        let v2 = dir.join("cgroup.freeze");
        let v1 = dir.join("freezer.state");
        if v2.exists() {
            Ok(FsFreezer::V2 { file: v2 })
        } else if v1.exists() {
            Ok(FsFreezer::V1 { file: v1 })
        } else {
            Err(FreezeError::NoFreezer {
                dir: dir.to_owned(),
            })
        }
    }
}

impl Freezer for FsFreezer {
    fn freeze(&self, frozen: bool) -> Result<(), FreezeError> {
        let (file, value) = match (self, frozen) {
            (FsFreezer::V2 { file }, true) => (file, "1"),
            (FsFreezer::V2 { file }, false) => (file, "0"),
            (FsFreezer::V1 { file }, true) => (file, "FROZEN"),
            (FsFreezer::V1 { file }, false) => (file, "THAWED"),
        };
        std::fs::write(file, value).map_err(|source| FreezeError::Write {
            path: file.clone(),
            value,
            source,
        })
    }

    fn describe(&self) -> String {
        match self {
            FsFreezer::V2 { file } | FsFreezer::V1 { file } => {
                file.parent().unwrap_or(file).display().to_string()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fs_freezer_writes_v1_and_v2_values_and_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            FsFreezer::for_dir(dir.path()),
            Err(FreezeError::NoFreezer { .. })
        ));
        std::fs::write(dir.path().join("freezer.state"), "THAWED").unwrap();
        let v1 = FsFreezer::for_dir(dir.path()).unwrap();
        v1.freeze(true).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("freezer.state")).unwrap(),
            "FROZEN"
        );
        std::fs::write(dir.path().join("cgroup.freeze"), "0").unwrap();
        let v2 = FsFreezer::for_dir(dir.path()).unwrap();
        v2.freeze(true).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("cgroup.freeze")).unwrap(),
            "1"
        );
        let gone = FsFreezer::V2 {
            file: dir.path().join("nope/cgroup.freeze"),
        };
        let e = gone.freeze(true).unwrap_err().to_string();
        assert!(
            e.contains("nope/cgroup.freeze") && e.contains("\"1\""),
            "{e}"
        );
    }
}
