//! What the environment asks of telemetry.
//!
//! | variable | effect |
//! |---|---|
//! | `KOAN_LOG_FORMAT` | `json` for JSON log lines; anything else, human lines |
//! | `RUST_LOG` | log filter (default: the process's own, e.g. `info` or `warn`); the OpenTelemetry SDK's own messages only from `warn` up unless it names them |
//! | `OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` | export traces over OTLP; unset: no export |
//! | `OTEL_EXPORTER_OTLP_PROTOCOL`, `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` | `http/protobuf` (default) or `grpc` |
//! | `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES` | resource of the exported spans (default service name: the process's role) |
//! | `OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG` | sampling (default: parent-based, always on) |
//! | `OTEL_EXPORTER_OTLP_HEADERS`, `…_TIMEOUT`, `OTEL_BSP_*` | read by the exporter and the batch processor themselves |

/// Reads one environment variable; empty values count as unset.
fn non_empty(lookup: &impl Fn(&str) -> Option<String>, name: &str) -> Option<String> {
    lookup(name)
        .map(|value| value.trim().to_string())
        .filter(|value| !value.is_empty())
}

/// Generic OTLP endpoint (a base URL: `/v1/traces` is appended for HTTP).
pub const ENDPOINT_VAR: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
/// Trace-specific OTLP endpoint (used as is).
pub const TRACES_ENDPOINT_VAR: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
/// Generic OTLP protocol.
pub const PROTOCOL_VAR: &str = "OTEL_EXPORTER_OTLP_PROTOCOL";
/// Trace-specific OTLP protocol.
pub const TRACES_PROTOCOL_VAR: &str = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL";
/// Service name of the exported spans.
pub const SERVICE_NAME_VAR: &str = "OTEL_SERVICE_NAME";
/// Extra resource attributes (`key=value,key=value`).
pub const RESOURCE_ATTRIBUTES_VAR: &str = "OTEL_RESOURCE_ATTRIBUTES";
/// Log line format.
pub const LOG_FORMAT_VAR: &str = "KOAN_LOG_FORMAT";

/// How log lines are written (always to stderr).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One human-readable line per event, span fields before the message.
    Human,
    /// One JSON object per event, span fields under `span` and `spans`.
    Json,
}

/// How traces leave the process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    /// The endpoint as configured, without any password: for log lines only
    /// (the exporter reads the variables itself).
    pub endpoint: String,
    /// `http/protobuf` or `grpc`.
    pub protocol: Protocol,
    /// The service name to set, when the environment names none.
    pub default_service_name: Option<String>,
}

/// OTLP transports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// OTLP/HTTP with protobuf bodies (the default).
    HttpProtobuf,
    /// OTLP/gRPC.
    Grpc,
}

impl Protocol {
    /// The name the `OTEL_*_PROTOCOL` variables use.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HttpProtobuf => "http/protobuf",
            Self::Grpc => "grpc",
        }
    }
}

/// What a process's telemetry does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Log line format.
    pub log_format: LogFormat,
    /// Log filter directives (`RUST_LOG`, or the process's default).
    pub log_filter: String,
    /// Trace export, when an OTLP endpoint is configured.
    pub export: Option<Export>,
    /// Why a setting was not honoured as written (logged once the logger is up).
    pub notes: Vec<String>,
}

/// Log directives added to a default filter: the exporter's own messages
/// only from warnings up.
const QUIET_DEPENDENCIES: &str =
    "opentelemetry=warn,opentelemetry_sdk=warn,opentelemetry_otlp=warn";

impl Settings {
    /// Settings from the process environment. `default_filter` applies
    /// without `RUST_LOG`; `service` names the process's role (`koan-coordinator`,
    /// `koan-worker`, `koan-backup`) when `OTEL_SERVICE_NAME` does not.
    pub fn from_env(default_filter: &str, service: &str) -> Self {
        Self::from_lookup(|name| std::env::var(name).ok(), default_filter, service)
    }

    /// Settings from variables answered by `lookup` (tests pass their own).
    pub fn from_lookup(
        lookup: impl Fn(&str) -> Option<String>,
        default_filter: &str,
        service: &str,
    ) -> Self {
        let mut notes = Vec::new();
        let log_format = match non_empty(&lookup, LOG_FORMAT_VAR) {
            Some(format) if format.eq_ignore_ascii_case("json") => LogFormat::Json,
            _ => LogFormat::Human,
        };
        // The exporter's own messages stay quiet unless RUST_LOG names them.
        let log_filter = match non_empty(&lookup, "RUST_LOG") {
            Some(filter) if filter.contains("opentelemetry") => filter,
            Some(filter) => format!("{filter},{QUIET_DEPENDENCIES}"),
            None => format!("{default_filter},{QUIET_DEPENDENCIES}"),
        };
        let endpoint =
            non_empty(&lookup, TRACES_ENDPOINT_VAR).or_else(|| non_empty(&lookup, ENDPOINT_VAR));
        let export = endpoint.map(|endpoint| {
            let protocol_name = non_empty(&lookup, TRACES_PROTOCOL_VAR)
                .or_else(|| non_empty(&lookup, PROTOCOL_VAR));
            let protocol = match protocol_name.as_deref() {
                None | Some("http/protobuf") => Protocol::HttpProtobuf,
                Some("grpc") if cfg!(feature = "grpc") => Protocol::Grpc,
                Some(other) => {
                    notes.push(format!(
                        "OTLP protocol '{}' is not supported here; exporting with http/protobuf",
                        other.escape_default()
                    ));
                    Protocol::HttpProtobuf
                }
            };
            let named = non_empty(&lookup, SERVICE_NAME_VAR).is_some()
                || non_empty(&lookup, RESOURCE_ATTRIBUTES_VAR).is_some_and(|attributes| {
                    attributes
                        .split(',')
                        .any(|pair| pair.trim_start().starts_with("service.name="))
                });
            Export {
                endpoint: redact_endpoint(&endpoint),
                protocol,
                default_service_name: (!named).then(|| service.to_string()),
            }
        });
        Self {
            log_format,
            log_filter,
            export,
            notes,
        }
    }
}

/// `endpoint` with any password in it replaced by `***`, and its query dropped.
pub fn redact_endpoint(endpoint: &str) -> String {
    match url::Url::parse(endpoint) {
        Ok(mut url) => {
            if url.password().is_some() {
                let _ = url.set_password(Some("***"));
            }
            url.set_query(None);
            url.to_string()
        }
        Err(_) => "(unparsable endpoint)".to_string(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn settings(vars: &[(&str, &str)]) -> Settings {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect();
        Settings::from_lookup(
            move |name| {
                vars.iter()
                    .find(|(var, _)| var == name)
                    .map(|(_, value)| value.clone())
            },
            "info",
            "koan-worker",
        )
    }

    #[test]
    fn exports_nothing_without_an_endpoint() {
        let quiet = settings(&[("OTEL_SERVICE_NAME", "x"), ("KOAN_LOG_FORMAT", "json")]);
        assert_eq!(quiet.export, None);
        assert_eq!(quiet.log_format, LogFormat::Json);
        assert!(
            quiet.log_filter.starts_with("info,"),
            "{}",
            quiet.log_filter
        );
        assert_eq!(settings(&[(ENDPOINT_VAR, " ")]).export, None);
    }

    #[test]
    fn exports_over_http_protobuf_by_default() {
        let export = settings(&[(ENDPOINT_VAR, "http://127.0.0.1:6006")])
            .export
            .unwrap();
        assert_eq!(export.protocol, Protocol::HttpProtobuf);
        assert_eq!(export.default_service_name.as_deref(), Some("koan-worker"));
        let traces = settings(&[(TRACES_ENDPOINT_VAR, "http://collector:4318/v1/traces")]);
        assert_eq!(
            traces.export.unwrap().endpoint,
            "http://collector:4318/v1/traces"
        );
    }

    #[test]
    fn honours_the_protocol_and_service_variables() {
        let grpc = settings(&[
            (ENDPOINT_VAR, "http://127.0.0.1:4317"),
            (PROTOCOL_VAR, "grpc"),
            (
                RESOURCE_ATTRIBUTES_VAR,
                "team=data, service.name=backup-prod",
            ),
        ]);
        let export = grpc.export.unwrap();
        assert_eq!(export.protocol, Protocol::Grpc);
        assert_eq!(export.default_service_name, None);
        let json = settings(&[(ENDPOINT_VAR, "http://x:4318"), (PROTOCOL_VAR, "http/json")]);
        assert_eq!(json.export.unwrap().protocol, Protocol::HttpProtobuf);
        assert_eq!(json.notes.len(), 1, "{:?}", json.notes);
        let named = settings(&[(ENDPOINT_VAR, "http://x:4318"), (SERVICE_NAME_VAR, "mine")]);
        assert_eq!(named.export.unwrap().default_service_name, None);
    }

    #[test]
    fn keeps_rust_log_and_quiets_the_exporter_unless_it_is_named() {
        assert_eq!(
            settings(&[("RUST_LOG", "debug")]).log_filter,
            format!("debug,{QUIET_DEPENDENCIES}")
        );
        assert_eq!(
            settings(&[("RUST_LOG", "info,opentelemetry_sdk=debug")]).log_filter,
            "info,opentelemetry_sdk=debug"
        );
    }

    #[test]
    fn never_shows_an_endpoint_password() {
        let export = settings(&[(
            ENDPOINT_VAR,
            "https://user:s3cret@collector.example:4318/?token=t0ken",
        )])
        .export
        .unwrap();
        assert!(!export.endpoint.contains("s3cret"), "{}", export.endpoint);
        assert!(!export.endpoint.contains("t0ken"), "{}", export.endpoint);
        assert!(export.endpoint.contains("user:***@collector.example"));
    }
}
