//! nginx access-log lines: a [`LogFormat`] is compiled once from an nginx
//! `log_format` string into a sequence of literal and variable matchers; each
//! line is then matched against it (a variable runs up to the next literal,
//! with bounded backtracking) to get `$remote_addr`, `$remote_port`, the
//! time the line was written and, when the format has it, `$request_time`
//! (how long the request took, so the line covers an interval). Lines are untrusted input: any bytes give a value or an
//! error, never a panic (fuzzed).
//!
//! The default format is nginx's `combined` with ` $remote_port` appended
//! ([`DEFAULT_LOG_FORMAT`]): `combined` alone cannot be resolved, because a
//! node address without the port is shared by every pod on the node.

use std::net::IpAddr;

use crate::api;

/// nginx's predefined `combined` format.
pub const COMBINED: &str = r#"$remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent "$http_referer" "$http_user_agent""#;

/// The format assumed when none is given: `combined` followed by
/// ` $remote_port`, which is what operators add to nginx's `combined`:
///
/// ```text
/// log_format ctw '$remote_addr - $remote_user [$time_local] "$request" '
///                '$status $body_bytes_sent "$http_referer" "$http_user_agent" $remote_port';
/// ```
pub const DEFAULT_LOG_FORMAT: &str = concat!(
    r#"$remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent "$http_referer" "$http_user_agent""#,
    " $remote_port"
);

/// Longer lines are reported as unparsed.
pub const MAX_LINE_BYTES: usize = 16 * 1024;
/// Matching steps (pieces tried plus bytes scanned) per line before giving
/// up: bounds backtracking, so a hostile line costs at most about 1 ms.
const STEP_BUDGET: u32 = 200_000;

/// Why a `log_format` cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("log format is empty")]
    Empty,
    #[error("bad variable at column {column}: {message}")]
    BadVariable { column: usize, message: String },
    #[error("variables ${0} and ${1} have no text between them, so a line cannot be split")]
    Adjacent(String, String),
    #[error("log format has no {0}: it is needed to find the connection")]
    Missing(&'static str),
    #[error("bad log_format directive: {0}")]
    Directive(String),
}

/// A line that does not match the format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct LineError(pub String);

/// What a variable gives the resolver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Addr,
    Port,
    Msec,
    TimeLocal,
    TimeIso,
    /// `$request_time`: seconds with a millisecond fraction (`0.005`).
    RequestTime,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Lit(String),
    Var {
        name: String,
        field: Field,
        /// Between double quotes: `\"` inside does not end it.
        quoted: bool,
    },
}

/// The time variable a format carries, best resolution first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeVar {
    /// `$msec`: Unix seconds with milliseconds.
    Msec,
    /// `$time_iso8601`: RFC 3339, seconds.
    TimeIso8601,
    /// `$time_local`: `09/Dec/2024:15:05:00 +0800`, seconds.
    TimeLocal,
}

/// A compiled nginx `log_format`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogFormat {
    source: String,
    pieces: Vec<Piece>,
    time: Option<TimeVar>,
    request_time: bool,
}

/// What one line gives: the connection's SNAT address and port as the server
/// saw them, and when (ns since the epoch, with the resolution written).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParsedLine {
    pub remote_addr: IpAddr,
    pub remote_port: u16,
    pub time_ns: Option<u64>,
    pub precision_ns: u64,
    /// `$request_time` in ns, when the format has it: nginx writes the line
    /// when the request ends (`$msec`, `$time_local`), and the request ran
    /// for this long before, so the connection was alive somewhere in
    /// `[time - request_time, time + precision)`.
    pub request_time_ns: Option<u64>,
}

impl LogFormat {
    /// Compile a format. Accepts a bare format string (`$remote_addr ...`),
    /// a name (`combined` alone is refused: it has no `$remote_port`),
    /// `combined` followed by more variables (`combined $remote_port`), or a
    /// whole `log_format NAME 'part' 'part';` directive pasted from nginx.conf.
    pub fn compile(format: &str) -> Result<LogFormat, FormatError> {
        let trimmed = format.trim();
        let source = if trimmed.starts_with("log_format")
            && trimmed[10..].starts_with(char::is_whitespace)
        {
            directive_format(trimmed)?
        } else if trimmed == "combined" {
            return Err(FormatError::Missing(
                "$remote_port (nginx's combined has none; add it: \"combined $remote_port\", the default)",
            ));
        } else if let Some(rest) = trimmed.strip_prefix("combined ") {
            format!("{COMBINED} {}", rest.trim_start())
        } else {
            trimmed.to_string()
        };
        if source.is_empty() {
            return Err(FormatError::Empty);
        }
        let mut pieces = tokenize(&source)?;
        let time = assign_fields(&mut pieces)?;
        let request_time = pieces.iter().any(|p| {
            matches!(
                p,
                Piece::Var {
                    field: Field::RequestTime,
                    ..
                }
            )
        });
        Ok(LogFormat {
            source,
            pieces,
            time,
            request_time,
        })
    }

    /// The format string after expansion of names and directives.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The time variable the lines carry, if any.
    pub fn time_var(&self) -> Option<TimeVar> {
        self.time
    }

    /// Does the format carry `$request_time` (see [`ParsedLine::request_time_ns`])?
    pub fn has_request_time(&self) -> bool {
        self.request_time
    }

    /// The reason a line failed at `piece`, in the user's terms: when the
    /// line matched part of the format and then ended or went another way
    /// before variables the resolver needs, say which are missing and that
    /// nginx's `log_format` must write them, then the matcher's detail.
    fn explain(&self, piece: usize, detail: String) -> String {
        if piece == 0 || piece == usize::MAX {
            return detail;
        }
        let missing: Vec<&str> = self
            .pieces
            .iter()
            .skip(piece + 1)
            .filter_map(|p| match p {
                Piece::Var { name, field, .. } if *field != Field::Other => Some(name.as_str()),
                _ => None,
            })
            .collect();
        if missing.is_empty() {
            return detail;
        }
        let vars = missing
            .iter()
            .map(|n| format!("${n}"))
            .collect::<Vec<_>>()
            .join(", ");
        let hint = if missing.contains(&"remote_port") {
            " (the resolver needs $remote_port: add it to nginx's log_format, e.g. at the end of \
             `combined`, which is the default format here)"
        } else {
            ""
        };
        format!(
            "the line has no {vars} where the log format expects it: was it written with another \
             log_format? Give the format the lines were written with{hint}. Detail: {detail}"
        )
    }

    /// Split one line (a trailing `\r`/`\n` is ignored). Never panics.
    pub fn parse_line(&self, line: &str) -> Result<ParsedLine, LineError> {
        let line = line.trim_end_matches(['\r', '\n']);
        if line.trim().is_empty() {
            return Err(LineError("empty line".into()));
        }
        if line.len() > MAX_LINE_BYTES {
            return Err(LineError(format!(
                "line longer than {MAX_LINE_BYTES} bytes"
            )));
        }
        let mut m = Matcher {
            pieces: &self.pieces,
            line,
            spans: vec![(0, 0); self.pieces.len()],
            budget: STEP_BUDGET,
            fail: None,
        };
        if !m.run(0, 0) {
            let msg = match m.fail {
                Some((piece, _, msg)) => self.explain(piece, msg),
                None => "line does not match the log format".into(),
            };
            return Err(LineError(msg));
        }
        let mut out = ParsedLine {
            remote_addr: IpAddr::from([0, 0, 0, 0]),
            remote_port: 0,
            time_ns: None,
            precision_ns: 0,
            request_time_ns: None,
        };
        for (p, &(a, b)) in self.pieces.iter().zip(&m.spans) {
            let Piece::Var { field, name, .. } = p else {
                continue;
            };
            let v = line.get(a..b).unwrap_or_default();
            match field {
                Field::Addr => {
                    out.remote_addr =
                        parse_addr(v).ok_or_else(|| bad_value(name, v, "an IP address"))?
                }
                Field::Port => {
                    out.remote_port = parse_port(v).ok_or_else(|| bad_value(name, v, "a port"))?
                }
                Field::Msec | Field::TimeLocal | Field::TimeIso => {
                    let (t, prec) =
                        parse_time_field(*field, v).ok_or_else(|| bad_value(name, v, "a time"))?;
                    out.time_ns = Some(t);
                    out.precision_ns = prec;
                }
                Field::RequestTime => {
                    out.request_time_ns = Some(
                        parse_request_time(v).ok_or_else(|| bad_value(name, v, "a duration"))?,
                    )
                }
                Field::Other => {}
            }
        }
        Ok(out)
    }
}

/// `log_format NAME [escape=..] 'part' "part" ...;` -> the concatenated parts.
fn directive_format(d: &str) -> Result<String, FormatError> {
    let body = d.trim_end().trim_end_matches(';');
    let mut rest = body["log_format".len()..].trim_start();
    // The format's name.
    let name_end = rest.find(char::is_whitespace).unwrap_or(rest.len());
    if name_end == 0 {
        return Err(FormatError::Directive("no name".into()));
    }
    rest = rest[name_end..].trim_start();
    if let Some(r) = rest.strip_prefix("escape=") {
        let end = r.find(char::is_whitespace).unwrap_or(r.len());
        rest = r[end..].trim_start();
    }
    let mut out = String::new();
    while !rest.is_empty() {
        let mut chars = rest.char_indices();
        let (q, end) = match chars.next() {
            Some((_, q @ ('\'' | '"'))) => {
                let mut end = None;
                let mut escaped = false;
                for (i, c) in chars {
                    if escaped {
                        escaped = false;
                    } else if c == '\\' {
                        escaped = true;
                    } else if c == q {
                        end = Some(i);
                        break;
                    }
                }
                (
                    q,
                    end.ok_or_else(|| {
                        FormatError::Directive(format!("unterminated {q}-quoted string"))
                    })?,
                )
            }
            _ => {
                // An unquoted part runs to the next whitespace.
                let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
                out.push_str(&rest[..end]);
                rest = rest[end..].trim_start();
                continue;
            }
        };
        let part = &rest[1..end];
        let esc = format!("\\{q}");
        out.push_str(&part.replace(&esc, &q.to_string()));
        rest = rest[end + 1..].trim_start();
    }
    if out.is_empty() {
        return Err(FormatError::Directive("no format string".into()));
    }
    Ok(out)
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// `$name`, `${name}` and literal text.
fn tokenize(src: &str) -> Result<Vec<Piece>, FormatError> {
    let mut pieces = Vec::new();
    let mut lit = String::new();
    let mut i = 0;
    while i < src.len() {
        let rest = &src[i..];
        let Some(after) = rest.strip_prefix('$') else {
            let c = rest.chars().next().unwrap_or('\0');
            lit.push(c);
            i += c.len_utf8().max(1);
            continue;
        };
        let (name, used) = if let Some(braced) = after.strip_prefix('{') {
            let end = braced.find('}').ok_or_else(|| FormatError::BadVariable {
                column: i + 1,
                message: "missing }".into(),
            })?;
            (&braced[..end], end + 3)
        } else {
            let end = after
                .find(|c: char| !is_name_char(c))
                .unwrap_or(after.len());
            (&after[..end], end + 1)
        };
        if name.is_empty() || !name.chars().all(is_name_char) {
            return Err(FormatError::BadVariable {
                column: i + 1,
                message: format!("{:?} is not a variable name", name),
            });
        }
        if !lit.is_empty() {
            pieces.push(Piece::Lit(std::mem::take(&mut lit)));
        }
        if let Some(Piece::Var { name: prev, .. }) = pieces.last() {
            return Err(FormatError::Adjacent(prev.clone(), name.to_string()));
        }
        pieces.push(Piece::Var {
            name: name.to_string(),
            field: Field::Other,
            quoted: false,
        });
        i += used;
    }
    if !lit.is_empty() {
        pieces.push(Piece::Lit(lit));
    }
    Ok(pieces)
}

/// Mark the variables the resolver reads (the connection's address wins over
/// `$remote_addr`: `$realip_remote_addr` is the peer when the realip module
/// rewrote `$remote_addr`) and the quoted ones.
fn assign_fields(pieces: &mut [Piece]) -> Result<Option<TimeVar>, FormatError> {
    let find = |pieces: &[Piece], names: &[&str]| {
        names.iter().find_map(|want| {
            pieces
                .iter()
                .position(|p| matches!(p, Piece::Var { name, .. } if name == want))
        })
    };
    let addr = find(pieces, &["realip_remote_addr", "remote_addr"])
        .ok_or(FormatError::Missing("$remote_addr"))?;
    let port = find(pieces, &["realip_remote_port", "remote_port"])
        .ok_or(FormatError::Missing("$remote_port"))?;
    let time = [
        ("msec", Field::Msec, TimeVar::Msec),
        ("time_iso8601", Field::TimeIso, TimeVar::TimeIso8601),
        ("time_local", Field::TimeLocal, TimeVar::TimeLocal),
    ]
    .into_iter()
    .find_map(|(n, f, t)| find(pieces, &[n]).map(|i| (i, f, t)));
    let request_time = find(pieces, &["request_time"]);
    let quoted: Vec<bool> = (0..pieces.len())
        .map(|i| {
            let before = i.checked_sub(1).and_then(|j| pieces.get(j));
            let after = pieces.get(i + 1);
            matches!(before, Some(Piece::Lit(l)) if l.ends_with('"'))
                && matches!(after, Some(Piece::Lit(l)) if l.starts_with('"'))
        })
        .collect();
    for (i, p) in pieces.iter_mut().enumerate() {
        if let Piece::Var {
            field, quoted: q, ..
        } = p
        {
            *q = quoted[i];
            *field = if i == addr {
                Field::Addr
            } else if i == port {
                Field::Port
            } else {
                match time {
                    Some((t, f, _)) if t == i => f,
                    _ if request_time == Some(i) => Field::RequestTime,
                    _ => Field::Other,
                }
            };
        }
    }
    Ok(time.map(|(_, _, t)| t))
}

fn bad_value(name: &str, v: &str, what: &str) -> LineError {
    let shown: String = v.chars().take(64).collect();
    LineError(format!("${name}: {shown:?} is not {what}"))
}

/// An address as nginx writes `$remote_addr` (IPv4-mapped IPv6 becomes IPv4;
/// brackets are accepted).
fn parse_addr(v: &str) -> Option<IpAddr> {
    let v = v
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .unwrap_or(v);
    let ip: IpAddr = v.parse().ok()?;
    Some(match ip {
        IpAddr::V6(a) => a.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    })
}

fn parse_port(v: &str) -> Option<u16> {
    if v.is_empty() || v.len() > 5 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok().filter(|p| *p > 0)
}

/// Longest `$request_time` accepted: a day (nginx's own timeouts are far
/// shorter; a larger value is a misparsed field).
const MAX_REQUEST_TIME_NS: u64 = 86_400 * 1_000_000_000;

/// `$request_time` (`0.005`, `12.345`, `3`) in ns.
fn parse_request_time(v: &str) -> Option<u64> {
    let (int, frac) = v.split_once('.').unwrap_or((v, ""));
    if int.is_empty()
        || int.len() > 6
        || frac.len() > 9
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let mut ns = int.parse::<u64>().ok()? * 1_000_000_000;
    for (i, d) in frac.bytes().enumerate() {
        ns += u64::from(d - b'0') * 10u64.pow(8 - i as u32);
    }
    (ns <= MAX_REQUEST_TIME_NS).then_some(ns)
}

/// A time field as (ns since the epoch, resolution in ns).
fn parse_time_field(f: Field, v: &str) -> Option<(u64, u64)> {
    match f {
        Field::Msec => {
            if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
                return None;
            }
            Some((api::parse_time(v).ok()?, api::time_precision_ns(v)))
        }
        Field::TimeIso => {
            if !v.contains('T') {
                return None;
            }
            Some((api::parse_time(v).ok()?, api::time_precision_ns(v)))
        }
        Field::TimeLocal => {
            // `09/Dec/2024:15:05:00 +0800`: the one time parser (api), for
            // this shape only.
            if !v.contains('/') || v.contains('[') {
                return None;
            }
            Some((api::parse_time(v).ok()?, 1_000_000_000))
        }
        Field::Addr | Field::Port | Field::RequestTime | Field::Other => None,
    }
}

/// Does the value of a key variable parse? Lets backtracking pick the split
/// under which the fields the resolver needs make sense.
fn value_ok(f: Field, v: &str) -> Result<(), &'static str> {
    match f {
        Field::Addr => parse_addr(v).map(|_| ()).ok_or("an IP address"),
        Field::Port => parse_port(v).map(|_| ()).ok_or("a port"),
        Field::Msec | Field::TimeLocal | Field::TimeIso => {
            parse_time_field(f, v).map(|_| ()).ok_or("a time")
        }
        Field::RequestTime => parse_request_time(v).map(|_| ()).ok_or("a duration"),
        Field::Other => Ok(()),
    }
}

struct Matcher<'a> {
    pieces: &'a [Piece],
    line: &'a str,
    spans: Vec<(usize, usize)>,
    budget: u32,
    /// Deepest failure: (piece, position, message).
    fail: Option<(usize, usize, String)>,
}

impl Matcher<'_> {
    fn failed(&mut self, piece: usize, pos: usize, msg: impl FnOnce() -> String) {
        let deeper = self
            .fail
            .as_ref()
            .is_none_or(|(p, at, _)| (piece, pos) > (*p, *at));
        if deeper {
            self.fail = Some((piece, pos, msg()));
        }
    }

    fn var_name(&self, i: usize) -> Option<&str> {
        match self.pieces.get(i) {
            Some(Piece::Var { name, .. }) => Some(name),
            _ => None,
        }
    }

    /// Match pieces `i..` against the line from byte `pos`.
    fn run(&mut self, i: usize, pos: usize) -> bool {
        if self.budget == 0 {
            self.failed(usize::MAX, 0, || {
                "line too irregular to match the log format".into()
            });
            return false;
        }
        self.budget -= 1;
        let line = self.line;
        let Some(piece) = self.pieces.get(i) else {
            if pos == line.len() {
                return true;
            }
            let extra: String = line[pos..].chars().take(32).collect();
            self.failed(i, pos, || {
                format!("unexpected text at column {}: {extra:?}", pos + 1)
            });
            return false;
        };
        match piece {
            Piece::Lit(l) => {
                if line.as_bytes()[pos..].starts_with(l.as_bytes()) {
                    return self.run(i + 1, pos + l.len());
                }
                let after = i
                    .checked_sub(1)
                    .and_then(|j| self.var_name(j))
                    .map(|n| format!(" after ${n}"))
                    .unwrap_or_default();
                let found: String = line
                    .get(pos..)
                    .unwrap_or_default()
                    .chars()
                    .take(16)
                    .collect();
                self.failed(i, pos, || {
                    format!(
                        "expected {l:?}{after} at column {}, found {found:?}",
                        pos + 1
                    )
                });
                false
            }
            Piece::Var {
                name,
                field,
                quoted,
            } => {
                let (field, quoted) = (*field, *quoted);
                let next = match self.pieces.get(i + 1) {
                    Some(Piece::Lit(l)) => Some(l.as_bytes()),
                    _ => None,
                };
                let Some(next) = next else {
                    // Last piece: the rest of the line.
                    let v = &line[pos..];
                    if let Err(what) = value_ok(field, v) {
                        let shown: String = v.chars().take(64).collect();
                        self.failed(i, pos, || format!("${name}: {shown:?} is not {what}"));
                        return false;
                    }
                    self.spans[i] = (pos, line.len());
                    return self.run(i + 1, line.len());
                };
                let bytes = line.as_bytes();
                let mut e = pos;
                while e < bytes.len() {
                    if self.budget == 0 {
                        self.failed(usize::MAX, 0, || {
                            "line too irregular to match the log format".into()
                        });
                        return false;
                    }
                    self.budget -= 1;
                    if quoted && bytes[e] == b'\\' {
                        e += 2;
                        continue;
                    }
                    if bytes[e..].starts_with(next) {
                        if let Some(v) = line.get(pos..e) {
                            match value_ok(field, v) {
                                Ok(()) => {
                                    self.spans[i] = (pos, e);
                                    if self.run(i + 1, e) {
                                        return true;
                                    }
                                    if self.budget == 0 {
                                        return false;
                                    }
                                }
                                Err(what) => {
                                    let shown: String = v.chars().take(64).collect();
                                    self.failed(i, pos, || {
                                        format!("${name}: {shown:?} is not {what}")
                                    });
                                }
                            }
                        }
                    }
                    e += 1;
                }
                let after = i.checked_sub(1).and_then(|j| match self.pieces.get(j) {
                    Some(Piece::Lit(l)) => Some(l.clone()),
                    _ => None,
                });
                let next_s = String::from_utf8_lossy(next).into_owned();
                self.failed(i, pos, || match after {
                    Some(_) => format!("no {next_s:?} after ${name} (from column {})", pos + 1),
                    None => format!("no {next_s:?} after ${name}"),
                });
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn fmt(f: &str) -> LogFormat {
        LogFormat::compile(f).unwrap()
    }

    #[test]
    fn default_format_is_combined_plus_port() {
        let f = fmt(DEFAULT_LOG_FORMAT);
        assert_eq!(f.time_var(), Some(TimeVar::TimeLocal));
        let line = r#"198.19.0.1 - - [09/Dec/2024:15:05:00 +0800] "GET /x?a=b HTTP/1.1" 200 3 "-" "curl/8.5.0" 45000"#;
        let p = f.parse_line(line).unwrap();
        assert_eq!(p.remote_addr, "198.19.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(p.remote_port, 45000);
        assert_eq!(p.time_ns, Some(1_733_727_900_000_000_000));
        assert_eq!(p.precision_ns, 1_000_000_000);
        // A trailing newline or CR is fine.
        assert_eq!(f.parse_line(&format!("{line}\r\n")).unwrap(), p);
        // The same as "combined $remote_port" and as a pasted directive.
        assert_eq!(fmt("combined $remote_port").pieces, f.pieces);
        let directive = r#"log_format ctw '$remote_addr - $remote_user [$time_local] "$request" '
            '$status $body_bytes_sent "$http_referer" "$http_user_agent" $remote_port';"#;
        assert_eq!(fmt(directive).pieces, f.pieces);
    }

    #[test]
    fn formats_without_address_port_or_with_bad_variables_are_refused() {
        assert!(
            matches!(LogFormat::compile("combined"), Err(FormatError::Missing(m)) if m.contains("remote_port"))
        );
        assert_eq!(
            LogFormat::compile(COMBINED),
            Err(FormatError::Missing("$remote_port"))
        );
        assert_eq!(
            LogFormat::compile("$remote_port $msec"),
            Err(FormatError::Missing("$remote_addr"))
        );
        assert_eq!(LogFormat::compile("  "), Err(FormatError::Empty));
        assert_eq!(
            LogFormat::compile("$remote_addr$remote_port"),
            Err(FormatError::Adjacent(
                "remote_addr".into(),
                "remote_port".into()
            ))
        );
        assert!(matches!(
            LogFormat::compile("$remote_addr ${remote_port"),
            Err(FormatError::BadVariable { .. })
        ));
        assert!(matches!(
            LogFormat::compile("$remote_addr $ $remote_port"),
            Err(FormatError::BadVariable { .. })
        ));
        assert!(matches!(
            LogFormat::compile("log_format x '$remote_addr"),
            Err(FormatError::Directive(_))
        ));
        // No time variable is allowed (the request then gives `at`).
        assert_eq!(fmt("$remote_addr:$remote_port").time_var(), None);
    }

    #[test]
    fn msec_iso8601_and_braced_variables() {
        let f = fmt("$remote_addr $remote_port $msec $server_port");
        assert_eq!(f.time_var(), Some(TimeVar::Msec));
        let p = f.parse_line("198.19.0.1 45000 1733727900.123 80").unwrap();
        assert_eq!(p.remote_port, 45000);
        assert_eq!(p.time_ns, Some(1_733_727_900_123_000_000));
        assert_eq!(p.precision_ns, 1_000_000);

        let f = fmt("${remote_addr}:${remote_port}|$time_iso8601|${status}ms");
        assert_eq!(f.time_var(), Some(TimeVar::TimeIso8601));
        let p = f
            .parse_line("10.1.2.3:1234|2024-12-09T15:05:00+08:00|200ms")
            .unwrap();
        assert_eq!(p.remote_addr, "10.1.2.3".parse::<IpAddr>().unwrap());
        assert_eq!(p.remote_port, 1234);
        assert_eq!(p.time_ns, Some(1_733_727_900_000_000_000));
        assert_eq!(p.precision_ns, 1_000_000_000);

        // $msec wins over $time_local when both are there.
        let f = fmt("[$time_local] $msec $remote_addr $remote_port");
        assert_eq!(f.time_var(), Some(TimeVar::Msec));
        let p = f
            .parse_line("[09/Dec/2024:15:05:00 +0800] 1733727900.500 1.2.3.4 9")
            .unwrap();
        assert_eq!(p.time_ns, Some(1_733_727_900_500_000_000));

        // The realip module's peer address is the connection's.
        let f = fmt("$remote_addr $realip_remote_addr $realip_remote_port $remote_port $msec");
        let p = f
            .parse_line("203.0.113.9 198.19.0.1 40000 1 1733727900.000")
            .unwrap();
        assert_eq!(p.remote_addr, "198.19.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(p.remote_port, 40000);
    }

    #[test]
    fn request_time_makes_the_line_an_interval() {
        let f = fmt("$remote_addr $remote_port $msec $request_time \"$http_x_pod\"");
        assert!(f.has_request_time());
        let p = f
            .parse_line("198.19.0.1 45000 1733727900.500 2.250 \"pod-a\"")
            .unwrap();
        assert_eq!(p.time_ns, Some(1_733_727_900_500_000_000));
        assert_eq!(p.request_time_ns, Some(2_250_000_000));
        let p = f
            .parse_line("198.19.0.1 45000 1733727900.500 0.000 \"-\"")
            .unwrap();
        assert_eq!(p.request_time_ns, Some(0));
        let e = f
            .parse_line("198.19.0.1 45000 1733727900.500 soon \"-\"")
            .unwrap_err();
        assert!(e.0.contains("$request_time"), "{e}");
        assert!(f
            .parse_line("198.19.0.1 45000 1733727900.500 99999999.0 \"-\"")
            .is_err());
        // Without it, no interval.
        let f = fmt(DEFAULT_LOG_FORMAT);
        assert!(!f.has_request_time());
        assert_eq!(
            fmt("combined $remote_port $request_time")
                .parse_line(r#"198.19.0.1 - - [09/Dec/2024:15:05:00 +0800] "GET / HTTP/1.1" 200 3 "-" "curl" 45000 0.125"#)
                .unwrap()
                .request_time_ns,
            Some(125_000_000)
        );
    }

    #[test]
    fn quoted_fields_with_spaces_and_escaped_quotes() {
        let f = fmt(DEFAULT_LOG_FORMAT);
        let line = r#"198.19.0.1 - alice [09/Dec/2024:15:05:00 +0000] "GET /a b HTTP/1.1" 404 0 "http://x/?q=\"1\" 2" "Mozilla/5.0 (X11; Linux x86_64) \"quoted\" \x22hex\x22" 51234"#;
        let p = f.parse_line(line).unwrap();
        assert_eq!(p.remote_port, 51234);
        assert_eq!(
            p.time_ns,
            Some(1_733_727_900_000_000_000 + 8 * 3600 * 1_000_000_000)
        );
        // An unescaped `" ` inside a value: backtracking still finds the split.
        let line = r#"198.19.0.1 - - [09/Dec/2024:15:05:00 +0800] "GET / HTTP/1.1" 200 3 "-" "evil" agent" 45001"#;
        assert_eq!(f.parse_line(line).unwrap().remote_port, 45001);
        // Non-ASCII text.
        let line = "198.19.0.1 - - [09/Dec/2024:15:05:00 +0800] \"GET /é HTTP/1.1\" 200 3 \"-\" \"ü ñ 日本\" 45002";
        assert_eq!(f.parse_line(line).unwrap().remote_port, 45002);
    }

    #[test]
    fn ipv6_remote_addr() {
        let f = fmt(DEFAULT_LOG_FORMAT);
        let line = r#"2001:db8::5 - - [09/Dec/2024:15:05:00 +0800] "GET / HTTP/1.1" 200 3 "-" "curl" 40001"#;
        let p = f.parse_line(line).unwrap();
        assert_eq!(p.remote_addr, "2001:db8::5".parse::<IpAddr>().unwrap());
        // IPv4-mapped (a dual-stack listener) is the IPv4 address.
        let line = r#"::ffff:198.19.0.1 - - [09/Dec/2024:15:05:00 +0800] "GET / HTTP/1.1" 200 3 "-" "curl" 40001"#;
        assert_eq!(
            f.parse_line(line).unwrap().remote_addr,
            "198.19.0.1".parse::<IpAddr>().unwrap()
        );
        let f = fmt("[$remote_addr]:$remote_port $msec");
        let p = f.parse_line("[fd00::1]:443 1733727900.001").unwrap();
        assert_eq!(p.remote_addr, "fd00::1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn garbage_lines_are_errors_that_name_what_failed() {
        let f = fmt(DEFAULT_LOG_FORMAT);
        let e = f.parse_line("").unwrap_err();
        assert_eq!(e.0, "empty line");
        let e = f.parse_line("hello world").unwrap_err();
        assert!(
            e.0.contains("remote_addr") || e.0.contains("expected"),
            "{e}"
        );
        let line =
            r#"198.19.0.1 - - [09/Dec/2024:15:05:00 +0800] "GET / HTTP/1.1" 200 3 "-" "curl" -"#;
        let e = f.parse_line(line).unwrap_err();
        assert!(
            e.0.contains("$remote_port") && e.0.contains("not a port"),
            "{e}"
        );
        let line = r#"198.19.0.1 - - [yesterday] "GET / HTTP/1.1" 200 3 "-" "curl" 1"#;
        let e = f.parse_line(line).unwrap_err();
        assert!(
            e.0.contains("$time_local") && e.0.contains("not a time"),
            "{e}"
        );
        let line =
            r#"198.19.0.1 - - [09/Dec/2024:15:05:00 +0800] "GET / HTTP/1.1" 200 3 "-" "curl""#;
        let e = f.parse_line(line).unwrap_err();
        // A combined line without the port: said in the user's terms, with
        // the matcher's detail after.
        assert!(
            e.0.starts_with("the line has no $remote_port where the log format expects it")
                && e.0.contains("add it to nginx's log_format")
                && e.0.contains("after $http_user_agent"),
            "{e}"
        );
        let e = f.parse_line(&"x".repeat(MAX_LINE_BYTES + 1)).unwrap_err();
        assert!(e.0.contains("longer than"), "{e}");
        let f = fmt("$remote_addr $remote_port $msec");
        let e = f.parse_line("1.2.3.4 80 1733727900.1 extra").unwrap_err();
        assert!(
            e.0.contains("not a time") || e.0.contains("unexpected"),
            "{e}"
        );
        let e = f.parse_line("999.1.1.1 80 1733727900.1").unwrap_err();
        assert!(
            e.0.contains("$remote_addr") && e.0.contains("not an IP address"),
            "{e}"
        );
    }

    /// Reproducible randomness (a fixed seed).
    fn rng(r: &mut fastrand::Rng) -> u64 {
        r.u64(..)
    }

    #[test]
    fn random_input_never_panics() {
        let formats = [
            fmt(DEFAULT_LOG_FORMAT),
            fmt("$remote_addr $remote_port $msec $server_port"),
            fmt("\"$remote_addr\" \"$remote_port\" \"$time_iso8601\" \"$http_user_agent\""),
            fmt("$remote_addr:$remote_port"),
        ];
        let good = r#"198.19.0.1 - - [09/Dec/2024:15:05:00 +0800] "GET / HTTP/1.1" 200 3 "-" "curl" 45000"#;
        let alphabet = b" \"\\[]-:.0123456789/+aZ\xc3\xa9\x00\xff$";
        let mut seed = fastrand::Rng::with_seed(0x9e37_79b9_7f4a_7c15);
        for round in 0..6_000 {
            let len = (rng(&mut seed) % 120) as usize;
            let bytes: Vec<u8> = if round % 2 == 0 {
                (0..len).map(|_| rng(&mut seed) as u8).collect()
            } else {
                // Mutations of a good line: the interesting neighbourhood.
                let mut b = good.as_bytes().to_vec();
                for _ in 0..1 + rng(&mut seed) % 4 {
                    let i = (rng(&mut seed) as usize) % b.len();
                    let c = alphabet[(rng(&mut seed) as usize) % alphabet.len()];
                    match rng(&mut seed) % 3 {
                        0 => b[i] = c,
                        1 => b.insert(i, c),
                        _ => {
                            b.remove(i);
                        }
                    }
                    if b.is_empty() {
                        b.push(b'x');
                    }
                }
                b
            };
            let s = String::from_utf8_lossy(&bytes);
            for f in &formats {
                let _ = f.parse_line(&s);
            }
            // Random formats compile or fail cleanly too.
            let _ = LogFormat::compile(&s);
        }
        // A pathological line is bounded by the step budget.
        let f = fmt("\"$a\" \"$b\" \"$c\" \"$d\" $remote_addr $remote_port $msec");
        let line = "\"".to_string() + &"\" \"".repeat(3000);
        let started = std::time::Instant::now();
        let e = f.parse_line(&line).unwrap_err();
        assert!(e.0.contains("irregular"), "{e}");
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
    }
}
