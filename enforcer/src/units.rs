//! Typed units, parsed once at the edge (config file, command line) so that
//! the rest of the code never sees a unit string.
//!
//! - [`ByteSize`]: `1000M`, `1GiB`, `300MiB`, `1.5G`, `4096` (plain bytes).
//!   Binary multiples throughout, as systemd and Docker read them: `K`/`KiB`
//!   = 1024, `M`/`MiB` = 1024², `G`/`GiB` = 1024³, `T`/`TiB` = 1024⁴. The SI
//!   spellings `KB`, `MB`, `GB`, `TB` are decimal (1000ⁿ), because that is
//!   what they say.
//! - [`Dur`] (a `Duration`): `100ms`, `300s`, `30m`, `2h`, `1d`, `1.5s`; a
//!   plain number is seconds.
//! - [`Percent`]: `5%`, or a fraction between 0 and 1 (`0.05`). A bare number
//!   above 1 is refused rather than guessed (is `5` five percent or 500 %?).
//! - [`Cores`]: a positive number of CPUs, `1.5`.
//!
//! Every type deserialises from a TOML string or number and has a clap value
//! parser (`FromStr`).

use std::{fmt, str::FromStr, time::Duration};

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {value:?}: {why}")]
pub struct UnitError {
    pub what: &'static str,
    pub value: String,
    pub why: String,
}

fn err(what: &'static str, value: &str, why: impl Into<String>) -> UnitError {
    UnitError {
        what,
        value: value.to_owned(),
        why: why.into(),
    }
}

/// Splits `"1.5GiB"` into `("1.5", "GiB")`.
fn split_number(s: &str) -> (&str, &str) {
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    (s[..end].trim(), s[end..].trim())
}

/// A number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub const fn mib(n: u64) -> Self {
        ByteSize(n * 1024 * 1024)
    }
    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl FromStr for ByteSize {
    type Err = UnitError;
    fn from_str(s: &str) -> Result<Self, UnitError> {
        let s = s.trim();
        let (num, unit) = split_number(s);
        if num.is_empty() {
            return Err(err(
                "size",
                s,
                "expected a number with an optional unit, like 1000M or 1GiB",
            ));
        }
        let n: f64 = num.parse().map_err(|_| err("size", s, "not a number"))?;
        let mult: f64 = match unit {
            "" | "B" => 1.0,
            "K" | "k" | "KiB" => 1024.0,
            "M" | "MiB" => 1024.0 * 1024.0,
            "G" | "GiB" => 1024.0 * 1024.0 * 1024.0,
            "T" | "TiB" => 1024.0f64.powi(4),
            "KB" | "kB" => 1e3,
            "MB" => 1e6,
            "GB" => 1e9,
            "TB" => 1e12,
            other => {
                return Err(err(
                    "size",
                    s,
                    format!("unknown unit {other:?} (use B, K, M, G, T, KiB, MiB, GiB, MB, GB)"),
                ));
            }
        };
        let bytes = n * mult;
        if !bytes.is_finite() || bytes >= u64::MAX as f64 {
            return Err(err("size", s, "too large"));
        }
        Ok(ByteSize(bytes.round() as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u64); 4] = [
            ("TiB", 1 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ];
        for (name, size) in UNITS {
            if self.0 >= size && self.0.is_multiple_of(size) {
                return write!(f, "{}{name}", self.0 / size);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Accepts a string with units, or a number (bytes, seconds, cores...).
struct StrOrNum<T>(std::marker::PhantomData<T>, &'static str);

impl<T> de::Visitor<'_> for StrOrNum<T>
where
    T: FromStr<Err = UnitError>,
{
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.1)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        v.parse().map_err(|e: UnitError| E::custom(e))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        self.visit_str(&v.to_string())
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        self.visit_str(&v.to_string())
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<T, E> {
        self.visit_str(&v.to_string())
    }
}

macro_rules! deserialize_via_from_str {
    ($ty:ty, $expect:literal) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                d.deserialize_any(StrOrNum::<$ty>(std::marker::PhantomData, $expect))
            }
        }
    };
}

deserialize_via_from_str!(
    ByteSize,
    "a size like \"1000M\", \"1GiB\" or a number of bytes"
);
deserialize_via_from_str!(
    Dur,
    "a duration like \"300s\", \"30m\", \"100ms\" or a number of seconds"
);
deserialize_via_from_str!(Percent, "a percentage like \"5%\" or a fraction like 0.05");
deserialize_via_from_str!(Cores, "a number of CPUs like 1.5");

/// A duration with a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Dur(pub Duration);

impl Dur {
    /// The longest duration any parser accepts: a year, the longest
    /// deadline. Far below what `Instant + Duration` can hold, so that no
    /// parsed value can overflow a deadline computed from it.
    pub const MAX: Dur = Dur::secs(365 * 86_400);

    pub const fn secs(s: u64) -> Self {
        Dur(Duration::from_secs(s))
    }
    pub const fn millis(ms: u64) -> Self {
        Dur(Duration::from_millis(ms))
    }
}

impl FromStr for Dur {
    type Err = UnitError;
    fn from_str(s: &str) -> Result<Self, UnitError> {
        let s = s.trim();
        let (num, unit) = split_number(s);
        if num.is_empty() {
            return Err(err(
                "duration",
                s,
                "expected a number with a unit, like 300s, 30m, 2h or 100ms",
            ));
        }
        let n: f64 = num
            .parse()
            .map_err(|_| err("duration", s, "not a number"))?;
        let secs = match unit {
            "" | "s" | "sec" => n,
            "ms" => n / 1e3,
            "us" | "µs" => n / 1e6,
            "m" | "min" => n * 60.0,
            "h" => n * 3600.0,
            "d" => n * 86400.0,
            other => {
                return Err(err(
                    "duration",
                    s,
                    format!("unknown unit {other:?} (use ms, s, m, h, d)"),
                ));
            }
        };
        if !(secs.is_finite() && secs <= Dur::MAX.0.as_secs_f64()) {
            return Err(err(
                "duration",
                s,
                format!("out of range: must be at most {}", Dur::MAX),
            ));
        }
        Duration::try_from_secs_f64(secs)
            .map(Dur)
            .map_err(|_| err("duration", s, "out of range"))
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        let ms = d.as_millis();
        if d.is_zero() {
            return f.write_str("0s");
        }
        if d.subsec_nanos() != 0 {
            if d.subsec_nanos().is_multiple_of(1_000_000) {
                return write!(f, "{ms}ms");
            }
            return write!(f, "{}s", d.as_secs_f64());
        }
        let s = d.as_secs();
        if s.is_multiple_of(86_400) {
            write!(f, "{}d", s / 86_400)
        } else if s.is_multiple_of(3600) {
            write!(f, "{}h", s / 3600)
        } else if s.is_multiple_of(60) {
            write!(f, "{}m", s / 60)
        } else {
            write!(f, "{s}s")
        }
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A share, stored as a fraction (`5%` is `0.05`).
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct Percent(f64);

impl Percent {
    pub const ONE: Percent = Percent(1.0);

    /// A fraction in `[0, 1]`... or above 1 for shares like 150 %.
    pub const fn from_fraction(f: f64) -> Self {
        Percent(f)
    }
    pub fn fraction(self) -> f64 {
        self.0
    }
}

impl FromStr for Percent {
    type Err = UnitError;
    fn from_str(s: &str) -> Result<Self, UnitError> {
        let s = s.trim();
        let (num, pct) = match s.strip_suffix('%') {
            Some(n) => (n.trim(), true),
            None => (s, false),
        };
        let n: f64 = num.parse().map_err(|_| {
            err(
                "percentage",
                s,
                "expected a percentage like 5% or a fraction like 0.05",
            )
        })?;
        if !n.is_finite() || n < 0.0 {
            return Err(err("percentage", s, "must be a non-negative number"));
        }
        if pct {
            Ok(Percent(n / 100.0))
        } else if n <= 1.0 {
            Ok(Percent(n))
        } else {
            Err(err(
                "percentage",
                s,
                format!("a bare number is a fraction between 0 and 1; write {n}% for percent"),
            ))
        }
    }
}

impl fmt::Display for Percent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = self.0 * 100.0;
        if (p - p.round()).abs() < 1e-9 {
            write!(f, "{}%", p.round())
        } else {
            write!(f, "{p}%")
        }
    }
}

impl Serialize for Percent {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A positive number of CPUs (`1.5` = one and a half CPUs of quota).
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct Cores(f64);

impl Cores {
    pub fn get(self) -> f64 {
        self.0
    }
    /// The smallest quota the parser accepts: the kernel's smallest CFS
    /// quota is 1 ms per 100 ms period.
    pub const MIN: Cores = Cores(0.01);

    pub fn new(cores: f64) -> Option<Self> {
        (cores.is_finite() && cores > 0.0).then_some(Cores(cores))
    }
}

impl FromStr for Cores {
    type Err = UnitError;
    fn from_str(s: &str) -> Result<Self, UnitError> {
        let s = s.trim();
        let n: f64 = s
            .parse()
            .map_err(|_| err("cores", s, "expected a number of CPUs like 1.5"))?;
        if !(n.is_finite() && n >= Cores::MIN.0) {
            return Err(err("cores", s, "must be at least 0.01"));
        }
        Ok(Cores(n))
    }
}

impl fmt::Display for Cores {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `1e300` would otherwise print as three hundred digits.
        if self.0.abs() >= 1e6 {
            write!(f, "{:e}", self.0)
        } else {
            write!(f, "{}", self.0)
        }
    }
}

impl Serialize for Cores {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_use_binary_multiples_except_si_spellings() {
        assert_eq!("1000M".parse::<ByteSize>().unwrap(), ByteSize::mib(1000));
        assert_eq!("1GiB".parse::<ByteSize>().unwrap().0, 1 << 30);
        assert_eq!("300MiB".parse::<ByteSize>().unwrap(), ByteSize::mib(300));
        assert_eq!("4096".parse::<ByteSize>().unwrap().0, 4096);
        assert_eq!("1.5G".parse::<ByteSize>().unwrap().0, 3 << 29);
        assert_eq!("2MB".parse::<ByteSize>().unwrap().0, 2_000_000);
        assert!("12X".parse::<ByteSize>().is_err());
        assert!("-1M".parse::<ByteSize>().is_err());
        assert!("M".parse::<ByteSize>().is_err());
        assert_eq!(ByteSize::mib(1000).to_string(), "1000MiB");
    }

    #[test]
    fn durations_accept_ms_s_m_h_and_plain_seconds() {
        assert_eq!(
            "100ms".parse::<Dur>().unwrap().0,
            Duration::from_millis(100)
        );
        assert_eq!("300s".parse::<Dur>().unwrap().0, Duration::from_secs(300));
        assert_eq!("30m".parse::<Dur>().unwrap().0, Duration::from_secs(1800));
        assert_eq!("2h".parse::<Dur>().unwrap().0, Duration::from_secs(7200));
        assert_eq!("1.5".parse::<Dur>().unwrap().0, Duration::from_millis(1500));
        assert!("5 parsecs".parse::<Dur>().is_err());
        assert_eq!("1d".parse::<Dur>().unwrap().to_string(), "1d");
        assert_eq!(Dur::secs(1800).to_string(), "30m");
        assert_eq!(Dur::millis(100).to_string(), "100ms");
    }

    #[test]
    fn absurd_durations_are_refused_by_the_parser_not_by_a_later_panic() {
        for bad in ["200000000000000d", "366d", "99999999999999999999"] {
            let e = bad.parse::<Dur>().unwrap_err();
            assert!(e.to_string().contains("at most 365d"), "{bad}: {e}");
        }
        assert_eq!("365d".parse::<Dur>().unwrap(), Dur::MAX);
        let later = std::time::Instant::now().checked_add(Dur::MAX.0);
        assert!(later.is_some(), "Dur::MAX must fit in an Instant");
    }

    #[test]
    fn percent_takes_a_sign_or_a_fraction_and_refuses_ambiguous_numbers() {
        assert!(("5%".parse::<Percent>().unwrap().fraction() - 0.05).abs() < 1e-12);
        assert!(("0.05".parse::<Percent>().unwrap().fraction() - 0.05).abs() < 1e-12);
        let e = "5".parse::<Percent>().unwrap_err();
        assert!(e.to_string().contains("5%"), "{e}");
        assert!("-1%".parse::<Percent>().is_err());
        assert_eq!(Percent::from_fraction(0.8).to_string(), "80%");
    }

    #[test]
    fn cores_must_be_positive() {
        assert_eq!("1.5".parse::<Cores>().unwrap().get(), 1.5);
        assert!("0".parse::<Cores>().is_err());
        assert!("-2".parse::<Cores>().is_err());
        assert!("two".parse::<Cores>().is_err());
    }

    /// Found by the `units` fuzz target: a duration with microseconds but
    /// no whole milliseconds printed as whole seconds (`3µs` as `0d`).
    #[test]
    fn durations_below_a_millisecond_print_as_what_parses_back() {
        for text in ["3µs", "1.000003s", "2.5ms", "1.5s"] {
            let d: Dur = text.parse().unwrap();
            let shown = d.to_string();
            let back: Dur = shown.parse().unwrap();
            let diff = back.0.abs_diff(d.0);
            assert!(
                diff <= Duration::from_nanos(1),
                "{text} printed as {shown}, which parses as {back:?}"
            );
        }
        assert_eq!(Dur(Duration::from_micros(3)).to_string(), "0.000003s");
    }
}
