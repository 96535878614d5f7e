//! The results of one conformance run: text for people, JSON for CI.

use serde::Serialize;
use std::time::Duration;

/// The outcome of one check.
#[derive(Clone, Debug, Serialize)]
pub struct CheckResult {
    /// Check name.
    pub name: &'static str,
    /// Passed, failed, or skipped (not applicable to this plugin's capabilities).
    pub outcome: Outcome,
    /// What was seen.
    pub detail: String,
    /// How long the check took, milliseconds.
    pub millis: u64,
}

/// Pass, fail or skip.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// The plugin kept its promise.
    Pass,
    /// It did not.
    Fail,
    /// The check does not apply (capability not advertised).
    Skip,
}

/// All checks of one run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    /// In order.
    pub checks: Vec<CheckResult>,
}

impl Report {
    pub(super) fn push(
        &mut self,
        name: &'static str,
        outcome: Outcome,
        detail: String,
        took: Duration,
    ) {
        self.checks.push(CheckResult {
            name,
            outcome,
            detail,
            millis: took.as_millis() as u64,
        });
    }

    /// No check failed.
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.outcome != Outcome::Fail)
    }

    /// The failed checks, one line each.
    pub fn failures(&self) -> Vec<String> {
        self.checks
            .iter()
            .filter(|c| c.outcome == Outcome::Fail)
            .map(|c| format!("{}: {}", c.name, c.detail))
            .collect()
    }

    /// (passed, failed, skipped).
    pub fn counts(&self) -> (usize, usize, usize) {
        self.checks
            .iter()
            .fold((0, 0, 0), |(p, f, s), c| match c.outcome {
                Outcome::Pass => (p + 1, f, s),
                Outcome::Fail => (p, f + 1, s),
                Outcome::Skip => (p, f, s + 1),
            })
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for c in &self.checks {
            let tag = match c.outcome {
                Outcome::Pass => "PASS",
                Outcome::Fail => "FAIL",
                Outcome::Skip => "SKIP",
            };
            writeln!(f, "{tag}  {:<22} {}", c.name, c.detail)?;
        }
        let (p, fl, s) = self.counts();
        write!(f, "{p} passed, {fl} failed, {s} skipped")
    }
}
