//! Row b: what one plugin call costs over the C ABI. The dlopen'd `noop` plugin (Rust SDK, `.so`) is
//! called the way the chain calls every tier, `contains_wait` of one key: key marshalling into C
//! arrays, the vtable call, the SDK's trampoline and batch view, and the conversion of the answer. The
//! baseline is the same operation as a direct Rust call: a trait object that answers "absent" for each
//! key, returning the same `Vec<Presence>`.

use super::{keys, median, MicroOptions, Row};
use crate::config::{Config, PluginSpec};
use crate::key::ChunkKey;
use crate::loader;
use crate::plugin::{PluginBackend, PluginError, Presence};
use std::hint::black_box;
use std::time::{Duration, Instant};

/// The most one ABI call of a one-key `contains` may cost over the direct Rust call, in ns.
pub(super) const MAX_OVERHEAD_NS: f64 = 250.0;

/// The operation, as a Rust backend would expose it.
trait Contains {
    fn contains(&self, keys: &[ChunkKey], pin: bool) -> Result<Vec<Presence>, PluginError>;
}

/// The no-op backend's `contains`, in Rust.
struct DirectNoop;

impl Contains for DirectNoop {
    fn contains(&self, keys: &[ChunkKey], _pin: bool) -> Result<Vec<Presence>, PluginError> {
        Ok(keys.iter().map(|_| Presence::Absent).collect())
    }
}

/// Through the loaded plugin, as the chain calls a tier.
struct Dlopened(PluginBackend);

impl Contains for Dlopened {
    fn contains(&self, keys: &[ChunkKey], pin: bool) -> Result<Vec<Presence>, PluginError> {
        self.0.contains_wait(keys, pin, Duration::from_secs(10))
    }
}

pub(super) fn row_b(opts: &MicroOptions) -> Result<Row, String> {
    let config = Config::from_yaml("chunk_size: 256\n", None).map_err(|e| e.to_string())?;
    let spec = PluginSpec {
        name: "noop".into(),
        module_path: opts.noop_module.clone(),
        class_name: "noop".into(),
        priority: None,
        position: 0,
        options: Vec::new(),
    };
    let loaded = loader::load(&spec, &config).map_err(|e| {
        format!("{e} (build the workspace: the noop plugin is loaded from its .so)")
    })?;
    let abi: &dyn Contains = &Dlopened(loaded);
    let direct: &dyn Contains = &DirectNoop;
    let key = keys("bench-b", 1);
    let time = |c: &dyn Contains| {
        let t = Instant::now();
        for _ in 0..opts.calls {
            let r = black_box(c).contains(black_box(&key), false);
            assert!(
                matches!(r.as_deref(), Ok([Presence::Absent])),
                "no-op answered {r:?}"
            );
        }
        t.elapsed().as_nanos() as f64 / opts.calls as f64
    };
    let (mut a, mut b) = (vec![], vec![]);
    for _ in 0..opts.reps.max(3) {
        a.push(time(abi));
        b.push(time(direct));
    }
    let (a, b) = (median(a), median(b));
    Ok(Row {
        name: "b. contains of 1 key through the dlopen'd no-op plugin (vs a direct Rust call)"
            .into(),
        value: a,
        unit: "ns/op".into(),
        baseline: Some(b),
        ratio: Some(a / b),
        target: format!("<= +{MAX_OVERHEAD_NS:.0} ns over direct"),
        met: Some(a - b <= MAX_OVERHEAD_NS),
    })
}
