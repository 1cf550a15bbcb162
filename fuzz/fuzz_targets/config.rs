//! The config parser: any text either parses into a config every key of which
//! is within its bound, or is refused with an error that names the file;
//! it never panics, also while locating the refused key in the text.
#![no_main]

use std::path::Path;

use enforcer::{config::Config, units::Cores, validate::Node};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // A fixed node: detecting the real one reads sysfs on every input.
    let node = Node {
        cpus: Cores::new(8.0).expect("8 CPUs is a valid count"),
    };
    let path = Path::new("fuzz.toml");
    match Config::parse_on(text, path, node) {
        Ok(config) => {
            let _ = format!("{config:?}");
        }
        Err(e) => {
            let message = e.to_string();
            assert!(
                message.contains("fuzz.toml"),
                "error does not name the file: {message}"
            );
        }
    }
});
