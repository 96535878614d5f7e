//! The `logstore` storage plugin is C++17 (`logstore.cpp`, on the header-only wrapper
//! `include/kvhost_plugin.hpp`), built like any outside plugin with `make` or one `c++` command. This
//! package exists only so the workspace build compiles it: `build.rs` builds `libkvhost_logstore.so` into
//! `target/<profile>/plugins/`, where the host looks for plugins (`module_path: kvhost_logstore`,
//! `class_name: logstore`). There is no Rust code.
