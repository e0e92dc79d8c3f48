//! Log output: human-readable by default, JSON with `KOAN_LOG_FORMAT=json`,
//! level from `RUST_LOG` (default `info`; `warn` in embedded mode), always on stderr.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber, at `default_filter` unless `RUST_LOG` is set.
pub fn init(default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let json =
        std::env::var("KOAN_LOG_FORMAT").is_ok_and(|format| format.eq_ignore_ascii_case("json"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}
