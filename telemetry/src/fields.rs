//! Field formatting of human log lines: `name=value` pairs as the default
//! formatter writes them, without the `otel.*` fields (span names and kinds
//! meant for the trace exporter, which would repeat what the line says).

use std::fmt;

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::Writer;

/// Fields reserved for the OpenTelemetry layer start with this.
const OTEL_PREFIX: &str = "otel.";

/// Formats fields like `tracing_subscriber`'s default, skipping `otel.*`.
#[derive(Debug, Default, Clone, Copy)]
pub struct HumanFields;

impl<'writer> FormatFields<'writer> for HumanFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        let ansi = writer.has_ansi_escapes();
        let mut visitor = HumanVisitor {
            writer,
            ansi,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct HumanVisitor<'writer> {
    writer: Writer<'writer>,
    ansi: bool,
    first: bool,
    result: fmt::Result,
}

impl HumanVisitor<'_> {
    fn write(&mut self, field: &Field, value: fmt::Arguments<'_>, bare: bool) {
        if self.result.is_err() || field.name().starts_with(OTEL_PREFIX) {
            return;
        }
        let separator = if self.first { "" } else { " " };
        self.first = false;
        self.result = if bare {
            write!(self.writer, "{separator}{value}")
        } else if self.ansi {
            write!(
                self.writer,
                "{separator}\x1b[3m{}\x1b[0m\x1b[2m=\x1b[0m{value}",
                field.name()
            )
        } else {
            write!(self.writer, "{separator}{}={value}", field.name())
        };
    }
}

impl Visit for HumanVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.write(field, format_args!("{value}"), true);
        } else {
            self.write(field, format_args!("{value:?}"), false);
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.write(field, format_args!("{value}"), false);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let bare = field.name() == "message";
        self.write(field, format_args!("{value:?}"), bare);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_show_every_field_but_the_exporters() {
        let captured = Captured::default();
        let writer = captured.clone();
        let layer = tracing_subscriber::fmt::layer()
            .fmt_fields(HumanFields)
            .with_ansi(false)
            .without_time()
            .with_target(false)
            .with_writer(move || writer.clone());
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!(
                "job",
                otel.name = "export_chunk",
                entity = "orders",
                outcome = tracing::field::Empty
            );
            span.record("outcome", "acked");
            span.in_scope(|| tracing::info!(rows = 3, part = %"a/b", "chunk exported"));
        });
        let line = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert_eq!(
            line.trim(),
            r#"INFO job{entity="orders" outcome="acked"}: chunk exported rows=3 part=a/b"#
        );
    }
}
