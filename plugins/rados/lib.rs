//! The `rados` storage plugin is plain C (`rados.c`) on librados, built like any outside plugin with
//! `make` or one `cc` command. This package exists only so the workspace build compiles it: `build.rs`
//! builds `libkvhost_rados.so` into `target/<profile>/plugins/`, where the host looks for plugins, or
//! skips it with a warning when librados' development files are not installed. There is no Rust code.
