//! Integration tests of kvhost live in `integration/`; this library only exists so the package has a
//! build target. The fixtures are built by `build.rs` and `fixtures/rust`.
