//! The process id type.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize};

/// A process or thread id: positive, as the kernel hands them out. Built
/// only through checked conversions, so a `u32` that does not fit or a
/// zero or negative number (which `kill` and `pidfd_open` read as process
/// groups or "every process") never becomes one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Pid(i32);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value} is not a process id (1..={max})", max = i32::MAX)]
pub struct InvalidPid {
    pub value: String,
}

impl Pid {
    /// `raw` when it is a valid process id.
    pub fn new(raw: i32) -> Option<Pid> {
        (raw > 0).then_some(Pid(raw))
    }

    /// This process.
    pub fn this_process() -> Pid {
        Pid(std::process::id() as i32)
    }

    pub fn as_raw(self) -> i32 {
        self.0
    }

    pub fn as_u32(self) -> u32 {
        self.0 as u32
    }
}

impl TryFrom<i32> for Pid {
    type Error = InvalidPid;
    fn try_from(raw: i32) -> Result<Self, InvalidPid> {
        Pid::new(raw).ok_or(InvalidPid {
            value: raw.to_string(),
        })
    }
}

impl TryFrom<u32> for Pid {
    type Error = InvalidPid;
    fn try_from(raw: u32) -> Result<Self, InvalidPid> {
        i32::try_from(raw)
            .ok()
            .and_then(Pid::new)
            .ok_or(InvalidPid {
                value: raw.to_string(),
            })
    }
}

impl From<Pid> for i32 {
    fn from(p: Pid) -> i32 {
        p.0
    }
}

impl From<Pid> for u32 {
    fn from(p: Pid) -> u32 {
        p.0 as u32
    }
}

/// Refuses what is not a process id, so that a message naming one is
/// refused where it is read.
impl<'de> Deserialize<'de> for Pid {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Pid::try_from(i32::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

impl FromStr for Pid {
    type Err = InvalidPid;
    fn from_str(s: &str) -> Result<Self, InvalidPid> {
        s.parse::<i32>()
            .ok()
            .and_then(Pid::new)
            .ok_or_else(|| InvalidPid {
                value: s.to_owned(),
            })
    }
}

impl fmt::Display for Pid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_refuse_what_is_not_a_process() {
        assert_eq!(Pid::try_from(42u32).unwrap().as_raw(), 42);
        assert!(Pid::try_from(0i32).is_err());
        assert!(Pid::try_from(-1i32).is_err());
        assert!(Pid::try_from(u32::MAX).is_err());
        assert!("self".parse::<Pid>().is_err());
        assert_eq!("17".parse::<Pid>().unwrap().to_string(), "17");
        let e = Pid::try_from(0u32).unwrap_err();
        assert!(e.to_string().contains("0 is not a process id"), "{e}");
    }

    #[test]
    fn a_message_with_a_pid_that_is_not_a_process_is_refused_where_it_is_read() {
        use serde::de::{IntoDeserializer, value::Error};
        let read = |raw: i32| Pid::deserialize(IntoDeserializer::<Error>::into_deserializer(raw));
        assert_eq!(read(42).unwrap().as_raw(), 42);
        let e = read(0).unwrap_err();
        assert!(e.to_string().contains("0 is not a process id"), "{e}");
        assert!(read(-1).is_err());
    }
}
