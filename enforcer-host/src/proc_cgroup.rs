//! `/proc/<pid>/cgroup`: where a process sits in each cgroup hierarchy.

use std::collections::BTreeMap;

/// A cgroup hierarchy as `/proc/<pid>/cgroup` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    /// The v2 hierarchy: the `0::/path` line.
    Unified,
    /// A v1 hierarchy holding this controller (`N:cpu,cpuacct:/path`).
    V1(String),
}

/// One line: `hierarchy-id:controller,list:/path` (see cgroups(7)).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Line {
    id: String,
    controllers: Vec<String>,
    path: String,
}

/// The parsed `/proc/<pid>/cgroup` of one process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcCgroup {
    lines: Vec<Line>,
}

impl ProcCgroup {
    /// Lines that do not have three fields are skipped; the path keeps any
    /// `:` it contains.
    pub fn parse(text: &str) -> Self {
        let lines = text
            .lines()
            .filter_map(|line| {
                let mut parts = line.splitn(3, ':');
                let (id, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
                Some(Line {
                    id: id.to_owned(),
                    controllers: ctrls
                        .split(',')
                        .filter(|c| !c.is_empty())
                        .map(str::to_owned)
                        .collect(),
                    path: path.to_owned(),
                })
            })
            .collect();
        ProcCgroup { lines }
    }

    /// The path in the v2 hierarchy (the `0::` line).
    pub fn unified(&self) -> Option<&str> {
        self.lines
            .iter()
            .find(|l| l.id == "0" && l.controllers.is_empty())
            .map(|l| l.path.as_str())
    }

    /// The path in the v1 hierarchy that carries `controller` (or a named
    /// hierarchy, `name=systemd`).
    pub fn v1(&self, controller: &str) -> Option<&str> {
        self.lines
            .iter()
            .find(|l| l.controllers.iter().any(|c| c == controller))
            .map(|l| l.path.as_str())
    }

    pub fn path_in(&self, hierarchy: &Hierarchy) -> Option<&str> {
        match hierarchy {
            Hierarchy::Unified => self.unified(),
            Hierarchy::V1(c) => self.v1(c),
        }
    }

    /// Whether the process is in the cgroup `root` of `hierarchy` (as this
    /// file prints paths) or below it: by path components, so `/job-10` is
    /// not within `/job-1`.
    pub fn is_within(&self, hierarchy: &Hierarchy, root: &str) -> bool {
        let Some(path) = self.path_in(hierarchy) else {
            return false;
        };
        let root = root.trim_end_matches('/');
        root.is_empty()
            || path == root
            || path
                .strip_prefix(root)
                .is_some_and(|rest| rest.starts_with('/'))
    }

    /// Controller → path; the v2 path is under the empty name, and a line
    /// naming several controllers yields one entry per controller.
    pub fn by_controller(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for l in &self.lines {
            if l.controllers.is_empty() {
                out.insert(String::new(), l.path.clone());
            }
            for c in &l.controllers {
                out.insert(c.clone(), l.path.clone());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hybrid_lines_split_comma_joined_controllers_and_keep_the_v2_path() {
        let c = ProcCgroup::parse(
            "12:freezer:/eval/job-1\n4:cpu,cpuacct:/a/b\n1:name=systemd:/user.slice\n0::/user.slice/x.scope\n",
        );
        assert_eq!(c.v1("cpu"), Some("/a/b"));
        assert_eq!(c.v1("cpuacct"), Some("/a/b"));
        assert_eq!(c.v1("name=systemd"), Some("/user.slice"));
        assert_eq!(
            c.path_in(&Hierarchy::V1("freezer".into())),
            Some("/eval/job-1")
        );
        assert_eq!(c.unified(), Some("/user.slice/x.scope"));
        assert_eq!(c.v1("memory"), None);
        let m = c.by_controller();
        assert_eq!(m[""], "/user.slice/x.scope");
        assert_eq!(m["cpuacct"], "/a/b");
    }

    #[test]
    fn within_is_by_path_components_in_the_named_hierarchy_only() {
        let c = ProcCgroup::parse("4:cpu,cpuacct:/eval/job-1/game-2\n0::/eval/job-10\n");
        let cpu = Hierarchy::V1("cpu".into());
        assert!(c.is_within(&cpu, "/eval/job-1"));
        assert!(c.is_within(&cpu, "/eval/job-1/"));
        assert!(c.is_within(&cpu, "/eval/job-1/game-2"));
        assert!(!c.is_within(&cpu, "/eval/job-1/game"));
        assert!(c.is_within(&Hierarchy::Unified, "/eval/job-10"));
        // A prefix of the name is another cgroup.
        assert!(!c.is_within(&Hierarchy::Unified, "/eval/job-1"));
        // Not in that hierarchy at all.
        assert!(!c.is_within(&Hierarchy::V1("memory".into()), "/"));
    }

    #[test]
    fn a_unified_only_task_at_the_root_has_just_the_v2_line() {
        let c = ProcCgroup::parse("0::/\n");
        assert_eq!(c.unified(), Some("/"));
        assert_eq!(c.v1("cpu"), None);
        assert_eq!(c.by_controller().len(), 1);
    }

    #[test]
    fn paths_with_colons_and_spaces_are_kept_whole_and_junk_lines_skipped() {
        let c = ProcCgroup::parse("garbage\n0::/a b/c:d (deleted)\n");
        assert_eq!(c.unified(), Some("/a b/c:d (deleted)"));
    }
}
