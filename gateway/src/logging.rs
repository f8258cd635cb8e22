//! Logging: `tracing` everywhere, written as JSON lines, human text or journald
//! records, with Pingora's `log` output bridged in.
//!
//! JSON lines and journald records carry the event's fields *and* those of every
//! span it happens in, flattened, so a `request_id` or `trace_id` recorded on a
//! request span appears on every line logged while serving that request. The
//! filter is behind a reload handle: `log.level` changes on SIGHUP.
//!
//! The access log is on by default, so a line must cost little. JSON lines are
//! written field by field into one reused per-thread buffer (no map, no
//! `String` per field), and every line, JSON or text, is appended whole to one
//! process-wide [`LineBuffer`] that a background thread writes to stdout at most
//! [`FLUSH_INTERVAL`] after its first line, or as soon as it holds
//! [`FLUSH_BYTES`]: one `write` for many lines instead of one per line. A WARN
//! or ERROR line is written at once, with everything before it, by the thread
//! that logs it, so a line about to take the process down is never left in
//! memory. [`flush`] writes what is left; the gateway calls it on every way
//! out (see `lifecycle::log_stopped` and `server::run`). journald records
//! are datagrams, sent one by one as before.

use parking_lot::{Condvar, Mutex};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::ops::Range;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

use crate::config::log::PPM;
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
    /// The thread that writes buffered lines could not be started.
    #[error("cannot start the log writer thread: {0}")]
    Writer(#[source] std::io::Error),
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
        let bridged = bridged_level(&filter);
        self.filter
            .reload(filter)
            .map_err(|e| LoggingError::Reload(e.to_string()))?;
        log::set_max_level(bridged);
        Ok(())
    }
}

/// The most verbose `log` level `filter` can let through. `log`'s macros
/// compare against this before anything else, so Pingora's per-request
/// `debug!` calls cost one load instead of a trip through the bridge when
/// the filter would drop them anyway.
fn bridged_level(filter: &EnvFilter) -> log::LevelFilter {
    use tracing::level_filters::LevelFilter;
    match filter.max_level_hint() {
        Some(LevelFilter::OFF) => log::LevelFilter::Off,
        Some(LevelFilter::ERROR) => log::LevelFilter::Error,
        Some(LevelFilter::WARN) => log::LevelFilter::Warn,
        Some(LevelFilter::INFO) => log::LevelFilter::Info,
        Some(LevelFilter::DEBUG) => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
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

/// The buffer every stdout line goes through, once [`init`] set one up.
static STDOUT: OnceLock<Arc<LineBuffer>> = OnceLock::new();

/// Writes the log lines still buffered. Call before the process exits.
pub fn flush() {
    if let Some(buffer) = STDOUT.get() {
        buffer.flush();
    }
}

/// Installs the global subscriber and the `log` bridge. Call once, early.
pub fn init(config: &LogConfig) -> Result<LogHandle, LoggingError> {
    let filter = build_filter(&config.level);
    let bridged = bridged_level(&filter);
    let (filter, handle) = reload::Layer::new(filter);
    let stdout = || -> Result<Arc<LineBuffer>, LoggingError> {
        let buffer = LineBuffer::new(Box::new(std::io::stdout()), FLUSH_INTERVAL);
        LineBuffer::spawn_writer(&buffer).map_err(LoggingError::Writer)?;
        // Only one `init` can succeed (the subscriber below is global), so only
        // one buffer ever needs flushing.
        let _ = STDOUT.set(buffer.clone());
        Ok(buffer)
    };
    let output: Box<dyn Layer<_> + Send + Sync> = match resolve_format(config.format) {
        Output::Json => Box::new(JsonLayer { out: stdout()? }),
        Output::Journald => Box::new(JournalLayer {
            journal: systemd_journal_logger::JournalLog::new()?
                .with_syslog_identifier("isthmus".to_owned()),
        }),
        Output::Text => Box::new(
            tracing_subscriber::fmt::layer()
                .with_ansi(std::io::stdout().is_terminal())
                .with_target(true)
                .with_writer(Buffered(stdout()?)),
        ),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(output)
        .try_init()
        .map_err(|e| LoggingError::AlreadyInitialised(e.to_string()))?;
    // Pingora logs through `log`: forward its records into tracing.
    tracing_log::LogTracer::init().map_err(|e| LoggingError::AlreadyInitialised(e.to_string()))?;
    log::set_max_level(bridged);
    Ok(LogHandle { filter: handle })
}

/// How long a line may wait in the buffer before it is written.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);

/// Buffered lines are written without waiting once they reach this size.
pub const FLUSH_BYTES: usize = 32 * 1024;

/// Past this much waiting output (the writer thread stuck on a full pipe),
/// each thread that logs writes itself: it waits, as it did before the
/// buffer existed, rather than the buffer growing without bound.
const MAX_PENDING_BYTES: usize = 1024 * 1024;

/// Whole lines waiting to be written, and where they go.
///
/// Lines are appended whole under one lock and written in the order they were
/// appended, whole buffers at a time by one writer at a time, so a line is
/// never split or mixed with another. The two buffers swap places on each
/// write and keep their capacity: in a steady state nothing is allocated.
pub struct LineBuffer {
    pending: Mutex<Vec<u8>>,
    /// Wakes the writer thread: a first line in an empty buffer, or a full one.
    wake: Condvar,
    /// The output and the buffer being written, held for the whole write.
    out: Mutex<Writing>,
    interval: Duration,
}

struct Writing {
    writer: Box<dyn Write + Send>,
    spare: Vec<u8>,
}

impl LineBuffer {
    /// A buffer in front of `writer` whose lines wait at most `interval` once
    /// [`LineBuffer::spawn_writer`] has started its thread.
    pub fn new(writer: Box<dyn Write + Send>, interval: Duration) -> Arc<Self> {
        Arc::new(Self {
            pending: Mutex::new(Vec::with_capacity(FLUSH_BYTES)),
            wake: Condvar::new(),
            out: Mutex::new(Writing {
                writer,
                spare: Vec::with_capacity(FLUSH_BYTES),
            }),
            interval,
        })
    }

    /// Starts the thread that writes the buffered lines. It lives as long as
    /// the process (the buffer is process-wide).
    pub fn spawn_writer(this: &Arc<Self>) -> std::io::Result<()> {
        let this = this.clone();
        std::thread::Builder::new()
            .name("isthmus-log".to_owned())
            .spawn(move || this.write_forever())
            .map(drop)
    }

    fn write_forever(&self) {
        loop {
            {
                let mut pending = self.pending.lock();
                while pending.is_empty() {
                    self.wake.wait(&mut pending);
                }
                // Lines logged meanwhile go out in the same write.
                let deadline = Instant::now() + self.interval;
                while pending.len() < FLUSH_BYTES
                    && !self.wake.wait_until(&mut pending, deadline).timed_out()
                {}
            }
            self.flush();
        }
    }

    /// Appends `line` (one or more whole lines); with `urgent`, writes it and
    /// everything before it at once.
    pub fn push(&self, line: &[u8], urgent: bool) {
        let mut pending = self.pending.lock();
        let before = pending.len();
        pending.extend_from_slice(line);
        let after = pending.len();
        drop(pending);
        if urgent || after >= MAX_PENDING_BYTES {
            self.flush();
        } else if before == 0 || (before < FLUSH_BYTES && after >= FLUSH_BYTES) {
            self.wake.notify_one();
        }
    }

    /// Writes every buffered line now.
    pub fn flush(&self) {
        let mut out = self.out.lock();
        let Writing { writer, spare } = &mut *out;
        std::mem::swap(&mut *self.pending.lock(), spare);
        if spare.is_empty() {
            return;
        }
        // Nowhere to report a failed write of a log line.
        let _ = writer.write_all(spare);
        let _ = writer.flush();
        spare.clear();
    }
}

/// Hands `tracing_subscriber::fmt`'s lines (one `write` per event) to a
/// [`LineBuffer`]; WARN and ERROR lines are written at once.
struct Buffered(Arc<LineBuffer>);

impl<'a> MakeWriter<'a> for Buffered {
    type Writer = BufferedLine<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        BufferedLine {
            buffer: &self.0,
            urgent: false,
        }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        BufferedLine {
            buffer: &self.0,
            urgent: urgent(*meta.level()),
        }
    }
}

/// Whether a line at `level` is written at once rather than buffered.
fn urgent(level: Level) -> bool {
    level <= Level::WARN
}

/// One event's output, appended whole to the buffer.
struct BufferedLine<'a> {
    buffer: &'a LineBuffer,
    urgent: bool,
}

impl Write for BufferedLine<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buffer.push(data, self.urgent);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Whether the access log keeps a request: every failed one, and of the
/// others about `sample_ppm` in a million (`log.access_sample`). The choice
/// is a hash of the request id, not a draw: every gateway on a request's way
/// (it forwards `x-request-id`) keeps the same requests, so a sampled
/// request's lines can still be followed from hop to hop.
pub fn access_sampled(request_id: &str, sample_ppm: u32, failed: bool) -> bool {
    if failed || sample_ppm >= PPM {
        return true;
    }
    if sample_ppm == 0 {
        return false;
    }
    // FNV-1a, then SplitMix64's finaliser so that every bit depends on every byte.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in request_id.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    h % u64::from(PPM) < u64::from(sample_ppm)
}

/// Fields recorded on a span, kept in its extensions for the events inside it
/// (journald).
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

/// A layer that flattens event and span fields into native journald records.
struct JournalLayer {
    journal: systemd_journal_logger::JournalLog,
}

impl<S> Layer<S> for JournalLayer
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
        journal_record(&self.journal, level, &target, &message, &fields);
    }
}

/// Fields as JSON text: each entry names the bytes of its value in `values`.
/// A name recorded again keeps its place and takes the new value.
#[derive(Default)]
struct JsonFields {
    values: Vec<u8>,
    entries: Vec<(&'static str, Range<usize>)>,
}

impl JsonFields {
    fn clear(&mut self) {
        self.values.clear();
        self.entries.clear();
    }

    /// Records the value written into `values` since `start` as `name`.
    fn set(&mut self, name: &'static str, start: usize) {
        let range = start..self.values.len();
        match self.entries.iter_mut().find(|(n, _)| *n == name) {
            Some(entry) => entry.1 = range,
            None => self.entries.push((name, range)),
        }
    }

    fn get(&self, name: &str) -> Option<&[u8]> {
        self.entries
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, r)| &self.values[r.clone()])
    }

    /// Adds `other`'s fields after these, replacing those of the same name.
    fn extend(&mut self, other: &JsonFields) {
        for (name, range) in &other.entries {
            let start = self.values.len();
            self.values.extend_from_slice(&other.values[range.clone()]);
            self.set(name, start);
        }
    }

    fn number(&mut self, field: &Field, value: impl serde::Serialize) {
        let start = self.values.len();
        // Numbers and booleans always serialize; a non-finite float as `null`.
        let _ = serde_json::to_writer(&mut self.values, &value);
        self.set(field.name(), start);
    }
}

impl Visit for JsonFields {
    fn record_str(&mut self, field: &Field, value: &str) {
        let start = self.values.len();
        json_str(&mut self.values, value);
        self.set(field.name(), start);
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.number(field, value);
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.number(field, value);
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.number(field, value);
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.number(field, value);
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        let start = self.values.len();
        json_display(&mut self.values, format_args!("{value}"));
        self.set(field.name(), start);
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let start = self.values.len();
        json_display(&mut self.values, format_args!("{value:?}"));
        self.set(field.name(), start);
    }
}

/// Lowercase hex digits, indexed by nibble.
const HEX: &[u8; 16] = b"0123456789abcdef";

/// Appends `s` escaped as the inside of a JSON string, as `serde_json` does.
fn json_escape(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    let mut done = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let short: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[done..i]);
        if short.is_empty() {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0x0f)]);
        } else {
            out.extend_from_slice(short);
        }
        done = i + 1;
    }
    out.extend_from_slice(&bytes[done..]);
}

/// Appends `s` as a JSON string.
fn json_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    json_escape(out, s);
    out.push(b'"');
}

/// Writes formatted text into a JSON string as it is formatted.
struct Escaping<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Escaping<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        json_escape(self.0, s);
        Ok(())
    }
}

/// Appends formatted text as a JSON string, without an intermediate `String`.
fn json_display(out: &mut Vec<u8>, args: std::fmt::Arguments<'_>) {
    out.push(b'"');
    // Escaping into a Vec cannot fail; a Display impl that fails leaves what it wrote.
    let _ = std::fmt::Write::write_fmt(&mut Escaping(out), args);
    out.push(b'"');
}

/// Names the line's own leading fields; an event or span field of the same
/// name cannot overwrite them.
const CONTRACT_FIELDS: [&str; 4] = ["timestamp", "level", "target", "message"];

/// Appends one JSON log line: `timestamp, level, target, message`, then
/// `fields` in the order they were first recorded, and a newline. `log`
/// records bridged by tracing-log carry their origin in `log.*` fields: their
/// `log.target` is the line's target, the others are dropped.
fn json_line(line: &mut Vec<u8>, level: Level, target: &str, fields: &JsonFields) {
    line.extend_from_slice(b"{\"timestamp\":\"");
    // SystemTime formats RFC 3339 in UTC; there is nothing to escape in it.
    let _ = SystemTime.format_time(&mut Writer::new(&mut Escaping(line)));
    line.extend_from_slice(b"\",\"level\":\"");
    line.extend_from_slice(level.as_str().as_bytes());
    line.extend_from_slice(b"\",\"target\":");
    match fields
        .get("log.target")
        .filter(|v| v.first() == Some(&b'"'))
    {
        Some(origin) => line.extend_from_slice(origin),
        None => json_str(line, target),
    }
    line.extend_from_slice(b",\"message\":");
    match fields.get("message") {
        Some(text) if text.first() == Some(&b'"') => line.extend_from_slice(text),
        // A message that is not a string is written as a string of its JSON.
        Some(json) => json_str(line, std::str::from_utf8(json).unwrap_or_default()),
        None => line.extend_from_slice(b"\"\""),
    }
    for (name, range) in &fields.entries {
        if CONTRACT_FIELDS.contains(name) || name.starts_with("log.") {
            continue;
        }
        line.push(b',');
        json_str(line, name);
        line.push(b':');
        line.extend_from_slice(&fields.values[range.clone()]);
    }
    line.extend_from_slice(b"}\n");
}

/// What a thread reuses for each JSON line it logs.
#[derive(Default)]
struct Scratch {
    fields: JsonFields,
    line: Vec<u8>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::default();
}

/// A layer that writes each event, with the fields of the spans it happened
/// in flattened into it, as one JSON line into a [`LineBuffer`].
struct JsonLayer {
    out: Arc<LineBuffer>,
}

impl JsonLayer {
    fn write<S>(&self, scratch: &mut Scratch, event: &Event<'_>, ctx: &Context<'_, S>)
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        let Scratch { fields, line } = scratch;
        fields.clear();
        line.clear();
        // Outermost span first, so inner spans and the event itself win on conflicts.
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                if let Some(span_fields) = span.extensions().get::<JsonFields>() {
                    fields.extend(span_fields);
                }
            }
        }
        event.record(fields);
        let level = *event.metadata().level();
        json_line(line, level, event.metadata().target(), fields);
        self.out.push(line, urgent(level));
    }
}

impl<S> Layer<S> for JsonLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = JsonFields::default();
        attrs.record(&mut fields);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(fields);
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id)
            && let Some(fields) = span.extensions_mut().get_mut::<JsonFields>()
        {
            values.record(fields);
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
            Ok(mut scratch) => self.write(&mut scratch, event, &ctx),
            // An event logged while one is formatted (by a field's Debug impl).
            Err(_) => self.write(&mut Scratch::default(), event, &ctx),
        });
    }
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
    fn the_bridged_log_level_follows_the_most_verbose_directive() {
        let level = |l: &str| bridged_level(&build_filter(l));
        assert_eq!(level("warn"), log::LevelFilter::Warn);
        assert_eq!(level("info"), log::LevelFilter::Info);
        assert_eq!(level("info,pingora_core=debug"), log::LevelFilter::Debug);
        assert_eq!(level("trace"), log::LevelFilter::Trace);
    }

    /// The line `fields` make, parsed.
    fn parsed_line(level: Level, target: &str, fields: &JsonFields) -> (String, Value) {
        let mut line = Vec::new();
        json_line(&mut line, level, target, fields);
        let text = String::from_utf8(line).unwrap();
        assert!(
            text.ends_with('\n') && text.matches('\n').count() == 1,
            "{text}"
        );
        let value = serde_json::from_str(&text).unwrap();
        (text, value)
    }

    fn str_field(fields: &mut JsonFields, name: &'static str, value: &str) {
        let start = fields.values.len();
        json_str(&mut fields.values, value);
        fields.set(name, start);
    }

    #[test]
    fn json_line_has_contract_fields_first_and_keeps_extra_fields() {
        let mut fields = JsonFields::default();
        str_field(&mut fields, "message", "hello");
        str_field(&mut fields, "request_id", "abc");
        str_field(&mut fields, "level", "spoofed");
        let (line, v) = parsed_line(Level::WARN, "isthmus_gateway::x", &fields);
        assert_eq!(v["level"], "WARN", "a field cannot overwrite the level");
        assert_eq!(v["message"], "hello");
        assert_eq!(v["target"], "isthmus_gateway::x");
        assert_eq!(v["request_id"], "abc");
        assert!(v["timestamp"].as_str().unwrap().ends_with('Z'));
        assert!(
            line.starts_with("{\"timestamp\":\"") && line.contains("\"level\":\"WARN\",\"target\""),
            "{line}"
        );
    }

    #[test]
    fn bridged_log_records_take_their_target_and_drop_log_fields() {
        let mut fields = JsonFields::default();
        str_field(&mut fields, "message", "from pingora");
        str_field(&mut fields, "log.target", "pingora_core::x");
        str_field(&mut fields, "log.module_path", "pingora_core::x");
        let (_, v) = parsed_line(Level::INFO, "log", &fields);
        assert_eq!(v["target"], "pingora_core::x");
        assert_eq!(v.as_object().unwrap().len(), 4, "{v}");
        let (_, v) = parsed_line(Level::INFO, "t", &JsonFields::default());
        assert_eq!(v["message"], "");
    }

    #[test]
    fn strings_are_escaped_as_serde_json_escapes_them() {
        let mut every: String = (0u8..0x80).map(char::from).collect();
        every.push_str("é ☃ 🦀 \u{7f}\u{2028}");
        for s in [every.as_str(), "", "plain", "\"quoted\" \\ back\\slash"] {
            let mut out = Vec::new();
            json_str(&mut out, s);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                serde_json::to_string(s).unwrap()
            );
        }
        let mut out = Vec::new();
        json_display(&mut out, format_args!("{:?}", "a\nb"));
        assert_eq!(out, br#""\"a\\nb\"""#);
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

    /// An output that keeps what is written, and counts the writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<(Vec<u8>, usize)>>);

    impl Captured {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().0.clone()).unwrap()
        }
        fn writes(&self) -> usize {
            self.0.lock().1
        }
    }

    impl Write for Captured {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            let mut inner = self.0.lock();
            inner.0.extend_from_slice(data);
            inner.1 += 1;
            Ok(data.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Waits (up to 10 s) for `done`.
    fn eventually(what: &str, done: impl Fn() -> bool) {
        let until = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < until, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A buffer without a writer thread: only `urgent`, size and `flush` write.
    fn unattended() -> (Arc<LineBuffer>, Captured) {
        let out = Captured::default();
        (LineBuffer::new(Box::new(out.clone()), Duration::MAX), out)
    }

    #[test]
    fn info_lines_wait_for_a_flush_and_go_out_in_one_write() {
        let (buffer, out) = unattended();
        for i in 0..100 {
            buffer.push(format!("line {i}\n").as_bytes(), false);
        }
        assert_eq!(out.writes(), 0, "nothing is written per line");
        buffer.flush();
        assert_eq!(out.writes(), 1);
        assert_eq!(out.text().lines().count(), 100);
        buffer.flush();
        assert_eq!(out.writes(), 1, "an empty buffer writes nothing");
    }

    #[test]
    fn a_warning_is_written_at_once_with_the_lines_before_it() {
        let (buffer, out) = unattended();
        buffer.push(b"info\n", false);
        buffer.push(b"warn\n", true);
        assert_eq!(out.text(), "info\nwarn\n");
    }

    #[test]
    fn the_writer_thread_writes_after_the_interval() {
        let out = Captured::default();
        let buffer = LineBuffer::new(Box::new(out.clone()), Duration::from_millis(20));
        LineBuffer::spawn_writer(&buffer).unwrap();
        buffer.push(b"first\n", false);
        eventually("the first line", || out.text() == "first\n");
        // Again, after the writer went idle.
        buffer.push(b"second\n", false);
        eventually("the second line", || out.text() == "first\nsecond\n");
    }

    #[test]
    fn a_full_buffer_is_written_without_waiting_for_the_interval() {
        let out = Captured::default();
        let buffer = LineBuffer::new(Box::new(out.clone()), Duration::from_secs(3600));
        LineBuffer::spawn_writer(&buffer).unwrap();
        let line = [b'x'; 99]
            .iter()
            .copied()
            .chain([b'\n'])
            .collect::<Vec<u8>>();
        for _ in 0..FLUSH_BYTES / line.len() + 1 {
            buffer.push(&line, false);
        }
        eventually("a write", || out.writes() > 0);
    }

    #[test]
    fn lines_from_many_threads_are_never_split_or_mixed() {
        let out = Captured::default();
        let buffer = LineBuffer::new(Box::new(out.clone()), Duration::from_millis(1));
        LineBuffer::spawn_writer(&buffer).unwrap();
        std::thread::scope(|s| {
            for t in 0..4 {
                let buffer = &buffer;
                s.spawn(move || {
                    for i in 0..2000 {
                        let line = format!("{t}:{i}:{}\n", "y".repeat(i % 300));
                        buffer.push(line.as_bytes(), i % 500 == 0);
                    }
                });
            }
        });
        buffer.flush();
        let text = out.text();
        let mut next = [0usize; 4];
        for line in text.lines() {
            let mut parts = line.split(':');
            let t: usize = parts.next().unwrap().parse().unwrap();
            let i: usize = parts.next().unwrap().parse().unwrap();
            assert_eq!(parts.next().unwrap(), "y".repeat(i % 300), "{line}");
            assert_eq!(i, next[t], "each thread's lines in order");
            next[t] += 1;
        }
        assert_eq!(next, [2000; 4]);
    }

    #[test]
    fn span_fields_are_flattened_into_each_event_line() {
        let (buffer, out) = unattended();
        let subscriber = tracing_subscriber::registry().with(JsonLayer {
            out: buffer.clone(),
        });
        tracing::subscriber::with_default(subscriber, || {
            let outer = tracing::info_span!("request", request_id = "req-1", trace_id = "t-1");
            let _o = outer.enter();
            let inner = tracing::info_span!("upstream", request_id = tracing::field::Empty);
            let _i = inner.enter();
            inner.record("request_id", "req-2");
            tracing::warn!(attempt = 2, "retrying");
        });
        let text = out.text();
        let v: Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(v["message"], "retrying");
        assert_eq!(v["level"], "WARN");
        assert_eq!(v["attempt"], 2);
        assert_eq!(v["trace_id"], "t-1");
        assert_eq!(v["request_id"], "req-2", "the innermost span wins");
    }

    #[test]
    fn access_lines_keep_every_field_kind() {
        let (buffer, out) = unattended();
        let subscriber = tracing_subscriber::registry().with(JsonLayer {
            out: buffer.clone(),
        });
        let error = std::io::Error::other("peer said \"no\"");
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(
                target: "isthmus::access",
                request_id = "r",
                status = 502u16,
                attempts = 2usize,
                duration_ms = 1.5,
                retried = true,
                upstream = Some(tracing::field::display("10.0.0.1:80")),
                missing = None::<&str>,
                error = %error,
                "request"
            );
        });
        assert_eq!(out.writes(), 0, "INFO waits for the flush");
        buffer.flush();
        let v: Value = serde_json::from_str(out.text().trim()).unwrap();
        assert_eq!(v["target"], "isthmus::access");
        assert_eq!(v["status"], 502);
        assert_eq!(v["attempts"], 2);
        assert_eq!(v["duration_ms"], 1.5);
        assert_eq!(v["retried"], true);
        assert_eq!(v["upstream"], "10.0.0.1:80");
        assert_eq!(v["error"], "peer said \"no\"");
        assert!(v.get("missing").is_none());
    }

    #[test]
    fn sampling_keeps_its_share_by_request_id_and_every_failure() {
        let ids: Vec<String> = (0..100_000).map(|i| format!("{i:032x}")).collect();
        for ppm in [1_000, 100_000, 500_000] {
            let kept = ids
                .iter()
                .filter(|id| access_sampled(id, ppm, false))
                .count();
            let expected = ids.len() * ppm as usize / PPM as usize;
            assert!(
                kept.abs_diff(expected) <= expected / 10 + 10,
                "{ppm} ppm kept {kept}, expected about {expected}"
            );
        }
        // The same id, the same choice: on every gateway, every time.
        for id in &ids[..1000] {
            assert_eq!(
                access_sampled(id, 100_000, false),
                access_sampled(id, 100_000, false)
            );
        }
        assert!(ids.iter().all(|id| access_sampled(id, PPM, false)));
        assert!(!ids.iter().any(|id| access_sampled(id, 0, false)));
        assert!(
            ids.iter().all(|id| access_sampled(id, 0, true)),
            "failures always"
        );
        assert!(access_sampled("", 0, true));
    }

    #[test]
    fn text_lines_are_buffered_and_warnings_written_at_once() {
        let (buffer, out) = unattended();
        let layer = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(Buffered(buffer.clone()));
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(target: "isthmus::access", status = 200, "request");
            assert_eq!(out.writes(), 0, "INFO waits for the flush");
            tracing::warn!("trouble");
        });
        assert_eq!(out.writes(), 1, "the warning took the line before it along");
        let text = out.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].contains("isthmus::access") && lines[0].contains("status=200"));
        assert!(lines[1].contains("WARN") && lines[1].contains("trouble"));
    }
}
