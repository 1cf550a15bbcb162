//! The test runner of every file in `tests/tests/`: libtest's command line
//! and output (filters, `--exact`, `--test-threads`, `--list`, the
//! `test name ... ok` lines and the `N passed; M failed; K ignored` summary
//! that cargo, `scripts/test` and the VM harness read), with one difference
//! that matters here: a test that cannot run on this machine is counted as
//! ignored, with the reason, not as passed.
//!
//! Every test in these files needs root. Run as another user, each one is
//! reported `ignored (needs root)`; a test that finds something else missing
//! (a v1 freezer, a second CPU, `clone3` with `set_tid`) calls [`skip!`].
//!
//! [`skip!`]: crate::skip

use std::{
    any::Any,
    panic::{self, AssertUnwindSafe},
    process::ExitCode,
};

use libtest_mimic::{Arguments, Completion, Failed, Trial};

/// The panic payload of [`crate::skip!`]: why the test cannot run here.
pub struct Skip(pub String);

/// Runs `tests` (name and function) with libtest's arguments from the
/// command line. Each runs only as root; see the module doc.
pub fn run_root_tests(tests: &[(&'static str, fn())]) -> ExitCode {
    quiet_skips();
    let (args, filters) = arguments();
    let root = crate::is_root();
    let wanted = |name: &str| {
        filters.is_empty()
            || filters.iter().any(|f| {
                if args.exact {
                    name == f
                } else {
                    name.contains(f.as_str())
                }
            })
    };
    let trials = tests
        .iter()
        .filter(|(name, _)| wanted(name))
        .map(|&(name, f)| {
            Trial::ignorable_test(name, move || {
                if !root {
                    return Ok(Completion::ignored_with("needs root"));
                }
                run_one(f)
            })
        })
        .collect();
    libtest_mimic::run(&args, trials).exit_code()
}

/// libtest's arguments. libtest takes any number of name filters
/// (`-- a b`), libtest-mimic one: with more than one, they are taken out
/// here and applied by [`run_root_tests`] (the summary then does not count
/// the tests they left out).
fn arguments() -> (Arguments, Vec<String>) {
    /// Options of libtest-mimic that take a value as the next argument.
    const WITH_VALUE: [&str; 6] = [
        "--test-threads",
        "--logfile",
        "--skip",
        "--color",
        "--format",
        "-Z",
    ];
    let all: Vec<String> = std::env::args().collect();
    let mut rest = Vec::with_capacity(all.len());
    let mut filters = Vec::new();
    let mut iter = all.into_iter();
    rest.extend(iter.next());
    while let Some(arg) = iter.next() {
        if WITH_VALUE.contains(&arg.as_str()) {
            rest.push(arg);
            rest.extend(iter.next());
        } else if arg.starts_with('-') {
            rest.push(arg);
        } else {
            filters.push(arg);
        }
    }
    if filters.len() <= 1 {
        rest.append(&mut filters);
    }
    (Arguments::from_iter(rest), filters)
}

fn run_one(f: fn()) -> Result<Completion, Failed> {
    match panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(()) => Ok(Completion::Completed),
        Err(payload) => match payload.downcast::<Skip>() {
            Ok(skip) => {
                eprintln!("skipped: {}", skip.0);
                Ok(Completion::ignored_with(skip.0))
            }
            Err(payload) => Err(panic_message(&*payload).into()),
        },
    }
}

fn panic_message(payload: &dyn Any) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "the test panicked".to_owned()
    }
}

/// A skip unwinds like a panic but is not one: the default hook would print
/// `panicked at` for it.
fn quiet_skips() {
    let default = panic::take_hook();
    panic::set_hook(Box::new(move |info| {
        if info.payload().downcast_ref::<Skip>().is_none() {
            default(info);
        }
    }));
}

/// Declares a test file's tests, each a `fn()` that panics on failure, and
/// its `main`. The file needs `harness = false` in `tests/Cargo.toml`.
#[macro_export]
macro_rules! root_tests {
    ($($test:ident),+ $(,)?) => {
        // Under libtest (`harness = true`) this `main` would be dropped and
        // the binary would report zero tests run as a success; this test is
        // the one libtest would run instead (without libtest it is not
        // compiled).
        #[test]
        fn this_file_needs_harness_false_in_tests_cargo_toml() {
            panic!("declare this file in tests/Cargo.toml as [[test]] with harness = false");
        }

        fn main() -> ::std::process::ExitCode {
            $crate::harness::run_root_tests(&[$((stringify!($test), $test as fn())),+])
        }
    };
}

/// Ends the calling test as ignored, with `format!`-style reason, because
/// something it needs is missing on this machine.
#[macro_export]
macro_rules! skip {
    ($($reason:tt)+) => {
        ::std::panic::panic_any($crate::harness::Skip(format!($($reason)+)))
    };
}
