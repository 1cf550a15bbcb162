//! Shared helpers for the root integration tests live in `tests/tests/common`.
