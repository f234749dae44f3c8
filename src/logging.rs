//! Log output: text or JSON on stderr, every field value cut to [`MAX_FIELD_CHARS`]
//! characters, colour only when stderr is a terminal.
//!
//! Why cut: sqlx logs the statement it runs (and warns about a slow one) with the whole
//! statement text, which for a catalog query over thousands of tables is megabytes per
//! line. A few hundred characters say which statement it was; the rest is noise that
//! fills disks and log pipelines. Cutting happens here, in one place, for every field of
//! every event, whoever logs it.

use std::fmt;
use std::io::IsTerminal;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::field::MakeExt;
use tracing_subscriber::fmt::format::{debug_fn, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// The longest field value a log line carries, in characters.
pub(crate) const MAX_FIELD_CHARS: usize = 300;

/// `text` cut to [`MAX_FIELD_CHARS`] characters (on a character boundary), with how much
/// was left out.
pub(crate) fn cut(text: &str) -> std::borrow::Cow<'_, str> {
    match text.char_indices().nth(MAX_FIELD_CHARS) {
        None => std::borrow::Cow::Borrowed(text),
        Some((end, _)) => std::borrow::Cow::Owned(format!(
            "{}… ({} more bytes)",
            &text[..end],
            text.len() - end
        )),
    }
}

/// sqlx logs every PostgreSQL NOTICE at INFO under this target ("relation … already exists,
/// skipping" from each `IF NOT EXISTS`): chatter for an operator's log, so they are kept to
/// debugging.
pub(crate) const NOTICE_TARGET: &str = "sqlx::postgres::notice";

/// The log filter: `rust_log` (`RUST_LOG`) when set and valid, else `default`; PostgreSQL
/// NOTICEs (and INFO/LOG messages) are left out unless the filter asks for debug or trace
/// output or names the notice target itself. WARNINGs and errors always pass.
pub fn filter(rust_log: Option<&str>, default: &str) -> EnvFilter {
    let spec = rust_log
        .filter(|s| !s.trim().is_empty() && EnvFilter::try_new(s).is_ok())
        .unwrap_or(default);
    let debugging = spec.contains(NOTICE_TARGET)
        || spec
            .split(',')
            .any(|d| matches!(d.trim().rsplit('=').next(), Some("debug" | "trace")));
    let filter = EnvFilter::new(spec);
    if debugging {
        return filter;
    }
    match format!("{NOTICE_TARGET}=warn").parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    }
}

/// Installs the global subscriber: `filter` (from `RUST_LOG` or the default), text or JSON.
pub fn init(json: bool, filter: EnvFilter) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Escape codes only for a person at a terminal, never into a file or a pipe.
        .with_ansi(std::io::stderr().is_terminal());
    if json {
        builder.event_format(JsonLine).init();
    } else {
        builder
            .fmt_fields(
                debug_fn(|writer, field, value| {
                    let text = format!("{value:?}");
                    if field.name() == "message" {
                        write!(writer, "{}", cut(&text))
                    } else {
                        write!(writer, "{}={}", field.name(), cut(&text))
                    }
                })
                .delimited(" "),
            )
            .init();
    }
}

/// One JSON object per event: `timestamp`, `level`, `target`, `fields` (each cut), and
/// `spans` (names of the enclosing spans, outermost first).
pub(crate) struct JsonLine;

struct JsonFields(serde_json::Map<String, serde_json::Value>);

impl JsonFields {
    fn put(&mut self, field: &Field, value: serde_json::Value) {
        self.0.insert(field.name().to_string(), value);
    }
}

impl Visit for JsonFields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, cut(&format!("{value:?}")).into_owned().into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, cut(value).into_owned().into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }
}

impl<S, N> FormatEvent<S, N> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut fields = JsonFields(serde_json::Map::new());
        event.record(&mut fields);
        let spans: Vec<&str> = ctx
            .event_scope()
            .map(|scope| scope.from_root().map(|s| s.name()).collect())
            .unwrap_or_default();
        let meta = event.metadata();
        let line = serde_json::json!({
            "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            "level": meta.level().as_str(),
            "target": meta.target(),
            "fields": fields.0,
            "spans": spans,
        });
        writeln!(writer, "{line}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_are_for_debugging_only() {
        let shown = |rust_log: Option<&str>, default: &str| {
            let f = filter(rust_log, default).to_string();
            !f.contains("sqlx::postgres::notice=warn")
        };
        assert!(!shown(None, "info"));
        assert!(!shown(None, "warn"));
        assert!(!shown(Some("info,dbpolicy=info"), "warn"));
        assert!(!shown(Some("not a filter=="), "info"));
        assert!(shown(Some("debug"), "info"));
        assert!(shown(Some("info,sqlx=debug"), "info"));
        assert!(shown(Some("sqlx::postgres::notice=info"), "info"));
        assert_eq!(
            filter(Some("info"), "warn").to_string(),
            "sqlx::postgres::notice=warn,info"
        );
    }

    #[test]
    fn long_values_are_cut_on_a_character_boundary() {
        assert_eq!(cut("short"), "short");
        let long = "é".repeat(1_000);
        let c = cut(&long);
        assert!(c.starts_with(&"é".repeat(MAX_FIELD_CHARS)));
        assert!(c.ends_with(&format!("… ({} more bytes)", 2 * (1_000 - MAX_FIELD_CHARS))));
        assert!(c.chars().count() < MAX_FIELD_CHARS + 30);
    }
}
