//! The `log` storage plugin is plain C (`log.c`), built like any outside plugin with `make` or one `cc`
//! command. This package exists only so the workspace build compiles it: `build.rs` builds
//! `libkvhost_log.so` into `target/<profile>/plugins/`, where the host looks for plugins. There is no
//! Rust code.
