//! Certificates for the mTLS gRPC port: the `ctw-collector certs` subcommand
//! (a CA, collector and agent certificates for a test or a small site), the
//! library functions tests use to make them, and the small DER reader that
//! finds a client certificate's node name (first DNS SAN, else the CN).
//!
//! Keys are ECDSA P-256. A client (agent) certificate's first DNS SAN is its
//! node name; a server (collector) certificate carries the DNS and IP SANs
//! agents dial. Files: `DIR/ca.pem`, `DIR/ca-key.pem`, `DIR/NAME.pem`,
//! `DIR/NAME-key.pem`; keys are written with mode 0600, every file through a
//! temporary file and a rename, so a reloading server never reads half a file.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use chrono::Datelike;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    BadFile { path: String, message: String },
    #[error("{0}")]
    Usage(String),
}

/// A certificate and its private key, both PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct CertPair {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for CertPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertPair")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertKind {
    /// The collector: DNS and IP SANs, `serverAuth`.
    Server,
    /// An agent: first DNS SAN = node name, `clientAuth`.
    Client,
}

/// What to put in a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssueSpec {
    /// Common name; for a client also the node name (first DNS SAN).
    pub name: String,
    pub kind: CertKind,
    /// More DNS SANs (a server without any gets `name`).
    pub dns: Vec<String>,
    pub ips: Vec<IpAddr>,
    pub days: u32,
}

impl IssueSpec {
    pub fn client(node: &str) -> IssueSpec {
        IssueSpec {
            name: node.to_string(),
            kind: CertKind::Client,
            dns: Vec::new(),
            ips: Vec::new(),
            days: 365,
        }
    }

    pub fn server(name: &str, dns: &[&str], ips: &[IpAddr]) -> IssueSpec {
        IssueSpec {
            name: name.to_string(),
            kind: CertKind::Server,
            dns: dns.iter().map(|s| s.to_string()).collect(),
            ips: ips.to_vec(),
            days: 365,
        }
    }
}

/// (year, month, day) in UTC, `days` from today (negative = in the past).
fn day_from_today(days: i64) -> (i32, u8, u8) {
    let d = (chrono::Utc::now() + chrono::Duration::days(days)).date_naive();
    // Month (1-12) and day (1-31) always fit in a u8.
    (d.year(), d.month() as u8, d.day() as u8)
}

fn validity(params: &mut CertificateParams, days: u32) {
    // One day back for clocks that are a little behind.
    let (y, m, d) = day_from_today(-1);
    params.not_before = rcgen::date_time_ymd(y, m, d);
    let (y, m, d) = day_from_today(i64::from(days.max(1)));
    params.not_after = rcgen::date_time_ymd(y, m, d);
}

fn ca_key_usages() -> Vec<KeyUsagePurpose> {
    vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ]
}

/// A new self-signed CA valid for `days`.
pub fn generate_ca(common_name: &str, days: u32) -> Result<CertPair, CertError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "conntrack-watch");
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = ca_key_usages();
    validity(&mut params, days);
    let cert = params.self_signed(&key)?;
    Ok(CertPair {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// A certificate signed by `ca` (a pair from [`generate_ca`] or any CA whose
/// subject uses UTF8, printable or IA5 strings).
pub fn issue(ca: &CertPair, spec: &IssueSpec) -> Result<CertPair, CertError> {
    let ca_der = first_cert_der(&ca.cert_pem).ok_or_else(|| CertError::BadFile {
        path: "CA certificate".into(),
        message: "no PEM certificate".into(),
    })?;
    let ca_key = KeyPair::from_pem(&ca.key_pem)?;
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name = subject_dn(&ca_der).map_err(|message| CertError::BadFile {
        path: "CA certificate".into(),
        message,
    })?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = ca_key_usages();
    let issuer = Issuer::new(ca_params, ca_key);

    if spec.name.is_empty() {
        return Err(CertError::Usage("a certificate needs a name".into()));
    }
    let mut dns = vec![spec.name.clone()];
    if spec.kind == CertKind::Server && !spec.dns.is_empty() {
        dns.clear();
    }
    for d in &spec.dns {
        if !dns.contains(d) {
            dns.push(d.clone());
        }
    }
    let mut params = CertificateParams::new(dns)?;
    for ip in &spec.ips {
        params.subject_alt_names.push(SanType::IpAddress(*ip));
    }
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "conntrack-watch");
    dn.push(DnType::CommonName, spec.name.as_str());
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // A collector's (server) certificate is also its client certificate
    // towards the other collectors (forwarded live lookups, `peers.rs`).
    params.extended_key_usages = match spec.kind {
        CertKind::Server => vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
        CertKind::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
    };
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, spec.days);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(CertPair {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// The DER bytes of the first certificate in a PEM text, if any.
pub(crate) fn first_cert_der(pem: &str) -> Option<Vec<u8>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .flatten()
        .next()
        .map(|c| c.as_ref().to_vec())
}

/// The CA's subject as rcgen wants it, keeping each value's string type so
/// that the issuer name of a new certificate equals the CA's subject bytes.
fn subject_dn(der: &[u8]) -> Result<DistinguishedName, String> {
    let mut dn = DistinguishedName::new();
    for der::Attribute { oid, tag, value } in
        der::subject_attributes(der).map_err(|e| e.to_string())?
    {
        let arcs = der::oid_arcs(oid).ok_or("bad object identifier in the subject")?;
        let text = std::str::from_utf8(value)
            .map_err(|_| "subject value is not text")?
            .to_string();
        let value = match tag {
            der::UTF8_STRING => DnValue::Utf8String(text),
            der::PRINTABLE_STRING => DnValue::PrintableString(
                text.try_into()
                    .map_err(|_| "bad printable string in the subject")?,
            ),
            der::IA5_STRING => DnValue::Ia5String(
                text.try_into()
                    .map_err(|_| "bad IA5 string in the subject")?,
            ),
            t => return Err(format!("unsupported string type 0x{t:02x} in the subject")),
        };
        dn.push(DnType::from_oid(&arcs), value);
    }
    Ok(dn)
}

/// The node name of a client certificate: its first DNS SAN, else its CN.
pub fn node_name(cert_der: &[u8]) -> Option<String> {
    match der::dns_names(cert_der) {
        Ok(names) if !names.is_empty() => return names.into_iter().next(),
        Ok(_) => {}
        Err(_) => return None,
    }
    der::common_name(cert_der).ok().flatten()
}

/// Just enough DER to read a certificate's subject and DNS SANs. Input is a
/// certificate rustls already verified; still, every read is bounds-checked
/// and a malformed input is an error, never a panic.
pub mod der {
    #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
    #[error("malformed certificate: {0}")]
    pub struct DerError(pub &'static str);

    pub const UTF8_STRING: u8 = 0x0c;
    pub const PRINTABLE_STRING: u8 = 0x13;
    pub const IA5_STRING: u8 = 0x16;
    const SEQUENCE: u8 = 0x30;
    const SET: u8 = 0x31;
    const OID: u8 = 0x06;
    const BOOLEAN: u8 = 0x01;
    const OCTET_STRING: u8 = 0x04;
    const EXTENSIONS: u8 = 0xa3;
    const VERSION: u8 = 0xa0;
    const DNS_NAME: u8 = 0x82;
    const OID_COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];
    const OID_SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1d, 0x11];

    /// One TLV: (tag, content, rest).
    fn tlv(input: &[u8]) -> Result<(u8, &[u8], &[u8]), DerError> {
        let (&tag, rest) = input.split_first().ok_or(DerError("truncated tag"))?;
        if tag & 0x1f == 0x1f {
            return Err(DerError("multi-byte tag"));
        }
        let (&first, rest) = rest.split_first().ok_or(DerError("truncated length"))?;
        let (len, rest) = if first < 0x80 {
            (usize::from(first), rest)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return Err(DerError("bad length"));
            }
            let len = rest[..n]
                .iter()
                .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
            (len, &rest[n..])
        };
        if rest.len() < len {
            return Err(DerError("content past the end"));
        }
        Ok((tag, &rest[..len], &rest[len..]))
    }

    fn expect(input: &[u8], want: u8) -> Result<(&[u8], &[u8]), DerError> {
        let (tag, content, rest) = tlv(input)?;
        if tag != want {
            return Err(DerError("unexpected tag"));
        }
        Ok((content, rest))
    }

    /// The fields of tbsCertificate from `subject` on.
    fn tbs_from_subject(cert: &[u8]) -> Result<&[u8], DerError> {
        let (cert, _) = expect(cert, SEQUENCE)?;
        let (tbs, _) = expect(cert, SEQUENCE)?;
        let mut rest = tbs;
        let (tag, _, r) = tlv(rest)?;
        if tag == VERSION {
            rest = r;
        }
        // serialNumber, signature, issuer, validity
        for _ in 0..4 {
            rest = tlv(rest)?.2;
        }
        Ok(rest)
    }

    /// One attribute of a name, e.g. CN = "node-1".
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Attribute<'a> {
        /// Content bytes of the OID (`55 04 03` for CN).
        pub oid: &'a [u8],
        /// String type tag of the value (UTF8String, PrintableString ...).
        pub tag: u8,
        pub value: &'a [u8],
    }

    /// Subject attributes in order.
    pub fn subject_attributes(cert: &[u8]) -> Result<Vec<Attribute<'_>>, DerError> {
        let (mut rdns, _) = expect(tbs_from_subject(cert)?, SEQUENCE)?;
        let mut out = Vec::new();
        while !rdns.is_empty() {
            let (mut set, rest) = expect(rdns, SET)?;
            rdns = rest;
            while !set.is_empty() {
                let (atv, rest) = expect(set, SEQUENCE)?;
                set = rest;
                let (oid, value) = expect(atv, OID)?;
                let (tag, value, _) = tlv(value)?;
                out.push(Attribute { oid, tag, value });
            }
        }
        Ok(out)
    }

    /// The subject's first common name, when it is text.
    pub fn common_name(cert: &[u8]) -> Result<Option<String>, DerError> {
        for Attribute { oid, tag, value } in subject_attributes(cert)? {
            if oid == OID_COMMON_NAME {
                return Ok(match tag {
                    UTF8_STRING | PRINTABLE_STRING | IA5_STRING => {
                        std::str::from_utf8(value).ok().map(str::to_string)
                    }
                    0x1e => {
                        // BMPString: UTF-16BE.
                        let units: Vec<u16> = value
                            .chunks_exact(2)
                            .map(|c| u16::from_be_bytes([c[0], c[1]]))
                            .collect();
                        String::from_utf16(&units).ok()
                    }
                    _ => None,
                });
            }
        }
        Ok(None)
    }

    /// The DNS names of the subjectAltName extension, in order.
    pub fn dns_names(cert: &[u8]) -> Result<Vec<String>, DerError> {
        let mut rest = tlv(tbs_from_subject(cert)?)?.2; // subject
        rest = tlv(rest)?.2; // subjectPublicKeyInfo
        let mut names = Vec::new();
        while !rest.is_empty() {
            let (tag, content, r) = tlv(rest)?;
            rest = r;
            if tag != EXTENSIONS {
                continue;
            }
            let (mut exts, _) = expect(content, SEQUENCE)?;
            while !exts.is_empty() {
                let (ext, r) = expect(exts, SEQUENCE)?;
                exts = r;
                let (oid, mut ext) = expect(ext, OID)?;
                if oid != OID_SUBJECT_ALT_NAME {
                    continue;
                }
                let (tag, _, r) = tlv(ext)?;
                if tag == BOOLEAN {
                    ext = r;
                }
                let (octets, _) = expect(ext, OCTET_STRING)?;
                let (mut general_names, _) = expect(octets, SEQUENCE)?;
                while !general_names.is_empty() {
                    let (tag, value, r) = tlv(general_names)?;
                    general_names = r;
                    if tag == DNS_NAME {
                        let name = std::str::from_utf8(value)
                            .map_err(|_| DerError("DNS name not text"))?;
                        names.push(name.to_string());
                    }
                }
            }
        }
        Ok(names)
    }

    /// The arcs of an OID's content bytes.
    pub fn oid_arcs(oid: &[u8]) -> Option<Vec<u64>> {
        let mut arcs = Vec::new();
        let mut v: u64 = 0;
        for (i, &b) in oid.iter().enumerate() {
            if v > (u64::MAX >> 7) {
                return None;
            }
            v = (v << 7) | u64::from(b & 0x7f);
            if b & 0x80 == 0 {
                if arcs.is_empty() {
                    let first = (v / 40).min(2);
                    arcs.push(first);
                    arcs.push(v - first * 40);
                } else {
                    arcs.push(v);
                }
                v = 0;
            } else if i == oid.len() - 1 {
                return None;
            }
        }
        (!arcs.is_empty()).then_some(arcs)
    }
}

fn write_file(path: &Path, contents: &str, private: bool, force: bool) -> Result<(), CertError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| CertError::Io {
        path: path.display().to_string(),
        source,
    };
    if !force && path.exists() {
        return Err(CertError::Usage(format!(
            "{} exists (use --force to replace it)",
            path.display()
        )));
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(&tmp)
        .map_err(io)?;
    f.write_all(contents.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// Write a pair as `DIR/NAME.pem` and `DIR/NAME-key.pem` (0600).
pub fn write_pair(dir: &Path, name: &str, pair: &CertPair, force: bool) -> Result<(), CertError> {
    std::fs::create_dir_all(dir).map_err(|source| CertError::Io {
        path: dir.display().to_string(),
        source,
    })?;
    write_file(
        &dir.join(format!("{name}-key.pem")),
        &pair.key_pem,
        true,
        force,
    )?;
    write_file(
        &dir.join(format!("{name}.pem")),
        &pair.cert_pem,
        false,
        force,
    )
}

/// Read `DIR/NAME.pem` and `DIR/NAME-key.pem`.
pub fn read_pair(dir: &Path, name: &str) -> Result<CertPair, CertError> {
    let read = |p: PathBuf| {
        std::fs::read_to_string(&p).map_err(|source| CertError::Io {
            path: p.display().to_string(),
            source,
        })
    };
    Ok(CertPair {
        cert_pem: read(dir.join(format!("{name}.pem")))?,
        key_pem: read(dir.join(format!("{name}-key.pem")))?,
    })
}

const USAGE: &str = "usage:
  ctw-collector certs init-ca --dir DIR [--cn NAME] [--days N] [--force]
  ctw-collector certs issue --dir DIR --name NAME --kind server|client
                            [--dns a,b] [--ip 1.2.3.4,...] [--days N] [--force]
init-ca writes DIR/ca.pem and DIR/ca-key.pem (default 3650 days).
issue writes DIR/NAME.pem and DIR/NAME-key.pem signed by the CA in DIR
(default 365 days). A client certificate's first DNS name is NAME, the
agent's node name.";

/// `ctw-collector certs <init-ca|issue> ...` (`args` without `certs`).
pub fn cli(args: &[String]) -> anyhow::Result<()> {
    let (cmd, rest) = args
        .split_first()
        .ok_or_else(|| anyhow::anyhow!("{USAGE}"))?;
    let mut dir: Option<PathBuf> = None;
    let mut name: Option<String> = None;
    let mut cn: Option<String> = None;
    let mut kind: Option<CertKind> = None;
    let mut dns = Vec::new();
    let mut ips = Vec::new();
    let mut days: Option<u32> = None;
    let mut force = false;
    let mut it = rest.iter();
    while let Some(flag) = it.next() {
        if flag == "--force" {
            force = true;
            continue;
        }
        if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            return Ok(());
        }
        let value = it
            .next()
            .ok_or_else(|| anyhow::anyhow!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--dir" => dir = Some(PathBuf::from(value)),
            "--name" => name = Some(value.clone()),
            "--cn" => cn = Some(value.clone()),
            "--kind" => {
                kind = Some(match value.as_str() {
                    "server" => CertKind::Server,
                    "client" => CertKind::Client,
                    v => anyhow::bail!("--kind: expected server or client, got {v:?}"),
                })
            }
            "--dns" => dns.extend(
                value
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string),
            ),
            "--ip" => {
                for v in value.split(',').filter(|s| !s.is_empty()) {
                    ips.push(
                        v.parse::<IpAddr>()
                            .map_err(|_| anyhow::anyhow!("--ip: not an IP address: {v:?}"))?,
                    );
                }
            }
            "--days" => {
                days = Some(
                    value
                        .parse()
                        .ok()
                        .filter(|d| (1..=36_500).contains(d))
                        .ok_or_else(|| {
                            anyhow::anyhow!("--days: expected 1-36500, got {value:?}")
                        })?,
                )
            }
            f => anyhow::bail!("unknown option {f}\n{USAGE}"),
        }
    }
    let dir = dir.ok_or_else(|| anyhow::anyhow!("--dir is required\n{USAGE}"))?;
    match cmd.as_str() {
        "init-ca" => {
            let ca = generate_ca(
                cn.as_deref().unwrap_or("conntrack-watch CA"),
                days.unwrap_or(3650),
            )?;
            write_pair(&dir, "ca", &ca, force)?;
            println!("wrote {0}/ca.pem and {0}/ca-key.pem", dir.display());
        }
        "issue" => {
            let name = name.ok_or_else(|| anyhow::anyhow!("--name is required\n{USAGE}"))?;
            if name == "ca" {
                anyhow::bail!("--name: \"ca\" is the CA's file name");
            }
            let kind = kind.ok_or_else(|| anyhow::anyhow!("--kind is required\n{USAGE}"))?;
            let ca = read_pair(&dir, "ca")?;
            let spec = IssueSpec {
                name: name.clone(),
                kind,
                dns,
                ips,
                days: days.unwrap_or(365),
            };
            let pair = issue(&ca, &spec)?;
            write_pair(&dir, &name, &pair, force)?;
            println!("wrote {0}/{name}.pem and {0}/{name}-key.pem", dir.display());
        }
        c => anyhow::bail!("unknown certs command {c:?}\n{USAGE}"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn der_of(pem: &str) -> Vec<u8> {
        first_cert_der(pem).unwrap()
    }

    #[test]
    fn client_node_name_is_the_first_dns_san() {
        let ca = generate_ca("test CA", 10).unwrap();
        let mut spec = IssueSpec::client("node-a");
        spec.dns = vec!["other.example".into()];
        let c = issue(&ca, &spec).unwrap();
        let der = der_of(&c.cert_pem);
        assert_eq!(
            der::dns_names(&der).unwrap(),
            vec!["node-a".to_string(), "other.example".to_string()]
        );
        assert_eq!(node_name(&der).as_deref(), Some("node-a"));
        assert_eq!(der::common_name(&der).unwrap().as_deref(), Some("node-a"));
    }

    #[test]
    fn without_dns_san_the_cn_is_the_node_name() {
        let ca = generate_ca("test CA", 10).unwrap();
        let der = der_of(&ca.cert_pem);
        assert!(der::dns_names(&der).unwrap().is_empty());
        assert_eq!(node_name(&der).as_deref(), Some("test CA"));
    }

    #[test]
    fn issued_certificate_names_the_ca_subject_as_issuer() {
        let ca = generate_ca("issuer check", 10).unwrap();
        let c = issue(&ca, &IssueSpec::server("collector", &[], &[])).unwrap();
        let ca_der = der_of(&ca.cert_pem);
        let ca_subject = der::subject_attributes(&ca_der).unwrap();
        assert_eq!(ca_subject.len(), 2);
        // Re-parsing the subject gives back the same DN for a second issue.
        assert!(subject_dn(&ca_der).is_ok());
        assert!(!c.cert_pem.is_empty());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bytes in [
            &b""[..],
            &[0x30],
            &[0x30, 0x84, 0xff, 0xff, 0xff, 0xff],
            &[0x30, 0x03, 0x30, 0x01],
            &[0x1f, 0x00],
        ] {
            assert!(der::dns_names(bytes).is_err());
            assert!(node_name(bytes).is_none());
        }
        let der = der_of(&generate_ca("x", 1).unwrap().cert_pem);
        for cut in 0..der.len() {
            let _ = node_name(&der[..cut]);
        }
    }

    #[test]
    fn oid_arcs_decode() {
        assert_eq!(der::oid_arcs(&[0x55, 0x04, 0x03]), Some(vec![2, 5, 4, 3]));
        assert_eq!(
            der::oid_arcs(&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d]),
            Some(vec![1, 2, 840, 113549])
        );
        assert_eq!(der::oid_arcs(&[0x86]), None);
    }

    #[test]
    fn cli_writes_ca_and_certs_with_private_keys() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("ctw-certs-cli-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let d = dir.display().to_string();
        let args = |s: &str| -> Vec<String> { s.split(' ').map(str::to_string).collect() };
        cli(&args(&format!("init-ca --dir {d} --days 30"))).unwrap();
        assert!(
            cli(&args(&format!("init-ca --dir {d}"))).is_err(),
            "no overwrite"
        );
        cli(&args(&format!(
            "issue --dir {d} --name collector --kind server --dns ctw.example,localhost --ip 127.0.0.1"
        )))
        .unwrap();
        cli(&args(&format!(
            "issue --dir {d} --name node-1 --kind client"
        )))
        .unwrap();
        let e = cli(&args(&format!("issue --dir {d} --name x --kind both")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--kind"), "{e}");
        for key in ["ca-key.pem", "collector-key.pem", "node-1-key.pem"] {
            let mode = std::fs::metadata(dir.join(key))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }
        let client = read_pair(&dir, "node-1").unwrap();
        assert_eq!(
            node_name(&der_of(&client.cert_pem)).as_deref(),
            Some("node-1")
        );
        let server = read_pair(&dir, "collector").unwrap();
        assert_eq!(
            der::dns_names(&der_of(&server.cert_pem)).unwrap(),
            vec!["ctw.example".to_string(), "localhost".to_string()]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
