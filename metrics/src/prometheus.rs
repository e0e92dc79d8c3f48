//! The Prometheus text exposition format (version 0.0.4), from the SDK's
//! collected metrics.
//!
//! The maintained path from OpenTelemetry to Prometheus is OTLP: the
//! `opentelemetry-prometheus` crate was discontinued at 0.29 (it depends on
//! the unmaintained `protobuf` crate). So the services read their own meter
//! provider with a pull reader and render the text here, following the
//! OpenTelemetry-to-Prometheus compatibility rules that matter to us:
//!
//! - names: `.` and any other character Prometheus does not allow become `_`;
//!   the unit is appended as a suffix (`s` → `_seconds`, `By` → `_bytes`,
//!   `ms` → `_milliseconds`) unless the name already ends with it; units in
//!   braces (`{row}`) add nothing;
//! - monotonic sums are counters, named with `_total`; non-monotonic sums
//!   (up-down counters) and gauges are gauges;
//! - histograms become `_bucket{le="…"}` (cumulative, ending with `+Inf`),
//!   `_sum` and `_count`;
//! - label values are escaped (`\`, `"`, newline), label names sanitized;
//!   every family has its `# HELP` and `# TYPE` lines.
//!
//! Exponential histograms are not rendered (no instrument here uses them).
//! [`render`] works on plain [`Family`] values so it is testable without an SDK.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use opentelemetry::KeyValue;
use opentelemetry_sdk::metrics::data::{
    AggregatedMetrics, Gauge, Histogram, Metric, MetricData, ResourceMetrics, Sum,
};

/// The `Content-Type` of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What a family's series are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FamilyKind {
    /// Only goes up (named `…_total`).
    Counter,
    /// Goes up and down.
    Gauge,
    /// Observations in buckets, with their sum and count.
    Histogram,
}

impl FamilyKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Counter => "counter",
            Self::Gauge => "gauge",
            Self::Histogram => "histogram",
        }
    }
}

/// A sample value, kept in its own type so integers print exactly.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    /// An unsigned integer.
    U64(u64),
    /// A signed integer.
    I64(i64),
    /// A float (`+Inf`, `-Inf` and `NaN` included).
    F64(f64),
}

/// Label names and values of one series.
pub type Labels = Vec<(String, String)>;

/// One series of a family.
#[derive(Debug, Clone, PartialEq)]
pub enum Series {
    /// A counter or gauge sample.
    Value {
        /// Its labels.
        labels: Labels,
        /// Its value.
        value: Value,
    },
    /// A histogram.
    Histogram {
        /// Its labels (without `le`).
        labels: Labels,
        /// Upper bounds of the buckets, ascending (the `+Inf` bucket is implied).
        bounds: Vec<f64>,
        /// Observations per bucket, not cumulative: one more than `bounds`.
        bucket_counts: Vec<u64>,
        /// Sum of the observations.
        sum: Value,
        /// Number of observations.
        count: u64,
    },
}

/// One metric: its name, help, kind and series.
#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    /// Prometheus name (for counters, with `_total`).
    pub name: String,
    /// Help text.
    pub help: String,
    /// Counter, gauge or histogram.
    pub kind: FamilyKind,
    /// Its series.
    pub series: Vec<Series>,
}

/// The text exposition of `families`, in the order given.
pub fn render(families: &[Family]) -> String {
    let mut out = String::new();
    for family in families {
        let _ = writeln!(out, "# HELP {} {}", family.name, escape_help(&family.help));
        let _ = writeln!(out, "# TYPE {} {}", family.name, family.kind.as_str());
        for series in &family.series {
            match series {
                Series::Value { labels, value } => {
                    sample(&mut out, &family.name, labels, None, &format_value(*value));
                }
                Series::Histogram {
                    labels,
                    bounds,
                    bucket_counts,
                    sum,
                    count,
                } => {
                    let bucket = format!("{}_bucket", family.name);
                    let mut cumulative = 0u64;
                    for (index, bound) in bounds.iter().enumerate() {
                        cumulative = cumulative
                            .saturating_add(bucket_counts.get(index).copied().unwrap_or(0));
                        let le = format_value(Value::F64(*bound));
                        sample(
                            &mut out,
                            &bucket,
                            labels,
                            Some(&le),
                            &cumulative.to_string(),
                        );
                    }
                    sample(&mut out, &bucket, labels, Some("+Inf"), &count.to_string());
                    sample(
                        &mut out,
                        &format!("{}_sum", family.name),
                        labels,
                        None,
                        &format_value(*sum),
                    );
                    sample(
                        &mut out,
                        &format!("{}_count", family.name),
                        labels,
                        None,
                        &count.to_string(),
                    );
                }
            }
        }
    }
    out
}

fn sample(out: &mut String, name: &str, labels: &Labels, le: Option<&str>, value: &str) {
    out.push_str(name);
    if !labels.is_empty() || le.is_some() {
        out.push('{');
        let mut first = true;
        let le = le.map(|le| ("le", le));
        for (key, label) in labels
            .iter()
            .map(|(key, label)| (key.as_str(), label.as_str()))
            .chain(le)
        {
            if !first {
                out.push(',');
            }
            first = false;
            let _ = write!(out, "{key}=\"{}\"", escape_label_value(label));
        }
        out.push('}');
    }
    out.push(' ');
    out.push_str(value);
    out.push('\n');
}

/// A value as the text format writes it (`+Inf`, `-Inf`, `NaN` for the specials).
pub fn format_value(value: Value) -> String {
    match value {
        Value::U64(value) => value.to_string(),
        Value::I64(value) => value.to_string(),
        Value::F64(value) if value.is_nan() => "NaN".to_string(),
        Value::F64(value) if value == f64::INFINITY => "+Inf".to_string(),
        Value::F64(value) if value == f64::NEG_INFINITY => "-Inf".to_string(),
        Value::F64(value) => value.to_string(),
    }
}

/// A label value with `\`, `"` and newlines escaped.
pub fn escape_label_value(value: &str) -> String {
    let mut escaped = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            '"' => escaped.push_str("\\\""),
            '\n' => escaped.push_str("\\n"),
            c => escaped.push(c),
        }
    }
    escaped
}

/// Help text with `\` and newlines escaped.
fn escape_help(help: &str) -> String {
    help.replace('\\', "\\\\").replace('\n', "\\n")
}

/// `name` with every character outside `[a-zA-Z0-9_:]` replaced by `_`, and
/// a leading digit prefixed with `_`.
pub fn sanitize_metric_name(name: &str) -> String {
    sanitize(name, true)
}

/// `name` with every character outside `[a-zA-Z0-9_]` replaced by `_`, and a
/// leading digit prefixed with `_`.
pub fn sanitize_label_name(name: &str) -> String {
    sanitize(name, false)
}

fn sanitize(name: &str, colons: bool) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || (colons && c == ':') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

/// The Prometheus name of an instrument: sanitized, with its unit suffix,
/// and `_total` for counters.
pub fn metric_name(name: &str, unit: &str, kind: FamilyKind) -> String {
    let mut out = sanitize_metric_name(name);
    let suffix = match unit {
        "s" => Some("seconds"),
        "ms" => Some("milliseconds"),
        "By" => Some("bytes"),
        _ => None,
    };
    if let Some(suffix) = suffix {
        let bare = out.strip_suffix("_total").unwrap_or(&out);
        if !bare.ends_with(&format!("_{suffix}")) {
            out = format!("{bare}_{suffix}");
        }
    }
    if kind == FamilyKind::Counter && !out.ends_with("_total") {
        out.push_str("_total");
    }
    out
}

/// The families of a collection, sorted by name; series sorted by labels.
/// Families of the same name from several meters are merged (the first one's
/// help and kind are kept; a later one of another kind is left out).
pub fn families(metrics: &ResourceMetrics) -> Vec<Family> {
    let mut by_name: BTreeMap<String, Family> = BTreeMap::new();
    for scope in metrics.scope_metrics() {
        for metric in scope.metrics() {
            let Some(family) = family(metric) else {
                continue;
            };
            match by_name.get_mut(&family.name) {
                Some(known) if known.kind == family.kind => known.series.extend(family.series),
                Some(_) => {}
                None => {
                    by_name.insert(family.name.clone(), family);
                }
            }
        }
    }
    let mut families: Vec<Family> = by_name.into_values().collect();
    for family in &mut families {
        family.series.sort_by(|a, b| labels_of(a).cmp(labels_of(b)));
    }
    families
}

fn labels_of(series: &Series) -> &Labels {
    match series {
        Series::Value { labels, .. } | Series::Histogram { labels, .. } => labels,
    }
}

fn family(metric: &Metric) -> Option<Family> {
    match metric.data() {
        AggregatedMetrics::U64(data) => family_of(metric, data, Value::U64),
        AggregatedMetrics::I64(data) => family_of(metric, data, Value::I64),
        AggregatedMetrics::F64(data) => family_of(metric, data, Value::F64),
    }
}

fn family_of<T: Copy>(
    metric: &Metric,
    data: &MetricData<T>,
    value: impl Fn(T) -> Value,
) -> Option<Family> {
    let (kind, series) = match data {
        MetricData::Gauge(gauge) => (FamilyKind::Gauge, gauge_series(gauge, &value)),
        MetricData::Sum(sum) => {
            let kind = if sum.is_monotonic() {
                FamilyKind::Counter
            } else {
                FamilyKind::Gauge
            };
            (kind, sum_series(sum, &value))
        }
        MetricData::Histogram(histogram) => {
            (FamilyKind::Histogram, histogram_series(histogram, &value))
        }
        MetricData::ExponentialHistogram(_) => return None,
    };
    Some(Family {
        name: metric_name(metric.name(), metric.unit(), kind),
        help: metric.description().to_string(),
        kind,
        series,
    })
}

fn labels<'a>(attributes: impl Iterator<Item = &'a KeyValue>) -> Labels {
    let mut labels: Labels = attributes
        .map(|kv| {
            (
                sanitize_label_name(kv.key.as_str()),
                kv.value.as_str().into_owned(),
            )
        })
        .collect();
    labels.sort();
    labels
}

fn gauge_series<T: Copy>(gauge: &Gauge<T>, value: &impl Fn(T) -> Value) -> Vec<Series> {
    gauge
        .data_points()
        .map(|point| Series::Value {
            labels: labels(point.attributes()),
            value: value(point.value()),
        })
        .collect()
}

fn sum_series<T: Copy>(sum: &Sum<T>, value: &impl Fn(T) -> Value) -> Vec<Series> {
    sum.data_points()
        .map(|point| Series::Value {
            labels: labels(point.attributes()),
            value: value(point.value()),
        })
        .collect()
}

fn histogram_series<T: Copy>(histogram: &Histogram<T>, value: &impl Fn(T) -> Value) -> Vec<Series> {
    histogram
        .data_points()
        .map(|point| Series::Histogram {
            labels: labels(point.attributes()),
            bounds: point.bounds().collect(),
            bucket_counts: point.bucket_counts().collect(),
            sum: value(point.sum()),
            count: point.count(),
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect()
    }

    #[test]
    fn renders_counters_and_gauges_with_help_and_type() {
        let text = render(&[
            Family {
                name: "koan_worker_exported_rows_total".into(),
                help: "Rows in parts reported durable".into(),
                kind: FamilyKind::Counter,
                series: vec![
                    Series::Value {
                        labels: labels(&[("entity", "orders")]),
                        value: Value::U64(66_667),
                    },
                    Series::Value {
                        labels: labels(&[("entity", "invoices")]),
                        value: Value::U64(3),
                    },
                ],
            },
            Family {
                name: "koan_worker_jobs_in_flight".into(),
                help: "Jobs running".into(),
                kind: FamilyKind::Gauge,
                series: vec![Series::Value {
                    labels: Vec::new(),
                    value: Value::I64(-1),
                }],
            },
        ]);
        assert_eq!(
            text,
            "# HELP koan_worker_exported_rows_total Rows in parts reported durable\n\
             # TYPE koan_worker_exported_rows_total counter\n\
             koan_worker_exported_rows_total{entity=\"orders\"} 66667\n\
             koan_worker_exported_rows_total{entity=\"invoices\"} 3\n\
             # HELP koan_worker_jobs_in_flight Jobs running\n\
             # TYPE koan_worker_jobs_in_flight gauge\n\
             koan_worker_jobs_in_flight -1\n"
        );
    }

    #[test]
    fn renders_histograms_with_cumulative_buckets() {
        let text = render(&[Family {
            name: "koan_worker_chunk_duration_seconds".into(),
            help: "Chunk time".into(),
            kind: FamilyKind::Histogram,
            series: vec![Series::Histogram {
                labels: labels(&[("entity", "orders")]),
                bounds: vec![0.5, 1.0, 2.5],
                bucket_counts: vec![1, 0, 2, 1],
                sum: Value::F64(7.25),
                count: 4,
            }],
        }]);
        assert_eq!(
            text,
            "# HELP koan_worker_chunk_duration_seconds Chunk time\n\
             # TYPE koan_worker_chunk_duration_seconds histogram\n\
             koan_worker_chunk_duration_seconds_bucket{entity=\"orders\",le=\"0.5\"} 1\n\
             koan_worker_chunk_duration_seconds_bucket{entity=\"orders\",le=\"1\"} 1\n\
             koan_worker_chunk_duration_seconds_bucket{entity=\"orders\",le=\"2.5\"} 3\n\
             koan_worker_chunk_duration_seconds_bucket{entity=\"orders\",le=\"+Inf\"} 4\n\
             koan_worker_chunk_duration_seconds_sum{entity=\"orders\"} 7.25\n\
             koan_worker_chunk_duration_seconds_count{entity=\"orders\"} 4\n"
        );
    }

    #[test]
    fn escapes_label_values_and_help() {
        assert_eq!(
            escape_label_value("a\\b \"quoted\"\nnext"),
            "a\\\\b \\\"quoted\\\"\\nnext"
        );
        let text = render(&[Family {
            name: "m".into(),
            help: "line one\nline \\ two".into(),
            kind: FamilyKind::Gauge,
            series: vec![Series::Value {
                labels: labels(&[("reason", "said \"no\"")]),
                value: Value::F64(f64::INFINITY),
            }],
        }]);
        assert_eq!(
            text,
            "# HELP m line one\\nline \\\\ two\n# TYPE m gauge\nm{reason=\"said \\\"no\\\"\"} +Inf\n"
        );
    }

    #[test]
    fn names_follow_the_compatibility_rules() {
        assert_eq!(
            metric_name("koan.worker.exported.rows", "{row}", FamilyKind::Counter),
            "koan_worker_exported_rows_total"
        );
        assert_eq!(
            metric_name("koan.worker.exported.bytes", "By", FamilyKind::Counter),
            "koan_worker_exported_bytes_total"
        );
        assert_eq!(
            metric_name("koan.worker.chunk.duration", "s", FamilyKind::Histogram),
            "koan_worker_chunk_duration_seconds"
        );
        assert_eq!(
            metric_name("koan.pool.oldest_waiting", "s", FamilyKind::Gauge),
            "koan_pool_oldest_waiting_seconds"
        );
        assert_eq!(
            metric_name("requests_total", "", FamilyKind::Counter),
            "requests_total"
        );
        assert_eq!(sanitize_metric_name("9 lives/ok:x"), "_9_lives_ok:x");
        assert_eq!(sanitize_label_name("service.name"), "service_name");
        assert_eq!(format_value(Value::F64(f64::NAN)), "NaN");
        assert_eq!(format_value(Value::F64(f64::NEG_INFINITY)), "-Inf");
        assert_eq!(format_value(Value::F64(0.005)), "0.005");
    }
}
