//! The `mem` storage plugin is plain C (`mem.c`), built like any outside plugin with `make` or one `cc`
//! command. This package exists only so the workspace build compiles it: `build.rs` builds
//! `libkvhost_mem.so` into `target/<profile>/plugins/`, where the host looks for plugins. There is no
//! Rust code.
