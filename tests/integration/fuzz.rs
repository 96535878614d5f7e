//! Fuzz targets on the stable toolchain (issue 13): the `lm://` request parser, the config loader
//! (YAML plus `LMCACHE_*` environment) and the key parser, driven by proptest strategies that mix raw
//! bytes with mutations of valid inputs.
//!
//! Each target runs for `KVHOST_FUZZ_SECS` seconds (default 2, so `cargo test` stays quick), in rounds
//! of fresh seeds. CI runs them longer:
//! `KVHOST_FUZZ_SECS=60 cargo test --release -p kvhost-tests --test integration fuzz:: -- --test-threads 3`.
//! A failure panics with the shrunk input and the round's seed; add the input below as a regression.

use kvhost::config::Config;
use kvhost::serve::protocol::{decode_request, encode_request, Command, REQUEST_HEADER_LEN};
use kvhost::ChunkKey;
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, RngAlgorithm, TestRng, TestRunner};
use std::time::{Duration, Instant};

fn budget() -> Duration {
    let secs = std::env::var("KVHOST_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(2.0);
    Duration::from_secs_f64(secs.max(0.1))
}

/// Run `check` over `strategy` in rounds of 256 cases with fresh seeds until the budget is spent.
fn fuzz<S: Strategy>(name: &str, strategy: S, check: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S::Value: std::fmt::Debug,
{
    let started = Instant::now();
    let mut cases = 0u64;
    let mut round = 0u64;
    while started.elapsed() < budget() {
        let seed: [u8; 32] =
            std::array::from_fn(|i| (round.wrapping_mul(0x9E37_79B9) >> (i % 8)) as u8 ^ i as u8);
        let config = RunnerConfig {
            cases: 256,
            failure_persistence: None,
            max_shrink_iters: 2048,
            ..RunnerConfig::default()
        };
        let mut runner =
            TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &seed));
        if let Err(e) = runner.run(&strategy, &check) {
            panic!("fuzz target `{name}`, round {round} (seed {seed:?}): {e}");
        }
        cases += 256;
        round += 1;
    }
    eprintln!(
        "fuzz {name}: {cases} cases in {:.1} s, no failure",
        started.elapsed().as_secs_f64()
    );
}

const VALID_KEY: &str = "meta-llama/Llama-3.1-8B@1@0@5a4b3c2d1e0f@bfloat16";

/// A key text: valid, a mutation of a valid one, or arbitrary.
fn key_text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(VALID_KEY.to_string()),
        (0..VALID_KEY.len(), any::<char>()).prop_map(|(i, c)| {
            let mut s: Vec<char> = VALID_KEY.chars().collect();
            s[i] = c;
            s.into_iter().collect()
        }),
        proptest::collection::vec(
            prop_oneof![
                Just("@".to_string()),
                "[a-z0-9/._-]{0,12}",
                "-?[0-9a-fx]{0,40}",
                ".{0,4}"
            ],
            0..10
        )
        .prop_map(|parts| parts.concat()),
        ".{0,200}",
    ]
}

#[test]
fn fuzz_key_parser() {
    fuzz("key parser", key_text(), |text| {
        if let Ok(k) = ChunkKey::parse(&text) {
            let again = ChunkKey::parse(k.as_str()).map_err(|e| {
                TestCaseError::fail(format!(
                    "{:?} parsed, its canonical form {:?} did not: {e}",
                    text,
                    k.as_str()
                ))
            })?;
            prop_assert_eq!(again.as_str(), k.as_str());
        }
        Ok(())
    });
}

/// A request header: random bytes, or a valid header with some bytes overwritten.
fn header() -> impl Strategy<Value = Vec<u8>> {
    let valid = (0..5i32, any::<u32>(), any::<[i32; 4]>(), key_text()).prop_map(
        |(cmd, len, shape, key)| {
            let command = Command::from_wire(cmd).unwrap_or(Command::Get);
            let key = if key.len() > 150 {
                VALID_KEY.to_string()
            } else {
                key
            };
            encode_request(command, len, 1, 3, shape, &key)
                .map(|b| b.to_vec())
                .unwrap_or_else(|| vec![0; REQUEST_HEADER_LEN])
        },
    );
    prop_oneof![
        proptest::collection::vec(any::<u8>(), REQUEST_HEADER_LEN),
        (
            valid,
            proptest::collection::vec((0..REQUEST_HEADER_LEN, any::<u8>()), 0..6)
        )
            .prop_map(|(mut b, edits)| {
                for (i, v) in edits {
                    b[i] = v;
                }
                b
            }),
    ]
}

#[test]
fn fuzz_lm_request_parser() {
    fuzz(
        "lm:// request parser",
        (header(), any::<u64>()),
        |(bytes, max)| {
            let buf: [u8; REQUEST_HEADER_LEN] = bytes.try_into().expect("header length");
            if let Ok(req) = decode_request(&buf, max) {
                prop_assert!(req.length <= max);
                prop_assert!(req.shape.iter().all(|&d| d >= 0));
                if let Some(k) = &req.key {
                    prop_assert!(ChunkKey::parse(k.as_str()).is_ok());
                }
            }
            Ok(())
        },
    );
}

/// Config text built from real keys and values, broken in realistic ways.
fn config_text() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        Just("chunk_size"),
        Just("max_local_cpu_size"),
        Just("local_cpu"),
        Just("storage_plugins"),
        Just("external_backends"),
        Just("extra_config"),
        Just("model"),
        Just("write_policy"),
        Just("tier_max_inflight_bytes"),
        Just("tier_put_deadline_secs"),
        Just("plugin_dir"),
        Just("blocking_timeout_secs"),
        Just("pin_timeout_sec"),
        Just("pin_check_interval_sec"),
        Just("tier_breaker_probe_secs"),
        Just("put_batch_bytes"),
        Just("promotion_wait_ms"),
        Just("storage_plugin.a.module_path"),
        Just("name"),
        Just("bogus"),
    ];
    let value = prop_oneof![
        Just("256".to_string()),
        Just("-1".to_string()),
        Just("1e400".to_string()),
        Just("[a, '']".to_string()),
        Just("{x: 1}".to_string()),
        Just("''".to_string()),
        Just("true".to_string()),
        Just("NaN".to_string()),
        Just("\"a,b\"".to_string()),
        Just("".to_string()),
        ".{0,12}",
    ];
    let line = (
        0..4usize,
        key,
        value,
        prop_oneof![Just(""), Just("- "), Just("---\n"), Just("\u{feff}")],
    )
        .prop_map(|(indent, k, v, prefix)| format!("{prefix}{}{k}: {v}\n", "  ".repeat(indent)));
    prop_oneof![
        proptest::collection::vec(line, 0..12).prop_map(|l| l.concat()),
        ".{0,300}",
    ]
}

fn env_pairs() -> impl Strategy<Value = Vec<(String, String)>> {
    let var = prop_oneof![
        Just("LMCACHE_CHUNK_SIZE"),
        Just("LMCACHE_MAX_LOCAL_CPU_SIZE"),
        Just("LMCACHE_STORAGE_PLUGINS"),
        Just("LMCACHE_EXTRA_CONFIG"),
        Just("LMCACHE_EXTERNAL_BACKENDS"),
        Just("LMCACHE_LOCAL_CPU"),
        Just("LMCACHE_MODEL"),
        Just("LMCACHE_"),
        Just("OTHER"),
    ];
    let value = prop_oneof![
        Just("'[a, b]'".to_string()),
        Just("{\"storage_plugin.a.class_name\": 1}".to_string()),
        Just("[1, 2".to_string()),
        Just("\"".to_string()),
        Just("12".to_string()),
        ".{0,20}",
    ];
    proptest::collection::vec((var.prop_map(String::from), value), 0..4)
}

#[test]
fn fuzz_config_loader() {
    fuzz(
        "config loader",
        (config_text(), env_pairs()),
        |(text, env)| {
            match Config::from_yaml_with_env(&text, None, env) {
                Ok(c) => {
                    prop_assert!(c.chunk_size > 0);
                    // What every command does next with a loaded config.
                    let _ = kvhost::chain::ChainSettings::from_config(&c);
                }
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
            Ok(())
        },
    );
}

// Regressions found by the targets above follow.

/// Regression (config loader target, round 17): `pin_timeout_sec: -1` loaded and then panicked in
/// `Duration::from_secs_f64` inside `ChainSettings::from_config`.
#[test]
fn fuzz_regression_negative_pin_timeout() {
    let err = Config::from_yaml_with_env("pin_timeout_sec: -1\n", None, Vec::new()).unwrap_err();
    assert!(err.to_string().contains("pin_timeout_sec"), "{err}");
}
