//! The unit parsers (`ByteSize`, `Dur`, `Percent`, `Cores`): the first byte
//! picks the parser, the rest is the text. None may panic, and what one
//! accepts must print as text that parses back to the same value (the
//! config writer and `--json` output depend on that).
#![no_main]

use std::str::FromStr;

use enforcer::units::{ByteSize, Cores, Dur, Percent};
use libfuzzer_sys::fuzz_target;

fn reparse<T: FromStr + std::fmt::Display>(value: &T) -> T
where
    T::Err: std::fmt::Display,
{
    let shown = value.to_string();
    shown.parse().unwrap_or_else(|e| {
        panic!("{shown:?} (printed by the parser's own Display) is refused: {e}")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    match which % 4 {
        0 => {
            if let Ok(size) = text.parse::<ByteSize>() {
                assert_eq!(reparse(&size), size, "ByteSize round trip of {text:?}");
            }
        }
        1 => {
            if let Ok(dur) = text.parse::<Dur>() {
                assert!(dur <= Dur::MAX, "{text:?} parsed beyond Dur::MAX");
                let back = reparse(&dur);
                // Sub-millisecond durations print as fractional seconds (f64).
                let diff = back.0.abs_diff(dur.0);
                assert!(
                    diff <= std::time::Duration::from_micros(1),
                    "Dur round trip of {text:?}: {dur} became {back}"
                );
            }
        }
        2 => {
            if let Ok(pct) = text.parse::<Percent>() {
                let f = pct.fraction();
                assert!(f.is_finite() && f >= 0.0, "{text:?} gave fraction {f}");
                let back = reparse(&pct).fraction();
                assert!(
                    (back - f).abs() <= 1e-9 * f.max(1.0),
                    "Percent round trip of {text:?}: {f} became {back}"
                );
            }
        }
        _ => {
            if let Ok(cores) = text.parse::<Cores>() {
                assert!(cores.get().is_finite() && cores.get() >= Cores::MIN.get());
                assert_eq!(reparse(&cores), cores, "Cores round trip of {text:?}");
            }
        }
    }
});
