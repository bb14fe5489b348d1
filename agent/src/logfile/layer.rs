//! A `tracing` layer that copies the agent's INFO-and-above events into the
//! log file as `type:"log"` lines, as the seed tool logged its own messages
//! there (`"msg":"program started","type":"log"`).

use std::borrow::Cow;
use std::fmt;

use serde_json::Value;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

use super::{LogHandle, ON_WRITER_THREAD};

/// Forwards events at INFO, WARN and ERROR to a [`LogHandle`]; see
/// [`tracing_layer`].
#[derive(Debug, Clone)]
pub struct LogLayer {
    handle: LogHandle,
}

/// A layer writing INFO-and-above events as `type:"log"` lines: the event's
/// `message` becomes `msg`, its other fields keep their names (numbers and
/// booleans as JSON values, anything else as strings). Like every send to
/// the writer it never blocks. Events raised on the writer thread itself
/// (its rate-limited write warnings) are not fed back into the file.
pub fn tracing_layer(handle: LogHandle) -> LogLayer {
    LogLayer { handle }
}

impl<S: Subscriber> Layer<S> for LogLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let level = *event.metadata().level();
        // Levels compare by verbosity: DEBUG and TRACE are "greater".
        if level > Level::INFO || ON_WRITER_THREAD.with(|c| c.get()) {
            return;
        }
        let mut visitor = FieldVisitor::default();
        event.record(&mut visitor);
        let level = match level {
            Level::ERROR => "error",
            Level::WARN => "warn",
            _ => "info",
        };
        self.handle
            .send_log(Cow::Borrowed(level), visitor.msg, visitor.fields);
    }
}

#[derive(Default)]
struct FieldVisitor {
    msg: String,
    fields: Vec<(Cow<'static, str>, Value)>,
}

impl FieldVisitor {
    fn put(&mut self, field: &Field, value: Value) {
        if field.name() == "message" {
            match value {
                Value::String(s) => self.msg = s,
                other => self.msg = other.to_string(),
            }
        } else {
            self.fields.push((Cow::Borrowed(field.name()), value));
        }
    }
}

impl Visit for FieldVisitor {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, Value::String(format!("{value:?}")));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, Value::String(value.to_string()));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, Value::from(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, Value::from(value));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, Value::from(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, Value::from(value));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, Value::String(value.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logfile::tests::TempDir;
    use crate::logfile::{LogConfig, LogStats, LogWriter};
    use std::sync::Arc;
    use tracing_subscriber::layer::SubscriberExt as _;

    #[test]
    fn info_and_above_events_become_log_lines() {
        let dir = TempDir::new("layer");
        let cfg = LogConfig {
            path: dir.path().join("nat.log"),
            ..LogConfig::default()
        };
        let handle =
            LogWriter::spawn(&cfg, Arc::from("n"), Arc::new(LogStats::default())).expect("spawn");
        let subscriber = tracing_subscriber::registry().with(tracing_layer(handle.clone()));
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(ports = ?[80, 443], count = 2u64, ok = true, "program started");
            tracing::debug!("not written");
            tracing::trace!("not written");
            let err = std::io::Error::other("disk \"full\"");
            tracing::warn!(
                error = &err as &(dyn std::error::Error + 'static),
                path = "/x",
                "cannot write"
            );
            tracing::error!(delta = -3i64, "boom {}", 42);
        });
        handle.try_shutdown().expect("shutdown");

        let text = std::fs::read_to_string(&cfg.path).expect("read");
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(text.lines().next().is_some_and(|l| l.contains(
            r#""level":"info","msg":"program started","type":"log","ports":"[80, 443]","count":2,"ok":true}"#
        )), "{text}");
        assert_eq!(lines[1]["level"], "warn");
        assert_eq!(lines[1]["msg"], "cannot write");
        assert_eq!(lines[1]["error"], "disk \"full\"");
        assert_eq!(lines[1]["path"], "/x");
        assert_eq!(lines[2]["level"], "error");
        assert_eq!(lines[2]["msg"], "boom 42");
        assert_eq!(lines[2]["delta"], -3);
    }
}
