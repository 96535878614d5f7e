//! The fault plan: which faults, how often, and when, read from the plugin options.

use kvhost_plugin_sdk::{CreateContext, Error, OptionSpec};
use std::time::Duration;

/// Accepted options (see the README for the whole story).
pub const OPTIONS: &[OptionSpec] = &[
    OptionSpec::optional(c"seed", c"1", c"Seed of the fault dice: the same seed and the same request order give the same faults"),
    OptionSpec::optional(c"capacity_bytes", c"1073741824", c"Bytes the in-memory store holds; puts past it get NO_SPACE"),
    OptionSpec::optional(c"error_rate", c"0", c"Probability that an item of a put or get fails with IO"),
    OptionSpec::optional(c"latency", c"none", c"Latency of each put and get: none, fixed, uniform or exponential"),
    OptionSpec::optional(c"latency_us", c"0", c"Mean latency (fixed: exact; uniform: 0..2x; exponential: mean), microseconds"),
    OptionSpec::optional(c"hang_rate", c"0", c"Probability that a put or get hangs until the fault window ends (or the backend is destroyed)"),
    OptionSpec::optional(c"corrupt_rate", c"0", c"Probability that a get returns wrong bytes of the right length"),
    OptionSpec::optional(c"checksums", c"true", c"Keep a checksum of each chunk and report CORRUPT instead of returning wrong bytes"),
    OptionSpec::optional(c"unreported_rate", c"0", c"Probability that an item of a put or get is left without a status"),
    OptionSpec::optional(c"panic_rate", c"0", c"Probability that the worker thread panics while serving a request (poisons the backend)"),
    OptionSpec::optional(c"faults_after_ms", c"0", c"Faults start this long after create"),
    OptionSpec::optional(c"faults_for_ms", c"0", c"Faults last this long (0: for ever); hung requests then complete"),
];

/// How long each operation takes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Latency {
    /// Answer at once, on the calling thread.
    None,
    /// Exactly the mean.
    Fixed(Duration),
    /// Uniform on `0..2 * mean`.
    Uniform(Duration),
    /// Exponential with this mean (long tail).
    Exponential(Duration),
}

/// Every fault setting of one backend.
#[derive(Clone, Debug)]
pub struct FaultPlan {
    /// Dice seed.
    pub seed: u64,
    /// Store size limit.
    pub capacity_bytes: u64,
    /// Per-item IO error probability.
    pub error_rate: f64,
    /// Latency distribution.
    pub latency: Latency,
    /// Per-request hang probability.
    pub hang_rate: f64,
    /// Per-item corruption probability on get.
    pub corrupt_rate: f64,
    /// Verify stored checksums on get.
    pub checksums: bool,
    /// Per-item probability of no status.
    pub unreported_rate: f64,
    /// Per-request worker panic probability.
    pub panic_rate: f64,
    /// Fault window start, after create.
    pub faults_after: Duration,
    /// Fault window length; `None` for ever.
    pub faults_for: Option<Duration>,
}

fn rate(ctx: &CreateContext, key: &str) -> Result<f64, Error> {
    let r: f64 = ctx.parse(key)?;
    if !(0.0..=1.0).contains(&r) {
        return Err(Error::config(format!(
            "option `{key}` = {r}: a probability must be within 0 and 1"
        )));
    }
    Ok(r)
}

impl FaultPlan {
    /// Read and check the options.
    pub fn from_options(ctx: &CreateContext) -> Result<FaultPlan, Error> {
        let mean = Duration::from_micros(ctx.parse("latency_us")?);
        let latency = match ctx.option("latency").unwrap_or("none").trim() {
            "none" => Latency::None,
            "fixed" => Latency::Fixed(mean),
            "uniform" => Latency::Uniform(mean),
            "exponential" => Latency::Exponential(mean),
            other => {
                return Err(Error::config(format!(
                    "option `latency` = `{other}`: expected none, fixed, uniform or exponential"
                )))
            }
        };
        let faults_for_ms: u64 = ctx.parse("faults_for_ms")?;
        Ok(FaultPlan {
            seed: ctx.parse("seed")?,
            capacity_bytes: ctx.parse("capacity_bytes")?,
            error_rate: rate(ctx, "error_rate")?,
            latency,
            hang_rate: rate(ctx, "hang_rate")?,
            corrupt_rate: rate(ctx, "corrupt_rate")?,
            checksums: ctx.parse("checksums")?,
            unreported_rate: rate(ctx, "unreported_rate")?,
            panic_rate: rate(ctx, "panic_rate")?,
            faults_after: Duration::from_millis(ctx.parse("faults_after_ms")?),
            faults_for: (faults_for_ms > 0).then(|| Duration::from_millis(faults_for_ms)),
        })
    }

    /// Whether requests go through the worker thread (anything that needs time or a worker).
    pub fn needs_worker(&self) -> bool {
        self.latency != Latency::None || self.hang_rate > 0.0 || self.panic_rate > 0.0
    }

    /// Whether any fault that makes the backend unhealthy is configured.
    pub fn is_sick(&self) -> bool {
        self.error_rate > 0.0 || self.hang_rate > 0.0 || self.panic_rate > 0.0
    }

    /// Whether faults are active `since_create` after create.
    pub fn active(&self, since_create: Duration) -> bool {
        since_create >= self.faults_after
            && self
                .faults_for
                .is_none_or(|len| since_create < self.faults_after + len)
    }

    /// When the fault window ends, after create, if it does.
    pub fn window_end(&self) -> Option<Duration> {
        self.faults_for.map(|len| self.faults_after + len)
    }
}
