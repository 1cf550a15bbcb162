//! CPU lists in the kernel's syntax (`0-3,8,10-11`): the value of
//! `cpuset.cpus`, `/sys/devices/system/cpu/online` and friends.

use std::{collections::BTreeSet, fmt, path::Path};

use super::CgroupError;

/// A set of CPU numbers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct CpuList(BTreeSet<u32>);

impl CpuList {
    pub fn new(cpus: impl IntoIterator<Item = u32>) -> Self {
        Self(cpus.into_iter().collect())
    }

    /// Parses `0-3,8` (whitespace and an empty list allowed); `None` on
    /// anything else.
    pub fn parse(text: &str) -> Option<Self> {
        let mut set = BTreeSet::new();
        for part in text.trim().split(',').filter(|p| !p.trim().is_empty()) {
            let part = part.trim();
            match part.split_once('-') {
                Some((a, b)) => {
                    let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
                    if a > b || b - a > 65_536 {
                        return None;
                    }
                    set.extend(a..=b);
                }
                None => {
                    set.insert(part.parse().ok()?);
                }
            }
        }
        Some(Self(set))
    }

    /// Reads a CPU list file (a cgroup's `cpuset.cpus`, sysfs's `online`).
    pub fn read(path: &Path) -> Result<Self, CgroupError> {
        let text = super::fs::read(path)?;
        Self::parse(&text).ok_or_else(|| CgroupError::Parse {
            path: path.to_owned(),
            content: text.trim().to_owned(),
        })
    }

    /// The CPUs online now; `None` when sysfs does not say.
    pub fn online() -> Option<Self> {
        Self::read(Path::new("/sys/devices/system/cpu/online"))
            .ok()
            .filter(|c| !c.is_empty())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn contains(&self, cpu: u32) -> bool {
        self.0.contains(&cpu)
    }

    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.iter().copied()
    }

    pub fn is_subset(&self, other: &CpuList) -> bool {
        self.0.is_subset(&other.0)
    }
}

impl fmt::Display for CpuList {
    /// The kernel's syntax, ranges folded: `0-3,8`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        let mut it = self.0.iter().copied().peekable();
        while let Some(start) = it.next() {
            let mut end = start;
            while it.peek() == Some(&(end + 1)) {
                end += 1;
                it.next();
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if end == start {
                write!(f, "{start}")?;
            } else {
                write!(f, "{start}-{end}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ranges_and_singles_and_prints_them_folded() {
        let l = CpuList::parse("0-2,5, 7-8\n").expect("valid");
        assert_eq!(l.iter().collect::<Vec<_>>(), [0, 1, 2, 5, 7, 8]);
        assert_eq!(l.to_string(), "0-2,5,7-8");
        assert_eq!(CpuList::new([3, 1, 2]).to_string(), "1-3");
        assert!(CpuList::parse("\n").expect("empty is valid").is_empty());
        assert_eq!(CpuList::default().to_string(), "");
    }

    #[test]
    fn refuses_garbage_and_reversed_ranges() {
        for bad in ["a", "1-", "3-1", "1,,x", "0-99999999"] {
            assert!(CpuList::parse(bad).is_none(), "{bad:?} parsed");
        }
    }
}
