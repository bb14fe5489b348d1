//! Command-line parsing, by hand: four subcommands with flat `--flag value`
//! options do not need an argument-parsing crate (the binary stays small and
//! the help text is written once, in `main.rs`).

use std::path::PathBuf;

use crate::error::CliError;

/// Options every subcommand takes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Global {
    pub server: Option<String>,
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    pub json: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Help,
    Version,
    /// `GET /api/v1/connections` with these query parameters.
    Search {
        params: Vec<(String, String)>,
    },
    /// `POST /api/v1/resolve` in batches.
    Resolve {
        /// `None`: standard input.
        input: Option<PathBuf>,
        log_format: Option<String>,
        window: Option<String>,
        /// Clock-skew tolerance (`skew`, a duration).
        skew: Option<String>,
        at: Option<String>,
        batch: usize,
    },
    /// `GET /api/v1/conntrack/query` with these query parameters.
    Lookup {
        params: Vec<(String, String)>,
    },
    Agents,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cli {
    pub global: Global,
    pub command: Command,
}

/// Lines per resolve request by default, and the server's maximum.
pub const DEFAULT_BATCH: usize = 1000;
pub const MAX_BATCH: usize = 20_000;

const SEARCH_FLAGS: [(&str, &str); 18] = [
    ("--tz", "tz"),
    ("--src-ip", "src_ip"),
    ("--src-port", "src_port"),
    ("--dst-ip", "dst_ip"),
    ("--dst-port", "dst_port"),
    ("--snat-ip", "snat_ip"),
    ("--snat-port", "snat_port"),
    ("--node", "node"),
    ("--protocol", "protocol"),
    ("--from", "from"),
    ("--to", "to"),
    ("--at", "at"),
    ("--window", "window"),
    ("--limit", "limit"),
    ("--kind", "kind"),
    ("--namespace", "namespace"),
    ("--pod", "pod"),
    ("--workload", "workload"),
];

/// The values of `search --kind` (the collector's `kind` parameter):
/// `new` seen opening, `midstream` TCP picked up mid-stream, `recovered`
/// found by a table dump, `destroy` only its end seen.
pub const KINDS: [&str; 4] = ["new", "midstream", "recovered", "destroy"];

const LOOKUP_FLAGS: [(&str, &str); 7] = [
    ("--protocol", "protocol"),
    ("--src-ip", "src_ip"),
    ("--src-port", "src_port"),
    ("--dst-ip", "dst_ip"),
    ("--dst-port", "dst_port"),
    ("--node", "node"),
    ("--zone", "zone"),
];

const RESOLVE_FLAGS: [(&str, &str); 6] = [
    ("--tz", "tz"),
    ("--log-format", "log_format"),
    ("--window", "window"),
    ("--skew", "skew"),
    ("--at", "at"),
    ("--batch", "batch"),
];

/// Apply `--tz` (taken out of `params`) to the time parameters `keys`: a
/// time written without a zone (`2026-11-30T10:50:34`,
/// `30/Nov/2026:10:50:34`) is read in that zone and sent as Unix seconds
/// with the fraction it was written with (the precision is kept); a time
/// with a zone, or Unix seconds, is sent as written. Without `--tz` a
/// zone-less time goes as written and the collector says it needs a zone.
fn apply_tz(params: &mut Vec<(String, String)>, keys: &[&str]) -> Result<(), CliError> {
    let Some(i) = params.iter().position(|(k, _)| k == "tz") else {
        return Ok(());
    };
    let (_, zone) = params.remove(i);
    let tz = ctw_common::api::parse_tz(&zone).map_err(|e| CliError::usage(format!("--tz: {e}")))?;
    for (k, v) in params.iter_mut() {
        if !keys.contains(&k.as_str()) || ctw_common::api::parse_time(v).is_ok() {
            continue;
        }
        let ns = ctw_common::api::parse_time_in(v, Some(tz))
            .map_err(|e| CliError::usage(format!("--{k}: {e}")))?;
        let precision = ctw_common::api::time_precision_ns(v);
        let digits = 9 - precision.ilog10() as usize;
        let (secs, frac) = (ns / 1_000_000_000, ns % 1_000_000_000);
        *v = if digits == 0 {
            secs.to_string()
        } else {
            let f = format!("{frac:09}");
            format!("{secs}.{}", &f[..digits])
        };
    }
    Ok(())
}

/// Split `IP:PORT` (`[v6]:PORT`, or a bare address) into address and port.
pub fn split_addr(s: &str) -> Result<(String, Option<String>), CliError> {
    let bad = || CliError::usage(format!("{s:?} is not IP:PORT (use [IPv6]:PORT for IPv6)"));
    if let Some(rest) = s.strip_prefix('[') {
        let (ip, after) = rest.split_once(']').ok_or_else(bad)?;
        return match after {
            "" => Ok((ip.to_string(), None)),
            p => Ok((
                ip.to_string(),
                Some(p.strip_prefix(':').ok_or_else(bad)?.to_string()),
            )),
        };
    }
    match s.matches(':').count() {
        0 => Ok((s.to_string(), None)),
        1 => {
            let (ip, port) = s.split_once(':').ok_or_else(bad)?;
            if ip.is_empty() || port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            Ok((ip.to_string(), Some(port.to_string())))
        }
        // A bare IPv6 address.
        _ => Ok((s.to_string(), None)),
    }
}

/// Parse `argv` without the program name.
pub fn parse(argv: &[String]) -> Result<Cli, CliError> {
    let mut global = Global::default();
    let mut sub: Option<String> = None;
    let mut flags: Vec<(String, String)> = Vec::new();
    let mut switches: Vec<String> = Vec::new();
    let mut positional: Vec<String> = Vec::new();
    let mut help = false;
    let mut i = 0;
    let mut only_positional = false;
    while i < argv.len() {
        let a = &argv[i];
        i += 1;
        if only_positional || a == "-" || !a.starts_with('-') {
            if sub.is_none() {
                sub = Some(a.clone());
            } else {
                positional.push(a.clone());
            }
            continue;
        }
        if a == "--" {
            only_positional = true;
            continue;
        }
        let (name, inline) = match a.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (a.clone(), None),
        };
        match name.as_str() {
            "-h" | "--help" => {
                help = true;
                continue;
            }
            "-V" | "--version" => {
                return Ok(Cli {
                    global,
                    command: Command::Version,
                })
            }
            "--json" | "--reply" => {
                if inline.is_some() {
                    return Err(CliError::usage(format!("{name} takes no value")));
                }
                if name == "--json" {
                    global.json = true;
                } else {
                    switches.push(name);
                }
                continue;
            }
            _ => {}
        }
        let value = match inline {
            Some(v) => v,
            None => {
                let v = argv
                    .get(i)
                    .ok_or_else(|| CliError::usage(format!("{name} needs a value")))?;
                i += 1;
                v.clone()
            }
        };
        match name.as_str() {
            "--server" => global.server = Some(value),
            "--token" => global.token = Some(value),
            "--token-file" => global.token_file = Some(PathBuf::from(value)),
            _ => flags.push((name, value)),
        }
    }
    if help {
        return Ok(Cli {
            global,
            command: Command::Help,
        });
    }
    if global.token.is_some() && global.token_file.is_some() {
        return Err(CliError::usage("give --token or --token-file, not both"));
    }
    let Some(sub) = sub else {
        return Err(CliError::usage(
            "missing command (search, resolve, lookup, agents); see ctw --help",
        ));
    };
    let command = match sub.as_str() {
        "search" => search(flags, switches, positional)?,
        "resolve" => resolve(flags, switches, positional)?,
        "lookup" => lookup(flags, switches, positional)?,
        "agents" => {
            no_extras(&sub, &flags, &switches, &positional)?;
            Command::Agents
        }
        "help" => Command::Help,
        other => {
            return Err(CliError::usage(format!(
                "unknown command {other:?} (search, resolve, lookup, agents); see ctw --help"
            )))
        }
    };
    Ok(Cli { global, command })
}

fn no_extras(
    sub: &str,
    flags: &[(String, String)],
    switches: &[String],
    positional: &[String],
) -> Result<(), CliError> {
    if let Some((f, _)) = flags.first() {
        return Err(CliError::usage(format!("unknown option {f} for {sub}")));
    }
    if let Some(s) = switches.first() {
        return Err(CliError::usage(format!("unknown option {s} for {sub}")));
    }
    if let Some(p) = positional.first() {
        return Err(CliError::usage(format!(
            "unexpected argument {p:?} for {sub}"
        )));
    }
    Ok(())
}

/// Map `--flag value` to `(param, value)` with `table`; repeated flags are errors.
fn mapped(
    sub: &str,
    flags: Vec<(String, String)>,
    table: &[(&str, &str)],
) -> Result<Vec<(String, String)>, CliError> {
    let mut out: Vec<(String, String)> = Vec::new();
    for (f, v) in flags {
        let Some((_, p)) = table.iter().find(|(name, _)| *name == f) else {
            let known: Vec<&str> = table.iter().map(|(n, _)| *n).collect();
            return Err(CliError::usage(format!(
                "unknown option {f} for {sub} (known: {})",
                known.join(" ")
            )));
        };
        if out.iter().any(|(k, _)| k == p) {
            return Err(CliError::usage(format!("{f} given twice")));
        }
        out.push((p.to_string(), v));
    }
    Ok(out)
}

fn search(
    flags: Vec<(String, String)>,
    switches: Vec<String>,
    positional: Vec<String>,
) -> Result<Command, CliError> {
    no_extras("search", &[], &switches, &[])?;
    let mut params = mapped("search", flags, &SEARCH_FLAGS)?;
    if positional.len() > 2 {
        return Err(CliError::usage(format!(
            "search: unexpected argument {:?}",
            positional[2]
        )));
    }
    let has = |params: &[(String, String)], k: &str| params.iter().any(|(p, _)| p == k);
    if let Some((_, k)) = params.iter().find(|(p, _)| p == "kind") {
        if !KINDS.contains(&k.as_str()) {
            return Err(CliError::usage(format!(
                "search: --kind {k:?} is not one of {}",
                KINDS.join(", ")
            )));
        }
    }
    if let Some(addr) = positional.first() {
        if has(&params, "snat_ip") || has(&params, "snat_port") {
            return Err(CliError::usage(
                "search: give IP:PORT or --snat-ip/--snat-port, not both",
            ));
        }
        let (ip, port) = split_addr(addr)?;
        params.push(("snat_ip".into(), ip));
        if let Some(p) = port {
            params.push(("snat_port".into(), p));
        }
    }
    if let Some(t) = positional.get(1) {
        if has(&params, "at") {
            return Err(CliError::usage("search: give TIME or --at, not both"));
        }
        params.push(("at".into(), t.clone()));
    }
    apply_tz(&mut params, &["at", "from", "to"])?;
    Ok(Command::Search { params })
}

fn resolve(
    flags: Vec<(String, String)>,
    switches: Vec<String>,
    positional: Vec<String>,
) -> Result<Command, CliError> {
    no_extras("resolve", &[], &switches, &[])?;
    let mut params = mapped("resolve", flags, &RESOLVE_FLAGS)?;
    apply_tz(&mut params, &["at"])?;
    if positional.len() > 1 {
        return Err(CliError::usage(format!(
            "resolve: unexpected argument {:?} (one FILE or -)",
            positional[1]
        )));
    }
    let get = |k: &str| params.iter().find(|(p, _)| p == k).map(|(_, v)| v.clone());
    let batch = match get("batch") {
        None => DEFAULT_BATCH,
        Some(b) => match b.parse::<usize>() {
            Ok(n) if (1..=MAX_BATCH).contains(&n) => n,
            _ => {
                return Err(CliError::usage(format!(
                    "--batch: {b:?} must be 1-{MAX_BATCH}"
                )))
            }
        },
    };
    Ok(Command::Resolve {
        input: positional.first().filter(|p| *p != "-").map(PathBuf::from),
        log_format: get("log_format"),
        window: get("window"),
        skew: get("skew"),
        at: get("at"),
        batch,
    })
}

fn lookup(
    flags: Vec<(String, String)>,
    switches: Vec<String>,
    positional: Vec<String>,
) -> Result<Command, CliError> {
    no_extras("lookup", &[], &[], &positional)?;
    let mut params = mapped("lookup", flags, &LOOKUP_FLAGS)?;
    for k in ["src_ip", "src_port", "dst_ip", "dst_port"] {
        if !params.iter().any(|(p, _)| p == k) {
            return Err(CliError::usage(format!(
                "lookup needs --{}",
                k.replace('_', "-")
            )));
        }
    }
    if switches.iter().any(|s| s == "--reply") {
        params.push(("tuple".into(), "reply".into()));
    }
    Ok(Command::Lookup { params })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::error::Exit;

    fn p(s: &str) -> Result<Cli, CliError> {
        parse(&s.split_whitespace().map(str::to_string).collect::<Vec<_>>())
    }

    fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn tz_reads_zone_less_times_in_that_zone_keeping_their_precision() {
        // 2024-12-09T07:05:00Z = 1733727900.
        let c = p("search 198.18.0.1:45000 2024-12-09T15:05:00 --tz +08:00").unwrap();
        let Command::Search { params } = c.command else {
            panic!("{c:?}")
        };
        assert!(
            params.contains(&("at".into(), "1733727900".into())),
            "{params:?}"
        );
        assert!(!params.iter().any(|(k, _)| k == "tz"));
        let c = p("search --from 09/Dec/2024:07:05:00 --to 2024-12-09T07:06:00Z --tz UTC").unwrap();
        let Command::Search { params } = c.command else {
            panic!("{c:?}")
        };
        // A zone-less $time_local is read in the zone; a zoned time goes as written.
        assert_eq!(
            params,
            kv(&[("from", "1733727900"), ("to", "2024-12-09T07:06:00Z")])
        );
        let c = p("search --from 2024-12-09T07:05:00.250 --tz UTC").unwrap();
        let Command::Search { params } = c.command else {
            panic!("{c:?}")
        };
        assert_eq!(params, kv(&[("from", "1733727900.250")]));
        let c = p("resolve --at 2024-12-09T15:05:00 --tz +0800 x.log").unwrap();
        let Command::Resolve { at, .. } = c.command else {
            panic!("{c:?}")
        };
        assert_eq!(at.as_deref(), Some("1733727900"));
        let e = p("search 198.18.0.1:1 2024-12-09T15:05:00 --tz Mars").unwrap_err();
        assert!(e.message.starts_with("--tz:"), "{e}");
    }

    #[test]
    fn search_flags_and_shorthand() {
        let c = p("search --namespace payments --workload Deployment/checkout --pod x").unwrap();
        assert_eq!(
            c.command,
            Command::Search {
                params: kv(&[
                    ("namespace", "payments"),
                    ("workload", "Deployment/checkout"),
                    ("pod", "x")
                ])
            }
        );
        let c = p("search --src-ip 10.0.0.5 --dst-port=443 --limit 5 --json").unwrap();
        assert!(c.global.json);
        assert_eq!(
            c.command,
            Command::Search {
                params: kv(&[("src_ip", "10.0.0.5"), ("dst_port", "443"), ("limit", "5")])
            }
        );
        let c = p("--server http://c:9360 search 192.168.1.100:12345 1733727900.123 --window 2m")
            .unwrap();
        assert_eq!(c.global.server.as_deref(), Some("http://c:9360"));
        assert_eq!(
            c.command,
            Command::Search {
                params: kv(&[
                    ("window", "2m"),
                    ("snat_ip", "192.168.1.100"),
                    ("snat_port", "12345"),
                    ("at", "1733727900.123")
                ])
            }
        );
        let c = p("search [fd00::1]:443").unwrap();
        assert_eq!(
            c.command,
            Command::Search {
                params: kv(&[("snat_ip", "fd00::1"), ("snat_port", "443")])
            }
        );
        let c = p("search fd00::1").unwrap();
        assert_eq!(
            c.command,
            Command::Search {
                params: kv(&[("snat_ip", "fd00::1")])
            }
        );
        for bad in [
            "search --src-ip",
            "search --colour red",
            "search --src-ip a --src-ip b",
            "search 1.2.3.4:x",
            "search 1.2.3.4:1 --snat-ip 1.2.3.4",
            "search 1.2.3.4:1 t --at t",
            "search a b c",
            "search --reply",
            "--token a --token-file b agents",
            "agents extra",
            "frobnicate",
            "",
        ] {
            let e = p(bad).unwrap_err();
            assert_eq!(e.exit, Exit::Usage, "{bad}: {e}");
        }
    }

    #[test]
    fn resolve_lookup_agents_help() {
        let c =
            p("resolve access.log --log-format $remote_addr:$remote_port --at 1733727900").unwrap();
        assert_eq!(
            c.command,
            Command::Resolve {
                input: Some("access.log".into()),
                log_format: Some("$remote_addr:$remote_port".into()),
                window: None,
                skew: None,
                at: Some("1733727900".into()),
                batch: DEFAULT_BATCH
            }
        );
        let c = p("resolve - --batch 10 --window 1m --skew 2s").unwrap();
        assert!(matches!(
            c.command,
            Command::Resolve {
                input: None,
                batch: 10,
                skew: Some(ref s),
                ..
            } if s == "2s"
        ));
        assert!(matches!(
            p("resolve").unwrap().command,
            Command::Resolve { input: None, .. }
        ));
        assert_eq!(p("resolve --batch 0").unwrap_err().exit, Exit::Usage);
        assert_eq!(p("resolve a b").unwrap_err().exit, Exit::Usage);

        let c = p(
            "lookup --src-ip 1.1.1.1 --src-port 80 --dst-ip 2.2.2.2 --dst-port 5 --reply --node n1 --zone 7",
        )
        .unwrap();
        assert_eq!(
            c.command,
            Command::Lookup {
                params: kv(&[
                    ("src_ip", "1.1.1.1"),
                    ("src_port", "80"),
                    ("dst_ip", "2.2.2.2"),
                    ("dst_port", "5"),
                    ("node", "n1"),
                    ("zone", "7"),
                    ("tuple", "reply")
                ])
            }
        );
        let e = p("lookup --src-ip 1.1.1.1 --src-port 80 --dst-ip 2.2.2.2").unwrap_err();
        assert!(e.message.contains("--dst-port"), "{e}");

        let c = p("agents --token t --json").unwrap();
        assert_eq!(c.command, Command::Agents);
        assert_eq!(c.global.token.as_deref(), Some("t"));
        assert_eq!(p("--help").unwrap().command, Command::Help);
        assert_eq!(p("search -h").unwrap().command, Command::Help);
        assert_eq!(p("help").unwrap().command, Command::Help);
        assert_eq!(p("--version").unwrap().command, Command::Version);
    }

    #[test]
    fn addresses() {
        assert_eq!(
            split_addr("1.2.3.4:80").unwrap(),
            ("1.2.3.4".into(), Some("80".into()))
        );
        assert_eq!(
            split_addr("[::1]:80").unwrap(),
            ("::1".into(), Some("80".into()))
        );
        assert_eq!(split_addr("[::1]").unwrap(), ("::1".into(), None));
        assert!(split_addr("[::1]80").is_err());
        assert!(split_addr(":80").is_err());
    }
}
