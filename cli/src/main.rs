//! `ctw`: the conntrack-watch command-line client. Talks to the collector's
//! HTTP API: search connections, resolve nginx access-log lines to pods, live
//! lookups through the agents, and the agents list.

mod args;
mod client;
mod config;
mod error;
mod output;

use std::io::{BufRead, BufReader, Read, Write};

use ctw_common::api::{
    AgentsAnswer, LineAnswer, LookupAnswer, ResolveAnswer, ResolveSummary, SearchAnswer,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

use args::{Cli, Command};
use client::Client;
use error::{from_status, CliError, Exit};

const HELP: &str = "\
ctw - conntrack-watch client: which pod was node_ip:port at time T?

USAGE:
    ctw [GLOBAL OPTIONS] COMMAND [OPTIONS]

COMMANDS:
    search [IP:PORT [TIME]] [--src-ip IP] [--src-port N] [--dst-ip IP] [--dst-port N]
           [--snat-ip IP] [--snat-port N] [--node NAME] [--protocol P]
           [--from TIME] [--to TIME] [--at TIME] [--tz ZONE] [--window DUR] [--limit N] [--kind K]
           [--namespace NS] [--pod NAME] [--workload [KIND/]NAME]
        Search recorded connections. IP:PORT is the SNAT address and port a
        server logged (remote_addr:remote_port), TIME sets --at.
        --kind K keeps connections whose first record was: new (seen opening),
        midstream (TCP picked up mid-stream), recovered (found by a table
        dump), destroy (only its end seen). END shows <=TIME (superseded) or
        <=TIME (gone) when only an upper bound of the end is known.
        --namespace, --pod, --workload (Deployment/checkout, or a name of any
        kind) keep connections from those pods, as of each connection's start
        (the collector's pod history; kubernetes on). With pod names, a
        NAMESPACE/POD (WORKLOAD) column shows each connection's pod.
    resolve [FILE|-] [--log-format FMT] [--window DUR] [--skew DUR] [--at TIME] [--tz ZONE] [--batch N]
        Read nginx access-log lines (FILE, or standard input) and write each
        back with ' pod=IP node=NODE' appended, or ' pod=? reason=...'
        (not_found, not_observed node=NODE: that node's capture saw no
        connection from its address, unparsed); ' ambiguous=N',
        ' midstream=true' and ' incomplete=true' flag uncertain or special
        answers. --skew: clock difference tolerated between the log's host
        and the nodes (default 1s, at most 60s); $request_time in FMT makes
        each line the interval the request ran. Order is kept; lines go in batches of N (1000).
        The default format is nginx's combined plus ' $remote_port'; FMT is an
        nginx log_format string with $remote_addr and $remote_port (and
        $msec, $time_iso8601 or $time_local, else give --at).
        When the collector names pods (kubernetes on): ' pod=NAMESPACE/NAME
        (Kind/name) pod_ip=IP node=NODE' as of the connection's start, or
        ' pod=IP node=NODE pod_reason=R' (no_pod_at_time, history_gap,
        host_network, ip_handover); ' pod_verified=false' (in a gap of the
        pod watch or a pod's IP handover window) and
        ' pod_ip_reused=true' (the address changed hands) flag doubt.
    lookup --src-ip IP --src-port N --dst-ip IP --dst-port N [--protocol P] [--reply] [--node NAME] [--zone N]
        Live conntrack lookup on the agent that owns the connection. --reply:
        the addresses are the reply direction (server -> SNAT address).
        --zone: the conntrack zone; without it zone 0 and then every zone
        the node's records showed are tried.
    agents
        Every agent seen: connected, addresses, last batch, lag, loss.

GLOBAL OPTIONS:
    --server URL        collector HTTP API (http:// or https://; host:port means http)
    --token TOKEN       API token (Authorization: Bearer)
    --token-file FILE   file holding the API token
    --json              print the API's JSON answer (one document) instead of a table
    -h, --help          this help;  -V, --version  the version

    Without flags: CTW_SERVER, CTW_TOKEN or CTW_TOKEN_FILE; then the config file
    $CTW_CONFIG or ~/.config/ctw/config.yaml with `server:` and `token:` or
    `token_file:`. The server defaults to http://127.0.0.1:9360.

TIMES AND DURATIONS:
    As nginx writes them or as you type them: $time_local (09/Dec/2024:15:05:00 +0800),
    $time_iso8601 / RFC 3339 (2024-12-09T15:05:00.123+08:00), $msec or Unix
    seconds (1733727900.123). A time without a zone (2024-12-09T15:05:00,
    09/Dec/2024:15:05:00) needs --tz ZONE (UTC, +08:00, +0800, -5), the zone it
    was written in. The precision you give is kept. Durations like 500ms, 30s,
    5m, 2h, 1d.

EXIT CODES:
    0  found / done
    1  not found: search or lookup found nothing; resolve: some line did not
       resolve to exactly one pod (not found, ambiguous or unparsed)
    2  usage or config error, or a request the collector refused (HTTP 400)
    3  network, TLS, authentication (HTTP 401) or server error (HTTP status shown)
    4  found, but the answer may be incomplete (an agent lost events or was
       disconnected in the time range)
";

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let code = match run(&argv) {
        Ok(exit) => exit,
        Err(e) => {
            if !e.message.is_empty() {
                eprintln!("ctw: {e}");
            }
            e.exit
        }
    };
    std::process::exit(code.code());
}

fn run(argv: &[String]) -> Result<Exit, CliError> {
    let Cli { global, command } = args::parse(argv)?;
    match command {
        Command::Help => {
            print!("{HELP}");
            return Ok(Exit::Ok);
        }
        Command::Version => {
            println!("ctw {}", env!("CARGO_PKG_VERSION"));
            return Ok(Exit::Ok);
        }
        _ => {}
    }
    let settings = config::settings(&global, &|k| std::env::var(k).ok())?;
    let client = Client::new(&settings);
    let mut out = std::io::stdout().lock();
    let res = match command {
        Command::Search { params } => search(&client, &params, global.json, &mut out),
        Command::Lookup { params } => lookup(&client, &params, global.json, &mut out),
        Command::Agents => agents(&client, global.json, &mut out),
        Command::Resolve {
            input,
            log_format,
            window,
            skew,
            at,
            batch,
        } => {
            let reader: Box<dyn Read> =
                match &input {
                    Some(p) => Box::new(std::fs::File::open(p).map_err(|e| {
                        CliError::usage(format!("cannot open {}: {e}", p.display()))
                    })?),
                    None => Box::new(std::io::stdin().lock()),
                };
            let opts = ResolveOpts {
                log_format,
                window,
                skew,
                at,
                batch,
                json: global.json,
            };
            resolve(&client, reader, &opts, &mut out)
        }
        Command::Help | Command::Version => Ok(Exit::Ok),
    };
    let flushed = out.flush();
    let exit = res?;
    match flushed {
        Err(e) => Err(write_err(e)),
        Ok(()) => Ok(exit),
    }
}

/// A write error; a closed pipe (`ctw resolve big.log | head`) ends quietly.
fn write_err(e: std::io::Error) -> CliError {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        return CliError {
            exit: Exit::Ok,
            message: String::new(),
        };
    }
    CliError::server(format!("cannot write output: {e}"))
}

fn print_json(out: &mut dyn Write, v: &impl Serialize) -> Result<(), CliError> {
    let s = serde_json::to_string_pretty(v).map_err(|e| CliError::server(e.to_string()))?;
    writeln!(out, "{s}").map_err(write_err)
}

/// A 200 answer as its typed shape; a body that is not that shape is the
/// server's problem.
fn typed<T: DeserializeOwned>(body: &Value, what: &str) -> Result<T, CliError> {
    T::deserialize(body).map_err(|e| CliError::server(format!("HTTP 200: not {what}: {e}")))
}

/// Exit code of a search answer: 1 nothing found, 4 found but incomplete.
fn search_exit(v: &SearchAnswer) -> Exit {
    if v.total == 0 {
        Exit::NotFound
    } else if !v.complete {
        Exit::Incomplete
    } else {
        Exit::Ok
    }
}

fn search(
    c: &Client,
    params: &[(String, String)],
    json: bool,
    out: &mut dyn Write,
) -> Result<Exit, CliError> {
    let r = c.get("/api/v1/connections", params)?;
    if r.status != 200 {
        return Err(from_status(r.status, &r.body));
    }
    let v: SearchAnswer = typed(&r.body, "a search answer")?;
    if json {
        // As the server sent it (fields this client does not know included).
        print_json(out, &r.body)?;
    } else if v.total > 0 {
        write!(out, "{}", output::search_table(&v)).map_err(write_err)?;
    }
    if !json {
        if v.total == 0 {
            eprintln!("ctw: {}", output::not_found_message(params, &v));
        } else if v.returned < v.total {
            eprintln!(
                "ctw: {} of {} connections shown (raise --limit)",
                v.returned, v.total
            );
        }
    }
    if !v.complete {
        eprintln!("ctw: warning: the answer may be incomplete:");
        for g in output::gap_lines(&v.gaps) {
            eprintln!("ctw:   {g}");
        }
    }
    Ok(search_exit(&v))
}

fn lookup(
    c: &Client,
    params: &[(String, String)],
    json: bool,
    out: &mut dyn Write,
) -> Result<Exit, CliError> {
    let r = c.get("/api/v1/conntrack/query", params)?;
    if r.status == 404 && json {
        print_json(out, &r.body)?;
    }
    if r.status != 200 {
        return Err(from_status(r.status, &r.body));
    }
    let v: LookupAnswer = typed(&r.body, "a lookup answer")?;
    if json {
        print_json(out, &r.body)?;
    } else {
        write!(out, "{}", output::lookup_table(&v)).map_err(write_err)?;
    }
    Ok(Exit::Ok)
}

fn agents(c: &Client, json: bool, out: &mut dyn Write) -> Result<Exit, CliError> {
    let r = c.get("/api/v1/agents", &[])?;
    if r.status != 200 {
        return Err(from_status(r.status, &r.body));
    }
    let v: AgentsAnswer = typed(&r.body, "an agents answer")?;
    if json {
        print_json(out, &r.body)?;
    } else {
        write!(out, "{}", output::agents_table(&v)).map_err(write_err)?;
    }
    Ok(Exit::Ok)
}

#[derive(Debug)]
struct ResolveOpts {
    log_format: Option<String>,
    window: Option<String>,
    skew: Option<String>,
    at: Option<String>,
    batch: usize,
    json: bool,
}

/// Exit code of a resolve run from its summed summary: 1 when a line did not
/// resolve to exactly one pod, else 4 when an answer may be incomplete.
fn resolve_exit(s: &ResolveSummary) -> Exit {
    if s.not_found + s.ambiguous + s.not_observed + s.unparsed > 0 {
        Exit::NotFound
    } else if s.incomplete > 0 {
        Exit::Incomplete
    } else {
        Exit::Ok
    }
}

/// `ctw resolve --json`: every batch's results, line numbers counted over
/// the whole input, and the summed summary.
#[derive(Debug, Serialize)]
struct ResolveJson {
    results: Vec<LineAnswer>,
    summary: ResolveSummary,
    log_format: Option<String>,
}

/// Read lines (any bytes; invalid UTF-8 is replaced), `batch` at a time.
fn read_batch(input: &mut dyn BufRead, batch: usize) -> Result<Vec<String>, CliError> {
    let mut lines = Vec::new();
    let mut buf = Vec::new();
    while lines.len() < batch {
        buf.clear();
        let n = input
            .read_until(b'\n', &mut buf)
            .map_err(|e| CliError::usage(format!("cannot read input: {e}")))?;
        if n == 0 {
            break;
        }
        while matches!(buf.last(), Some(b'\n' | b'\r')) {
            buf.pop();
        }
        lines.push(String::from_utf8_lossy(&buf).into_owned());
    }
    Ok(lines)
}

fn resolve(
    c: &Client,
    input: Box<dyn Read>,
    o: &ResolveOpts,
    out: &mut dyn Write,
) -> Result<Exit, CliError> {
    let mut input = BufReader::with_capacity(1 << 16, input);
    let mut summary = ResolveSummary::default();
    let mut all: Vec<LineAnswer> = Vec::new();
    let mut log_format = None;
    let mut offset = 0u64;
    let mut shown_errors = 0;
    loop {
        let lines = read_batch(&mut input, o.batch)?;
        if lines.is_empty() {
            break;
        }
        let mut req = json!({ "lines": lines });
        for (k, v) in [
            ("log_format", &o.log_format),
            ("window", &o.window),
            ("skew", &o.skew),
            ("at", &o.at),
        ] {
            if let Some(v) = v {
                req[k] = json!(v);
            }
        }
        let r = c.post("/api/v1/resolve", &req)?;
        if r.status != 200 {
            let mut e = from_status(r.status, &r.body);
            if offset > 0 {
                e.message = format!("after {offset} lines: {}", e.message);
            }
            return Err(e);
        }
        let body: ResolveAnswer = typed(&r.body, "a resolve answer")?;
        if body.results.len() != lines.len() {
            return Err(CliError::server(
                "HTTP 200: the answer has no results for every line",
            ));
        }
        let s = &body.summary;
        summary.lines += s.lines;
        summary.resolved += s.resolved;
        summary.not_found += s.not_found;
        summary.ambiguous += s.ambiguous;
        summary.not_observed += s.not_observed;
        summary.unparsed += s.unparsed;
        summary.incomplete += s.incomplete;
        log_format = Some(body.log_format);
        for (line, mut r) in lines.iter().zip(body.results) {
            let no = offset + r.line_no;
            if r.status == "unparsed" && shown_errors < 5 && !o.json {
                shown_errors += 1;
                eprintln!("ctw: line {no}: {}", output::opt(r.error.as_deref()));
            }
            if o.json {
                r.line_no = no;
                all.push(r);
            } else {
                writeln!(out, "{line}{}", output::resolve_suffix(&r)).map_err(write_err)?;
            }
        }
        offset += lines.len() as u64;
    }
    if o.json {
        let exit = resolve_exit(&summary);
        print_json(
            out,
            &ResolveJson {
                results: all,
                summary,
                log_format,
            },
        )?;
        return Ok(exit);
    }
    eprintln!(
        "ctw: {} lines: {} resolved, {} not found, {} ambiguous, {} unparsed, {} incomplete",
        summary.lines,
        summary.resolved,
        summary.not_found,
        summary.ambiguous,
        summary.unparsed,
        summary.incomplete
    );
    Ok(resolve_exit(&summary))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn exit_codes_of_answers() {
        let search = |total: u64, complete: bool| {
            search_exit(&SearchAnswer {
                records: vec![],
                total,
                returned: 0,
                limit: 100,
                complete,
                gaps: vec![],
                from: None,
                to: None,
                at: None,
            })
        };
        assert_eq!(search(0, true), Exit::NotFound);
        assert_eq!(search(0, false), Exit::NotFound);
        assert_eq!(search(2, true), Exit::Ok);
        assert_eq!(search(2, false), Exit::Incomplete);
        let s = |v: Value| serde_json::from_value::<ResolveSummary>(v).unwrap();
        let full = |v: Value| {
            let mut all = json!({"lines": 0, "resolved": 0, "not_found": 0, "ambiguous": 0,
                "not_observed": 0, "unparsed": 0, "incomplete": 0});
            for (k, x) in v.as_object().unwrap() {
                all[k] = x.clone();
            }
            s(all)
        };
        assert_eq!(
            resolve_exit(&full(json!({"lines": 3, "resolved": 3}))),
            Exit::Ok
        );
        assert_eq!(resolve_exit(&full(json!({"lines": 0}))), Exit::Ok);
        assert_eq!(
            resolve_exit(&full(json!({"resolved": 2, "incomplete": 1}))),
            Exit::Incomplete
        );
        assert_eq!(
            resolve_exit(&full(
                json!({"resolved": 2, "unparsed": 1, "incomplete": 1})
            )),
            Exit::NotFound
        );
        assert_eq!(resolve_exit(&full(json!({"ambiguous": 1}))), Exit::NotFound);
        assert_eq!(resolve_exit(&full(json!({"not_found": 1}))), Exit::NotFound);
    }

    #[test]
    fn batches_keep_lines_and_order() {
        let text = b"a\r\nb\n\nlast-no-newline\xff";
        let mut r = BufReader::new(&text[..]);
        assert_eq!(read_batch(&mut r, 2).unwrap(), vec!["a", "b"]);
        assert_eq!(
            read_batch(&mut r, 2).unwrap(),
            vec!["", "last-no-newline\u{fffd}"]
        );
        assert!(read_batch(&mut r, 2).unwrap().is_empty());
    }

    #[test]
    fn help_documents_every_exit_code() {
        for code in [
            "0  found",
            "1  not found",
            "2  usage",
            "3  network",
            "4  found, but",
        ] {
            assert!(HELP.contains(code), "{code}");
        }
    }
}
