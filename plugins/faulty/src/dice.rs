//! Seeded dice: every fault decision comes from one xorshift generator, so a run with the same seed
//! and the same request order injects the same faults.

use crate::options::Latency;
use parking_lot::Mutex;
use rand_core::{Rng, SeedableRng};
use rand_xorshift::XorShiftRng;
use std::time::Duration;

/// The backend's random source.
pub struct Dice(Mutex<XorShiftRng>);

impl Dice {
    /// Dice seeded with `seed`.
    pub fn new(seed: u64) -> Dice {
        Dice(Mutex::new(XorShiftRng::seed_from_u64(seed)))
    }

    /// A uniform number in `[0, 1)`.
    pub fn unit(&self) -> f64 {
        (self.0.lock().next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// True with probability `p` (never rolls for 0, so a plan without a fault draws nothing).
    pub fn roll(&self, p: f64) -> bool {
        p > 0.0 && self.unit() < p
    }

    /// A random 64-bit word.
    pub fn word(&self) -> u64 {
        self.0.lock().next_u64()
    }

    /// One latency drawn from `dist`.
    pub fn latency(&self, dist: Latency) -> Duration {
        match dist {
            Latency::None => Duration::ZERO,
            Latency::Fixed(mean) => mean,
            Latency::Uniform(mean) => mean.mul_f64(2.0 * self.unit()),
            // Inverse CDF; 1 - u is in (0, 1], so the logarithm is finite.
            Latency::Exponential(mean) => mean.mul_f64(-(1.0 - self.unit()).ln()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_rolls() {
        let (a, b) = (Dice::new(7), Dice::new(7));
        let ra: Vec<bool> = (0..64).map(|_| a.roll(0.3)).collect();
        let rb: Vec<bool> = (0..64).map(|_| b.roll(0.3)).collect();
        assert_eq!(ra, rb);
        assert!(ra.iter().any(|&r| r) && ra.iter().any(|&r| !r));
        let c = Dice::new(8);
        let rc: Vec<bool> = (0..64).map(|_| c.roll(0.3)).collect();
        assert_ne!(ra, rc);
    }

    #[test]
    fn exponential_latency_has_its_mean() {
        let d = Dice::new(1);
        let mean = Duration::from_micros(1000);
        let n = 20_000;
        let total: Duration = (0..n).map(|_| d.latency(Latency::Exponential(mean))).sum();
        let avg = total.as_micros() as f64 / n as f64;
        assert!((900.0..1100.0).contains(&avg), "{avg}");
    }
}
