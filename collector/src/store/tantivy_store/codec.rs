//! Binary encoding of a [`StoredBatch`] as a write-ahead-log payload.
//!
//! Layout (little endian): version `u8`, node and boot id (`u16` length +
//! UTF-8), seq `u64`, record count `u32`, then each record field by field.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ctw_common::{ConnRecord, Counters, EventKind, Protocol, TcpState, Tuple};

use super::super::StoredBatch;

const VERSION: u8 = 1;

pub(super) fn encode(b: &StoredBatch, out: &mut Vec<u8>) {
    out.push(VERSION);
    put_str(out, &b.node);
    put_str(out, &b.boot_id);
    out.extend_from_slice(&b.seq.to_le_bytes());
    out.extend_from_slice(&(b.records.len() as u32).to_le_bytes());
    for r in &b.records {
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
}

/// 0 for `None`, else 1 + the kernel's value.
pub(super) fn tcp_state_code(s: Option<TcpState>) -> u16 {
    let v = match s {
        None => return 0,
        Some(TcpState::None) => 0,
        Some(TcpState::SynSent) => 1,
        Some(TcpState::SynRecv) => 2,
        Some(TcpState::Established) => 3,
        Some(TcpState::FinWait) => 4,
        Some(TcpState::CloseWait) => 5,
        Some(TcpState::LastAck) => 6,
        Some(TcpState::TimeWait) => 7,
        Some(TcpState::Close) => 8,
        Some(TcpState::SynSent2) => 9,
        Some(TcpState::Other(v)) => v,
    };
    1 + v as u16
}

pub(super) fn tcp_state_from_code(c: u16) -> Option<TcpState> {
    (c != 0).then(|| TcpState::from_kernel((c - 1) as u8))
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let b = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    out.extend_from_slice(&(b.len() as u16).to_le_bytes());
    out.extend_from_slice(b);
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

struct Reader<'a> {
    data: &'a [u8],
    off: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.off.checked_add(n).filter(|&e| e <= self.data.len());
        let end = end.ok_or_else(|| format!("payload ends early at byte {}", self.off))?;
        let s = &self.data[self.off..end];
        self.off = end;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(self.arr()?))
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    fn string(&mut self) -> Result<String, String> {
        let n = self.u16()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|e| e.to_string())
    }
    fn ip(&mut self) -> Result<IpAddr, String> {
        match self.u8()? {
            4 => Ok(IpAddr::V4(Ipv4Addr::from(self.arr::<4>()?))),
            6 => Ok(IpAddr::V6(Ipv6Addr::from(self.arr::<16>()?))),
            t => Err(format!("bad address tag {t}")),
        }
    }
    fn tuple(&mut self) -> Result<Tuple, String> {
        Ok(Tuple {
            src: self.ip()?,
            dst: self.ip()?,
            src_port: self.u16()?,
            dst_port: self.u16()?,
        })
    }
    fn opt_u64(&mut self) -> Result<Option<u64>, String> {
        Ok(match self.u8()? {
            0 => None,
            _ => Some(self.u64()?),
        })
    }
    fn counters(&mut self) -> Result<Option<Counters>, String> {
        Ok(match self.u8()? {
            0 => None,
            _ => Some(Counters {
                packets: self.u64()?,
                bytes: self.u64()?,
            }),
        })
    }
}

pub(super) fn decode(data: &[u8]) -> Result<StoredBatch, String> {
    let mut r = Reader { data, off: 0 };
    let v = r.u8()?;
    if v != VERSION {
        return Err(format!("unknown entry version {v}"));
    }
    let node = r.string()?;
    let boot_id = r.string()?;
    let seq = r.u64()?;
    let n = r.u32()? as usize;
    let mut records = Vec::with_capacity(n.min(1 << 20));
    for _ in 0..n {
        let kind = match r.u8()? {
            0 => EventKind::New,
            1 => EventKind::Destroy,
            2 => EventKind::Recovered,
            k => return Err(format!("bad event kind {k}")),
        };
        let event_ns = r.u64()?;
        let p = r.u8()?;
        let protocol = Protocol::from_number(p).ok_or_else(|| format!("bad protocol {p}"))?;
        records.push(ConnRecord {
            kind,
            event_ns,
            protocol,
            orig: r.tuple()?,
            reply: r.tuple()?,
            id: r.u32()?,
            zone: r.u16()?,
            mark: r.u32()?,
            status: r.u32()?,
            tcp_state: tcp_state_from_code(r.u16()?),
            tcp_flags_orig: r.u8()?,
            tcp_flags_reply: r.u8()?,
            start_ns: r.opt_u64()?,
            stop_ns: r.opt_u64()?,
            counters_orig: r.counters()?,
            counters_reply: r.counters()?,
        });
    }
    if r.off != data.len() {
        return Err(format!("{} trailing bytes", data.len() - r.off));
    }
    Ok(StoredBatch {
        node,
        boot_id,
        seq,
        records,
    })
}
