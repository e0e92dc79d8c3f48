//! Arize Phoenix as the OTLP backend of trace tests: a project of its own per
//! test (the `openinference.project.name` resource attribute), spans read
//! back through Phoenix's REST API, the project deleted at the end.
//!
//! `.ci/run` installs Phoenix (`pip install arize-phoenix` in a cached
//! virtualenv) and starts `phoenix serve`; `KOAN_TEST_PHOENIX_URL` names it
//! (default `http://127.0.0.1:6006`). A test that needs Phoenix fails when it
//! does not answer: a trace test never passes without a backend.
//!
//! Spans are read with `GET /v1/projects/{project}/spans?trace_id=…` (Phoenix
//! 20 answers `{"data": [span…], "next_cursor": …}`; each span has `name`,
//! `context.trace_id`, `context.span_id`, `parent_id`, `status_code`
//! (`OK`/`ERROR`/`UNSET`), `status_message`, `attributes` and `events`).
//! Phoenix may answer attribute integers as JSON numbers or as strings.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

const HINT: &str = "start it with `.ci/run` (installs and starts it), or by hand: \
    `python3 -m venv ~/.cache/koan-backup/phoenix-venv && \
    ~/.cache/koan-backup/phoenix-venv/bin/pip install arize-phoenix && \
    ~/.cache/koan-backup/phoenix-venv/bin/phoenix serve &`";

/// A Phoenix server and this test's project in it.
pub struct Phoenix {
    /// Base URL (`http://127.0.0.1:6006`).
    pub url: String,
    /// The project this test's spans go to.
    pub project: String,
}

/// One span as Phoenix returns it.
#[derive(Debug, Clone)]
pub struct Span {
    /// Span name.
    pub name: String,
    /// Trace id, 32 hex digits.
    pub trace_id: String,
    /// Span id, 16 hex digits.
    pub span_id: String,
    /// Parent span id; `None` for a root.
    pub parent_id: Option<String>,
    /// `OK`, `ERROR` or `UNSET`.
    pub status_code: String,
    /// The status description (the reason of an error).
    pub status_message: String,
    /// Attributes.
    pub attributes: BTreeMap<String, Value>,
    /// The span as received, for messages and secret checks.
    pub raw: Value,
}

impl Span {
    /// An attribute as text (strings as they are, numbers printed).
    pub fn text(&self, name: &str) -> Option<String> {
        match self.attributes.get(name)? {
            Value::String(text) => Some(text.clone()),
            other => Some(other.to_string()),
        }
    }

    /// An attribute as an integer (Phoenix may return numbers as text).
    pub fn int(&self, name: &str) -> Option<i64> {
        match self.attributes.get(name)? {
            Value::Number(number) => number.as_i64(),
            Value::String(text) => text.parse().ok(),
            _ => None,
        }
    }
}

fn curl(args: &[&str]) -> Result<(u16, String), String> {
    let output = Command::new("curl")
        .args(["-sS", "--max-time", "20", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .map_err(|error| format!("running curl: {error}"))?;
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).trim().to_string());
    }
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
    let code = code
        .trim()
        .parse()
        .map_err(|_| format!("no status in {text:?}"))?;
    Ok((code, body.to_string()))
}

impl Phoenix {
    /// Phoenix at `KOAN_TEST_PHOENIX_URL` (default `http://127.0.0.1:6006`),
    /// with a project named `project` for this test. Panics, saying how to
    /// start Phoenix, when it does not answer.
    pub fn require(project: &str) -> Self {
        let url = std::env::var("KOAN_TEST_PHOENIX_URL")
            .ok()
            .filter(|url| !url.is_empty())
            .unwrap_or_else(|| "http://127.0.0.1:6006".to_string());
        let url = url.trim_end_matches('/').to_string();
        match curl(&[&format!("{url}/v1/projects?limit=1")]) {
            Ok((200, _)) => {}
            Ok((code, body)) => panic!(
                "Phoenix at {url} answered {code} to GET /v1/projects ({body}); this test \
                 needs a running Arize Phoenix: {HINT}"
            ),
            Err(error) => panic!(
                "Phoenix is not reachable at {url} ({error}); this test needs a running \
                 Arize Phoenix (OTLP/HTTP at {url}/v1/traces): {HINT}"
            ),
        }
        Self {
            url,
            project: project.to_string(),
        }
    }

    /// The environment that makes a koan-backup process export its spans to
    /// this test's project, quickly (batches every 100 ms).
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), self.url.clone()),
            (
                "OTEL_RESOURCE_ATTRIBUTES".into(),
                format!("openinference.project.name={}", self.project),
            ),
            ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
            // Phoenix takes traces only; metrics stay on /metrics.
            ("OTEL_METRICS_EXPORTER".into(), "none".into()),
        ]
    }

    /// Every span of the project, or of one trace, as stored so far.
    pub fn spans(&self, trace_id: Option<&str>) -> Vec<Span> {
        let mut spans = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut query = format!("{}/v1/projects/{}/spans?limit=1000", self.url, self.project);
            if let Some(trace_id) = trace_id {
                query.push_str(&format!("&trace_id={trace_id}"));
            }
            if let Some(cursor) = &cursor {
                query.push_str(&format!("&cursor={cursor}"));
            }
            let (code, body) = curl(&[&query]).unwrap_or_else(|error| {
                panic!("reading spans from Phoenix at {}: {error}", self.url)
            });
            if code == 404 {
                // No span reached the project yet: Phoenix creates it on the first.
                return spans;
            }
            assert_eq!(code, 200, "GET {query}: {body}");
            let page: Value = serde_json::from_str(&body)
                .unwrap_or_else(|error| panic!("GET {query} answered no JSON ({error}): {body}"));
            for raw in page["data"].as_array().cloned().unwrap_or_default() {
                spans.push(parse(raw));
            }
            match page["next_cursor"].as_str() {
                Some(next) if !next.is_empty() => cursor = Some(next.to_string()),
                _ => return spans,
            }
        }
    }

    /// Polls the spans of `trace_id` until `complete` says they are all
    /// there (exports are batched), or panics after `timeout` with what came.
    pub fn wait_for_trace(
        &self,
        trace_id: &str,
        timeout: Duration,
        complete: impl Fn(&[Span]) -> bool,
    ) -> Vec<Span> {
        let deadline = Instant::now() + timeout;
        loop {
            let spans = self.spans(Some(trace_id));
            if complete(&spans) {
                // One more round for stragglers of the same batch.
                std::thread::sleep(Duration::from_millis(500));
                return self.spans(Some(trace_id));
            }
            if Instant::now() > deadline {
                let names: Vec<&str> = spans.iter().map(|span| span.name.as_str()).collect();
                panic!(
                    "trace {trace_id} incomplete in Phoenix after {timeout:?}: {} spans {names:?}",
                    spans.len()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Phoenix {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "spans kept in Phoenix: {}/projects (project {})",
                self.url, self.project
            );
            return;
        }
        let _ = curl(&[
            "-X",
            "DELETE",
            &format!("{}/v1/projects/{}", self.url, self.project),
        ]);
    }
}

fn parse(raw: Value) -> Span {
    let text = |value: &Value| value.as_str().unwrap_or_default().to_string();
    let attributes = raw["attributes"]
        .as_object()
        .map(|object| {
            object
                .iter()
                .map(|(name, value)| (name.clone(), value.clone()))
                .collect()
        })
        .unwrap_or_default();
    Span {
        name: text(&raw["name"]),
        trace_id: text(&raw["context"]["trace_id"]),
        span_id: text(&raw["context"]["span_id"]),
        parent_id: raw["parent_id"]
            .as_str()
            .filter(|parent| !parent.is_empty())
            .map(str::to_string),
        status_code: text(&raw["status_code"]),
        status_message: text(&raw["status_message"]),
        attributes,
        raw,
    }
}
