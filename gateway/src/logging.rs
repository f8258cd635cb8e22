//! Logging: `tracing` everywhere, written as JSON lines, human text or journald
//! records, with Pingora's `log` output bridged in.
//!
//! JSON lines and journald records carry the event's fields *and* those of every
//! span it happens in, flattened, so a `request_id` or `trace_id` recorded on a
//! request span appears on every line logged while serving that request. The
//! filter is behind a reload handle: `log.level` changes on SIGHUP.

use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::io::{IsTerminal, Write as _};

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

use crate::config::model::{LogConfig, LogFormat};

/// Error setting up logging.
#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    /// The journal socket could not be opened.
    #[error("cannot connect to journald: {0}")]
    Journal(#[from] std::io::Error),
    /// A global logger or subscriber is already installed.
    #[error("logging already initialised: {0}")]
    AlreadyInitialised(String),
    /// The filter could not be changed.
    #[error("cannot change log filter: {0}")]
    Reload(String),
}

/// Changes the log filter of the running process.
#[derive(Clone)]
pub struct LogHandle {
    filter: reload::Handle<EnvFilter, Registry>,
}

impl LogHandle {
    /// Replaces the filter with `level` (already validated by the config).
    pub fn set_level(&self, level: &str) -> Result<(), LoggingError> {
        let filter = build_filter(level);
        self.filter
            .reload(filter)
            .map_err(|e| LoggingError::Reload(e.to_string()))
    }
}

/// Defaults placed before `log.level`, which can override them. Pingora's
/// `ServeHttp` glue (our admin API and bundle endpoint) logs every client that
/// disconnects early or sends garbage at ERROR, and nothing else: any client
/// could flood the log with it.
const DEFAULT_DIRECTIVES: &[&str] = &["pingora_core::apps::http_app=off"];

fn build_filter(level: &str) -> EnvFilter {
    // `level` was validated by the config; parse_lossy cannot meet a bad directive.
    // A bare level must come first: it sets the default for every module.
    let (default, modules) = match level.split_once(',') {
        Some((first, rest)) if !first.contains('=') => (first, rest),
        _ if !level.contains('=') => (level, ""),
        _ => ("", level),
    };
    // A default yields to any directive of the configuration for the same target.
    let defaults = DEFAULT_DIRECTIVES.iter().copied().filter(|d| {
        let target = d.split('=').next().unwrap_or(d);
        !modules
            .split(',')
            .any(|m| m.split('=').next() == Some(target))
    });
    let directives: Vec<&str> = std::iter::once(default)
        .chain(defaults)
        .chain(std::iter::once(modules))
        .filter(|d| !d.is_empty())
        .collect();
    EnvFilter::builder().parse_lossy(directives.join(","))
}

/// The output chosen for `log.format = "auto"` in this process's surroundings.
pub fn resolve_format(format: LogFormat) -> Output {
    match format {
        LogFormat::Json => Output::Json,
        LogFormat::Text => Output::Text,
        LogFormat::Auto if systemd_journal_logger::connected_to_journal() => Output::Journald,
        LogFormat::Auto if std::io::stdout().is_terminal() => Output::Text,
        LogFormat::Auto => Output::Json,
    }
}

/// Where and how log events are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// JSON lines on stdout.
    Json,
    /// Human-readable text on stdout.
    Text,
    /// Native journald records with structured fields.
    Journald,
}

/// Installs the global subscriber and the `log` bridge. Call once, early.
pub fn init(config: &LogConfig) -> Result<LogHandle, LoggingError> {
    let (filter, handle) = reload::Layer::new(build_filter(&config.level));
    let output: Box<dyn Layer<_> + Send + Sync> = match resolve_format(config.format) {
        Output::Json => Box::new(FieldsLayer::new(Sink::Json(Mutex::new(Box::new(
            std::io::LineWriter::new(std::io::stdout()),
        ))))),
        Output::Journald => Box::new(FieldsLayer::new(Sink::Journal(
            systemd_journal_logger::JournalLog::new()?.with_syslog_identifier("isthmus".to_owned()),
        ))),
        Output::Text => Box::new(
            tracing_subscriber::fmt::layer()
                .with_ansi(std::io::stdout().is_terminal())
                .with_target(true),
        ),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(output)
        .try_init()
        .map_err(|e| LoggingError::AlreadyInitialised(e.to_string()))?;
    // Pingora logs through `log`: forward its records into tracing.
    tracing_log::LogTracer::init().map_err(|e| LoggingError::AlreadyInitialised(e.to_string()))?;
    Ok(LogHandle { filter: handle })
}

/// Fields recorded on a span, kept in its extensions for the events inside it.
struct SpanFields(Map<String, Value>);

/// Collects tracing fields into a JSON map.
struct JsonVisitor<'a>(&'a mut Map<String, Value>);

impl Visit for JsonVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0
            .insert(field.name().to_owned(), Value::from(value.to_string()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().to_owned(), Value::from(format!("{value:?}")));
    }
}

enum Sink {
    Json(Mutex<Box<dyn std::io::Write + Send>>),
    Journal(systemd_journal_logger::JournalLog),
}

/// A layer that flattens event and span fields and hands them to a [`Sink`].
struct FieldsLayer {
    sink: Sink,
}

impl FieldsLayer {
    fn new(sink: Sink) -> Self {
        Self { sink }
    }
}

impl<S> Layer<S> for FieldsLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = Map::new();
        attrs.record(&mut JsonVisitor(&mut fields));
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(SpanFields(fields));
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id)
            && let Some(fields) = span.extensions_mut().get_mut::<SpanFields>()
        {
            values.record(&mut JsonVisitor(&mut fields.0));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        // Outermost span first, so inner spans and the event itself win on conflicts.
        let mut fields = Map::new();
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                if let Some(span_fields) = span.extensions().get::<SpanFields>() {
                    fields.extend(span_fields.0.clone());
                }
            }
        }
        event.record(&mut JsonVisitor(&mut fields));
        // `log` records bridged by tracing-log carry their origin in `log.*` fields.
        let target = fields
            .remove("log.target")
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_else(|| event.metadata().target().to_owned());
        fields.retain(|k, _| !k.starts_with("log."));
        let message = match fields.remove("message") {
            Some(Value::String(s)) => s,
            Some(other) => other.to_string(),
            None => String::new(),
        };
        let level = *event.metadata().level();
        match &self.sink {
            Sink::Json(out) => {
                let line = json_line(level, &target, message, fields);
                // Nowhere to report a failed write of a log line.
                let _ = writeln!(out.lock(), "{line}");
            }
            Sink::Journal(journal) => journal_record(journal, level, &target, &message, &fields),
        }
    }
}

/// One JSON log line: `timestamp, level, target, message`, then the fields.
fn json_line(level: Level, target: &str, message: String, fields: Map<String, Value>) -> String {
    let mut timestamp = String::new();
    // SystemTime formats RFC 3339 in UTC; it cannot fail writing into a String.
    let _ = SystemTime.format_time(&mut Writer::new(&mut timestamp));
    let mut line = Map::new();
    line.insert("timestamp".into(), Value::from(timestamp));
    line.insert("level".into(), Value::from(level.as_str()));
    line.insert("target".into(), Value::from(target));
    line.insert("message".into(), Value::from(message));
    for (k, v) in fields {
        line.entry(k).or_insert(v);
    }
    Value::Object(line).to_string()
}

fn journal_record(
    journal: &systemd_journal_logger::JournalLog,
    level: Level,
    target: &str,
    message: &str,
    fields: &Map<String, Value>,
) {
    let level = match level {
        Level::ERROR => log::Level::Error,
        Level::WARN => log::Level::Warn,
        Level::INFO => log::Level::Info,
        Level::DEBUG => log::Level::Debug,
        Level::TRACE => log::Level::Trace,
    };
    let values: BTreeMap<&str, String> = fields
        .iter()
        .map(|(k, v)| {
            let text = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (k.as_str(), text)
        })
        .collect();
    let kv: Vec<(&str, &str)> = values.iter().map(|(k, v)| (*k, v.as_str())).collect();
    // journald being away must not take the gateway down; nothing else to tell.
    let _ = journal.journal_send(
        &log::Record::builder()
            .level(level)
            .target(target)
            .args(format_args!("{message}"))
            .key_values(&kv)
            .build(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_line_has_contract_fields_first_and_keeps_extra_fields() {
        let mut fields = Map::new();
        fields.insert("request_id".into(), Value::from("abc"));
        fields.insert("level".into(), Value::from("spoofed"));
        let line = json_line(Level::WARN, "isthmus_gateway::x", "hello".into(), fields);
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["level"], "WARN", "a field cannot overwrite the level");
        assert_eq!(v["message"], "hello");
        assert_eq!(v["request_id"], "abc");
        assert!(v["timestamp"].as_str().unwrap().ends_with('Z'));
        assert!(line.starts_with("{\"timestamp\""), "{line}");
    }

    #[test]
    fn quiet_defaults_apply_unless_the_configured_level_overrides_them() {
        let f = build_filter("info").to_string();
        assert!(f.contains("pingora_core::apps::http_app=off"), "{f}");
        assert!(f.contains("info"), "{f}");
        let f = build_filter("debug,pingora_core::apps::http_app=error").to_string();
        assert!(f.contains("pingora_core::apps::http_app=error"), "{f}");
        assert!(!f.contains("=off"), "{f}");
    }

    #[derive(Clone, Default)]
    struct Buffer(std::sync::Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            self.0.lock().extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn span_fields_are_flattened_into_each_event_line() {
        let buffer = Buffer::default();
        let layer = FieldsLayer::new(Sink::Json(Mutex::new(Box::new(buffer.clone()))));
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            let outer = tracing::info_span!("request", request_id = "req-1", trace_id = "t-1");
            let _o = outer.enter();
            let inner = tracing::info_span!("upstream", request_id = tracing::field::Empty);
            let _i = inner.enter();
            inner.record("request_id", "req-2");
            tracing::warn!(attempt = 2, "retrying");
        });
        let text = String::from_utf8(buffer.0.lock().clone()).unwrap();
        let v: Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(v["message"], "retrying");
        assert_eq!(v["level"], "WARN");
        assert_eq!(v["attempt"], 2);
        assert_eq!(v["trace_id"], "t-1");
        assert_eq!(v["request_id"], "req-2", "the innermost span wins");
    }
}
