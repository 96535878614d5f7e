//! The `serve:` section: limits of `kvhost serve` (command-line flags override each key).
//!
//! ```yaml
//! serve:
//!   max_connections: 16384        # connections beyond this are refused at accept
//!   idle_timeout_secs: 600        # idle connections are closed after this (0: never)
//!   request_deadline_secs: 60     # a whole request (header, body, reply) from its first byte
//!   stall_timeout_secs: 10        # one wait for the client inside a request
//!   max_chunk_bytes: 1073741824   # largest PUT body
//!   put_body_budget_bytes: 2147483648  # PUT bodies in progress, all connections together
//!   shutdown_grace_secs: 2        # after SIGTERM, for requests in progress
//!   drain_timeout_secs: 5         # after SIGTERM, for write-through puts to reach the plugins
//! ```

use serde::Deserialize;

/// The `serve:` keys as written (unset keys take `kvhost serve`'s defaults).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct ServeKeys {
    /// Connections beyond this many are refused at accept.
    pub max_connections: Option<usize>,
    /// Seconds a connection may idle between requests (0: never closed for idling).
    pub idle_timeout_secs: Option<f64>,
    /// Seconds a whole request may take from its first byte.
    pub request_deadline_secs: Option<f64>,
    /// Seconds of one wait for the client inside a request.
    pub stall_timeout_secs: Option<f64>,
    /// Largest PUT body, bytes.
    pub max_chunk_bytes: Option<u64>,
    /// Bytes of PUT bodies in progress across all connections.
    pub put_body_budget_bytes: Option<u64>,
    /// Seconds requests in progress get to finish after a stop.
    pub shutdown_grace_secs: Option<f64>,
    /// Seconds write-through puts get to reach the plugins after a stop.
    pub drain_timeout_secs: Option<f64>,
}

impl ServeKeys {
    /// Checks every value that is set; the error names the key and the value.
    pub fn check(&self) -> Result<(), String> {
        let secs = [
            ("idle_timeout_secs", self.idle_timeout_secs, true),
            ("request_deadline_secs", self.request_deadline_secs, false),
            ("stall_timeout_secs", self.stall_timeout_secs, false),
            ("shutdown_grace_secs", self.shutdown_grace_secs, true),
            ("drain_timeout_secs", self.drain_timeout_secs, true),
        ];
        for (key, value, zero_ok) in secs {
            if let Some(v) = value {
                // Upper bound: Duration::from_secs_f64 panics past ~5.8e11 years; a day is plenty.
                let ok = v.is_finite() && v <= 86_400.0 && (v > 0.0 || (zero_ok && v == 0.0));
                if !ok {
                    let range = if zero_ok { "0" } else { "more than 0" };
                    return Err(format!(
                        "serve.{key} {v}: expected {range} up to 86400 seconds"
                    ));
                }
            }
        }
        for (key, value) in [
            ("max_connections", self.max_connections.map(|v| v as u64)),
            ("max_chunk_bytes", self.max_chunk_bytes),
            ("put_body_budget_bytes", self.put_body_budget_bytes),
        ] {
            if value == Some(0) {
                return Err(format!("serve.{key} must be positive"));
            }
        }
        if let (Some(chunk), Some(budget)) = (self.max_chunk_bytes, self.put_body_budget_bytes) {
            if chunk > budget {
                return Err(format!(
                    "serve.max_chunk_bytes {chunk} is larger than serve.put_body_budget_bytes {budget}: \
                     the largest PUT could never be accepted"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::Config;

    #[test]
    fn serve_keys_load_and_default_to_unset() {
        let c = Config::from_yaml(
            "serve:\n  max_connections: 20000\n  idle_timeout_secs: 0\n",
            None,
        )
        .unwrap();
        assert_eq!(c.serve.max_connections, Some(20000));
        assert_eq!(c.serve.idle_timeout_secs, Some(0.0));
        assert_eq!(c.serve.request_deadline_secs, None);
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        assert_eq!(
            Config::from_yaml("", None).unwrap().serve,
            Default::default()
        );
    }

    #[test]
    fn bad_serve_values_name_the_key() {
        for (yaml, needle) in [
            (
                "serve:\n  request_deadline_secs: 0\n",
                "serve.request_deadline_secs 0",
            ),
            (
                "serve:\n  stall_timeout_secs: -1\n",
                "serve.stall_timeout_secs -1",
            ),
            (
                "serve:\n  idle_timeout_secs: .inf\n",
                "serve.idle_timeout_secs inf",
            ),
            (
                "serve:\n  max_connections: 0\n",
                "serve.max_connections must be positive",
            ),
            (
                "serve:\n  max_chunk_bytes: 100\n  put_body_budget_bytes: 10\n",
                "serve.max_chunk_bytes 100 is larger",
            ),
        ] {
            let e = Config::from_yaml(yaml, None).unwrap_err().to_string();
            assert!(e.contains(needle), "`{e}` lacks `{needle}`");
        }
    }

    #[test]
    fn unknown_serve_keys_warn() {
        let c = Config::from_yaml("serve:\n  max_conections: 5\n", None).unwrap();
        assert!(
            c.warnings
                .iter()
                .any(|w| w.contains("`serve.") && w.contains("max_conections`")),
            "{:?}",
            c.warnings
        );
    }
}
