//! Packed records: the compact binary form of a batch's records that agents
//! send in `RecordBatch.packed`, and the record layout of the collector's
//! write-ahead log.
//!
//! Decoding one protobuf `Record` per connection cost the collector about a
//! sixth of its ingest CPU (a message per record and per tuple, four
//! address byte strings allocated and freed). A packed batch is one byte
//! string decoded field by field with no allocation but the output vector.
//!
//! Layout (little endian): `count: u32`, then `count` records, each its
//! length `u8` and then its fields: kind `u8` (0 NEW, 1 DESTROY,
//! 2 recovered), event_ns `u64`, protocol `u8`,
//! orig and reply tuples (src address, dst address as tag `u8` 4 or 6 +
//! 4 or 16 bytes; src port, dst port `u16`), id `u32`, zone `u16`, mark
//! `u32`, status `u32`, TCP state `u16` (0 none, else 1 + the kernel's
//! value), TCP flags orig and reply `u8`, start_ns and stop_ns (`u8` 0, or
//! 1 + `u64`), orig and reply counters (`u8` 0, or 1 + packets `u64` +
//! bytes `u64`).
//!
//! The length frames each record, so a record that does not decode costs
//! only itself, and bytes after the fields a reader knows (fields that a
//! later version appends) are skipped: a collector still reads the batches
//! of agents upgraded before it. Only a length that runs past the end of the
//! data ends a batch early.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ctw_common::{ConnRecord, Counters, EventKind, Protocol, TcpState, Tuple};

use crate::ConvertError;

/// Smallest encoded record (length, IPv4, no optional fields): bounds the
/// records a byte string can claim.
const MIN_RECORD_BYTES: usize = 1 + 1 + 8 + 1 + 2 * (5 + 5 + 4) + 4 + 2 + 4 + 4 + 2 + 2 + 4;

/// Largest record body (IPv6, every optional field): fits its `u8` length.
const MAX_BODY_BYTES: usize = 1 + 8 + 1 + 2 * (17 + 17 + 4) + 4 + 2 + 4 + 4 + 2 + 2 + 18 + 34;
const _: () = assert!(MAX_BODY_BYTES <= u8::MAX as usize);

/// Append `records` as a packed batch.
pub fn encode(records: &[ConnRecord], out: &mut Vec<u8>) {
    out.extend_from_slice(&(records.len() as u32).to_le_bytes());
    for r in records {
        encode_record(r, out);
    }
}

/// Builds a packed batch one record at a time.
#[derive(Debug, Clone, Default)]
pub struct Packer {
    buf: Vec<u8>,
    count: u32,
}

impl Packer {
    pub fn push(&mut self, r: &ConnRecord) {
        if self.buf.is_empty() {
            self.buf.extend_from_slice(&[0; 4]);
        }
        encode_record(r, &mut self.buf);
        self.count += 1;
    }

    pub fn len(&self) -> usize {
        self.count as usize
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Encoded size so far.
    pub fn bytes(&self) -> usize {
        self.buf.len()
    }

    /// The packed batch (empty when no record was pushed).
    pub fn finish(mut self) -> Vec<u8> {
        if let Some(head) = self.buf.get_mut(..4) {
            head.copy_from_slice(&self.count.to_le_bytes());
        }
        self.buf
    }
}

/// Records of a packed batch; records that cannot be decoded are counted,
/// not returned.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Unpacked {
    pub records: Vec<ConnRecord>,
    /// Records (or trailing bytes) that could not be decoded.
    pub errors: u64,
    pub first_error: Option<String>,
}

/// Decode a packed batch. A record that does not decode counts as one
/// error; a record length past the end of the data counts that record and
/// the ones after it.
pub fn decode(data: &[u8]) -> Unpacked {
    let mut out = Unpacked::default();
    let mut r = Reader::new(data);
    let count = match r.u32() {
        Ok(c) => c as usize,
        Err(e) => {
            out.errors = 1;
            out.first_error = Some(e.to_string());
            return out;
        }
    };
    out.records
        .reserve(count.min(data.len() / MIN_RECORD_BYTES + 1));
    for i in 0..count {
        let body = match r.u8().and_then(|n| r.take(n.into())) {
            Ok(body) => body,
            Err(e) => {
                out.errors += (count - i) as u64;
                out.first_error.get_or_insert(format!("record {i}: {e}"));
                return out;
            }
        };
        // Bytes after the known fields are a later version's: skipped.
        match Reader::new(body).record() {
            Ok(rec) => out.records.push(rec),
            Err(e) => {
                out.errors += 1;
                out.first_error.get_or_insert(format!("record {i}: {e}"));
            }
        }
    }
    if !r.at_end() {
        out.errors += 1;
        out.first_error.get_or_insert(format!(
            "{} bytes after the last record",
            data.len() - r.off
        ));
    }
    out
}

/// Append one record: its length, then its fields.
pub fn encode_record(r: &ConnRecord, out: &mut Vec<u8>) {
    let at = out.len();
    out.push(0);
    encode_fields(r, out);
    // At most MAX_BODY_BYTES (asserted at compile time above).
    out[at] = (out.len() - at - 1) as u8;
}

fn encode_fields(r: &ConnRecord, out: &mut Vec<u8>) {
    out.push(match r.kind {
        EventKind::New => 0,
        EventKind::Destroy => 1,
        EventKind::Recovered => 2,
    });
    out.extend_from_slice(&r.event_ns.to_le_bytes());
    out.push(r.protocol.number());
    put_tuple(out, &r.orig);
    put_tuple(out, &r.reply);
    out.extend_from_slice(&r.id.to_le_bytes());
    out.extend_from_slice(&r.zone.to_le_bytes());
    out.extend_from_slice(&r.mark.to_le_bytes());
    out.extend_from_slice(&r.status.to_le_bytes());
    out.extend_from_slice(&tcp_state_code(r.tcp_state).to_le_bytes());
    out.push(r.tcp_flags_orig);
    out.push(r.tcp_flags_reply);
    put_opt_u64(out, r.start_ns);
    put_opt_u64(out, r.stop_ns);
    put_counters(out, r.counters_orig);
    put_counters(out, r.counters_reply);
}

/// 0 for `None`, else 1 + the kernel's value.
pub fn tcp_state_code(s: Option<TcpState>) -> u16 {
    s.map_or(0, |s| 1 + u16::from(s.to_kernel()))
}

pub fn tcp_state_from_code(c: u16) -> Option<TcpState> {
    // Codes above 256 cannot come from a kernel value; they read as the
    // kernel value's low byte.
    (c != 0).then(|| TcpState::from_kernel((c - 1) as u8))
}

/// A length-prefixed (`u16`) UTF-8 string, cut at 65,535 bytes.
pub fn put_str(out: &mut Vec<u8>, s: &str) {
    let mut n = s.len().min(u16::MAX as usize);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    out.extend_from_slice(&(n as u16).to_le_bytes());
    out.extend_from_slice(&s.as_bytes()[..n]);
}

fn put_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v) => {
            out.push(4);
            out.extend_from_slice(&v.octets());
        }
        IpAddr::V6(v) => {
            out.push(6);
            out.extend_from_slice(&v.octets());
        }
    }
}

fn put_tuple(out: &mut Vec<u8>, t: &Tuple) {
    put_ip(out, t.src);
    put_ip(out, t.dst);
    out.extend_from_slice(&t.src_port.to_le_bytes());
    out.extend_from_slice(&t.dst_port.to_le_bytes());
}

fn put_opt_u64(out: &mut Vec<u8>, v: Option<u64>) {
    match v {
        None => out.push(0),
        Some(v) => {
            out.push(1);
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
}

fn put_counters(out: &mut Vec<u8>, c: Option<Counters>) {
    match c {
        None => out.push(0),
        Some(c) => {
            out.push(1);
            out.extend_from_slice(&c.packets.to_le_bytes());
            out.extend_from_slice(&c.bytes.to_le_bytes());
        }
    }
}

fn invalid(field: &'static str, message: String) -> ConvertError {
    ConvertError::Invalid { field, message }
}

/// Reads packed values; every read checks the length.
#[derive(Debug)]
pub struct Reader<'a> {
    data: &'a [u8],
    off: usize,
}

impl<'a> Reader<'a> {
    pub fn new(data: &'a [u8]) -> Reader<'a> {
        Reader { data, off: 0 }
    }

    pub fn at_end(&self) -> bool {
        self.off == self.data.len()
    }

    /// The bytes not read yet.
    pub fn rest(&self) -> &'a [u8] {
        &self.data[self.off..]
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ConvertError> {
        let end = self.off.checked_add(n).filter(|&e| e <= self.data.len());
        let end =
            end.ok_or_else(|| invalid("packed", format!("ends early at byte {}", self.off)))?;
        let s = &self.data[self.off..end];
        self.off = end;
        Ok(s)
    }

    fn arr<const N: usize>(&mut self) -> Result<[u8; N], ConvertError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    pub fn u8(&mut self) -> Result<u8, ConvertError> {
        Ok(self.take(1)?[0])
    }

    pub fn u16(&mut self) -> Result<u16, ConvertError> {
        Ok(u16::from_le_bytes(self.arr()?))
    }

    pub fn u32(&mut self) -> Result<u32, ConvertError> {
        Ok(u32::from_le_bytes(self.arr()?))
    }

    pub fn u64(&mut self) -> Result<u64, ConvertError> {
        Ok(u64::from_le_bytes(self.arr()?))
    }

    /// A string written by [`put_str`].
    pub fn string(&mut self) -> Result<String, ConvertError> {
        let n = self.u16()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|e| invalid("string", e.to_string()))
    }

    fn ip(&mut self) -> Result<IpAddr, ConvertError> {
        match self.u8()? {
            4 => Ok(IpAddr::V4(Ipv4Addr::from(self.arr::<4>()?))),
            6 => Ok(IpAddr::V6(Ipv6Addr::from(self.arr::<16>()?))),
            t => Err(invalid("tuple", format!("bad address tag {t}"))),
        }
    }

    fn tuple(&mut self) -> Result<Tuple, ConvertError> {
        let (src, dst) = (self.ip()?, self.ip()?);
        if src.is_ipv4() != dst.is_ipv4() {
            return Err(invalid(
                "tuple",
                "src and dst of different IP versions".into(),
            ));
        }
        Ok(Tuple {
            src,
            dst,
            src_port: self.u16()?,
            dst_port: self.u16()?,
        })
    }

    fn opt_u64(&mut self) -> Result<Option<u64>, ConvertError> {
        Ok(match self.u8()? {
            0 => None,
            _ => Some(self.u64()?),
        })
    }

    fn counters(&mut self) -> Result<Option<Counters>, ConvertError> {
        Ok(match self.u8()? {
            0 => None,
            _ => Some(Counters {
                packets: self.u64()?,
                bytes: self.u64()?,
            }),
        })
    }

    /// The fields of one record written by [`encode_record`].
    fn record(&mut self) -> Result<ConnRecord, ConvertError> {
        let kind = match self.u8()? {
            0 => EventKind::New,
            1 => EventKind::Destroy,
            2 => EventKind::Recovered,
            k => return Err(invalid("kind", format!("unknown kind {k}"))),
        };
        let event_ns = self.u64()?;
        let p = self.u8()?;
        let protocol = Protocol::from_number(p)
            .ok_or_else(|| invalid("protocol", format!("unsupported protocol number {p}")))?;
        Ok(ConnRecord {
            kind,
            event_ns,
            protocol,
            orig: self.tuple()?,
            reply: self.tuple()?,
            id: self.u32()?,
            zone: self.u16()?,
            mark: self.u32()?,
            status: self.u32()?,
            tcp_state: tcp_state_from_code(self.u16()?),
            tcp_flags_orig: self.u8()?,
            tcp_flags_reply: self.u8()?,
            start_ns: self.opt_u64()?,
            stop_ns: self.opt_u64()?,
            counters_orig: self.counters()?,
            counters_reply: self.counters()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_record_fits_its_length_byte() {
        let c = Some(Counters {
            packets: u64::MAX,
            bytes: u64::MAX,
        });
        let v6 = IpAddr::V6(Ipv6Addr::new(0xfd00, 0x198, 0x18, 0, 0, 0, 0, 1));
        let t = Tuple {
            src: v6,
            dst: v6,
            src_port: 1,
            dst_port: 2,
        };
        let r = ConnRecord {
            kind: EventKind::Destroy,
            event_ns: 1,
            protocol: Protocol::Tcp,
            orig: t,
            reply: t,
            id: 1,
            zone: 1,
            mark: 1,
            status: 1,
            tcp_state: Some(TcpState::Other(200)),
            tcp_flags_orig: 1,
            tcp_flags_reply: 1,
            start_ns: Some(1),
            stop_ns: Some(2),
            counters_orig: c,
            counters_reply: c,
        };
        let mut out = Vec::new();
        encode_record(&r, &mut out);
        assert_eq!(out.len(), 1 + MAX_BODY_BYTES);
        assert_eq!(out[0] as usize, MAX_BODY_BYTES);
    }
}
