//! The index schema, and conversion of a record to a document and back from
//! fast fields (nothing is stored in the doc store).
//!
//! Fields (all fast unless noted):
//! - `node`: raw string, indexed (doc ids only, no norms).
//! - `t`: event time, date with ns precision, fast only: range queries on a
//!   fast date field scan its column (tantivy picks that path for fast
//!   fields), and partitions already prune by time. An indexed date (one
//!   term per distinct second) cost 2-13 bytes per record and a third of the
//!   indexing CPU in measurements.
//! - `src_ip`, `dst_ip`, `snat_ip` (reply dst): IP fields, indexed.
//!   `rsrc_ip` (reply src): indexed, present only when it differs from
//!   `dst_ip` (DNAT), so it costs nothing without DNAT.
//! - `src_port`, `snat_port` (reply dst port): u64, indexed.
//!   `dst_port`: u64, indexed only; its value is kept in `shape`.
//! - `id`: conntrack id.
//! - `shape`: dictionary-encoded bytes of the low-cardinality fields (kind,
//!   protocol, dst port, reply src port, zone, mark, status, TCP state and
//!   flags, IPv4-mapped-IPv6 markers). A dictionary column costs log2(number
//!   of distinct shapes) bits per record, where separate bit-packed u64
//!   columns would cost the bit width of each field's range.
//! - `start_d` (non-DESTROY) / `dstart_d` (DESTROY): event time - start time,
//!   `stop_d`: event time - stop time, only when known (i64).
//! - `po`, `bo`, `pr`, `br`: packets/bytes per direction, only when known.

use std::net::{IpAddr, Ipv6Addr};

use ctw_common::{ConnRecord, Counters, EventKind, Protocol, Tuple};
use tantivy::columnar::{BytesColumn, Column, StrColumn};
use tantivy::schema::{
    BytesOptions, DateOptions, DateTimePrecision, Field, IndexRecordOption, IpAddrOptions,
    NumericOptions, Schema, TextFieldIndexing, TextOptions,
};
use tantivy::{DateTime, DocId, SegmentReader, TantivyDocument};

use super::codec::{tcp_state_code, tcp_state_from_code};

#[derive(Debug, Clone)]
pub(super) struct Fields {
    pub(super) schema: Schema,
    pub(super) node: Field,
    pub(super) t: Field,
    pub(super) src_ip: Field,
    pub(super) dst_ip: Field,
    pub(super) snat_ip: Field,
    pub(super) rsrc_ip: Field,
    pub(super) src_port: Field,
    pub(super) dst_port: Field,
    pub(super) snat_port: Field,
    id: Field,
    shape: Field,
    start_d: Field,
    dstart_d: Field,
    stop_d: Field,
    po: Field,
    bo: Field,
    pr: Field,
    br: Field,
}

impl Fields {
    pub(super) fn new() -> Fields {
        let mut b = Schema::builder();
        let ip = IpAddrOptions::default().set_indexed().set_fast();
        let port = NumericOptions::default().set_indexed().set_fast();
        let fast = NumericOptions::default().set_fast();
        let node = b.add_text_field(
            "node",
            TextOptions::default()
                .set_indexing_options(
                    TextFieldIndexing::default()
                        .set_tokenizer("raw")
                        .set_fieldnorms(false)
                        .set_index_option(IndexRecordOption::Basic),
                )
                .set_fast("raw"),
        );
        let t = b.add_date_field(
            "t",
            DateOptions::default()
                .set_fast()
                .set_precision(DateTimePrecision::Nanoseconds),
        );
        let src_ip = b.add_ip_addr_field("src_ip", ip.clone());
        let dst_ip = b.add_ip_addr_field("dst_ip", ip.clone());
        let snat_ip = b.add_ip_addr_field("snat_ip", ip.clone());
        let rsrc_ip = b.add_ip_addr_field("rsrc_ip", ip);
        let src_port = b.add_u64_field("src_port", port.clone());
        let dst_port = b.add_u64_field("dst_port", NumericOptions::default().set_indexed());
        let snat_port = b.add_u64_field("snat_port", port);
        let id = b.add_u64_field("id", fast.clone());
        let shape = b.add_bytes_field("shape", BytesOptions::default().set_fast());
        let start_d = b.add_i64_field("start_d", fast.clone());
        let dstart_d = b.add_i64_field("dstart_d", fast.clone());
        let stop_d = b.add_i64_field("stop_d", fast.clone());
        let po = b.add_u64_field("po", fast.clone());
        let bo = b.add_u64_field("bo", fast.clone());
        let pr = b.add_u64_field("pr", fast.clone());
        let br = b.add_u64_field("br", fast);
        Fields {
            schema: b.build(),
            node,
            t,
            src_ip,
            dst_ip,
            snat_ip,
            rsrc_ip,
            src_port,
            dst_port,
            snat_port,
            id,
            shape,
            start_d,
            dstart_d,
            stop_d,
            po,
            bo,
            pr,
            br,
        }
    }

    pub(super) fn doc(&self, node: &str, r: &ConnRecord) -> TantivyDocument {
        let mut d = TantivyDocument::new();
        d.add_text(self.node, node);
        d.add_date(self.t, DateTime::from_timestamp_nanos(r.event_ns as i64));
        d.add_ip_addr(self.src_ip, to_v6(r.orig.src));
        d.add_ip_addr(self.dst_ip, to_v6(r.orig.dst));
        d.add_ip_addr(self.snat_ip, to_v6(r.reply.dst));
        if r.reply.src != r.orig.dst {
            d.add_ip_addr(self.rsrc_ip, to_v6(r.reply.src));
        }
        d.add_u64(self.src_port, r.orig.src_port as u64);
        d.add_u64(self.dst_port, r.orig.dst_port as u64);
        d.add_u64(self.snat_port, r.reply.dst_port as u64);
        d.add_u64(self.id, r.id as u64);
        d.add_bytes(self.shape, &shape(r));
        let delta = |x: u64| r.event_ns.wrapping_sub(x) as i64;
        if let Some(s) = r.start_ns {
            let f = if r.kind == EventKind::Destroy {
                self.dstart_d
            } else {
                self.start_d
            };
            d.add_i64(f, delta(s));
        }
        if let Some(s) = r.stop_ns {
            d.add_i64(self.stop_d, delta(s));
        }
        if let Some(c) = r.counters_orig {
            d.add_u64(self.po, c.packets);
            d.add_u64(self.bo, c.bytes);
        }
        if let Some(c) = r.counters_reply {
            d.add_u64(self.pr, c.packets);
            d.add_u64(self.br, c.bytes);
        }
        d
    }
}

pub(super) fn to_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v) => v.to_ipv6_mapped(),
        IpAddr::V6(v) => v,
    }
}

fn from_v6(v: Ipv6Addr, native_v6: bool) -> IpAddr {
    match v.to_ipv4_mapped() {
        Some(v4) if !native_v6 => IpAddr::V4(v4),
        _ => IpAddr::V6(v),
    }
}

/// An IPv6 address that tantivy would read back as IPv4 (`::ffff:a.b.c.d`).
fn mapped_v6(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v) if v.to_ipv4_mapped().is_some())
}

const SHAPE_LEN: usize = 22;

fn shape(r: &ConnRecord) -> [u8; SHAPE_LEN] {
    let mut s = [0u8; SHAPE_LEN];
    s[0] = match r.kind {
        EventKind::New => 0,
        EventKind::Destroy => 1,
        EventKind::Recovered => 2,
    };
    s[1] = r.protocol.number();
    s[2..4].copy_from_slice(&r.orig.dst_port.to_le_bytes());
    s[4..6].copy_from_slice(&r.reply.src_port.to_le_bytes());
    s[6..8].copy_from_slice(&r.zone.to_le_bytes());
    s[8..12].copy_from_slice(&r.mark.to_le_bytes());
    s[12..16].copy_from_slice(&r.status.to_le_bytes());
    s[16..18].copy_from_slice(&tcp_state_code(r.tcp_state).to_le_bytes());
    s[18] = r.tcp_flags_orig;
    s[19] = r.tcp_flags_reply;
    s[20] = mapped_v6(r.orig.src) as u8
        | (mapped_v6(r.orig.dst) as u8) << 1
        | (mapped_v6(r.reply.src) as u8) << 2
        | (mapped_v6(r.reply.dst) as u8) << 3;
    s
}

/// The fast-field columns of one segment, to rebuild records.
pub(super) struct SegmentColumns {
    node: StrColumn,
    node_cache: Vec<Option<String>>,
    t: Column<DateTime>,
    src_ip: Column<Ipv6Addr>,
    dst_ip: Column<Ipv6Addr>,
    snat_ip: Column<Ipv6Addr>,
    rsrc_ip: Column<Ipv6Addr>,
    src_port: Column<u64>,
    snat_port: Column<u64>,
    id: Column<u64>,
    shape: BytesColumn,
    shape_cache: Vec<Option<[u8; SHAPE_LEN]>>,
    start_d: Column<i64>,
    dstart_d: Column<i64>,
    stop_d: Column<i64>,
    po: Column<u64>,
    bo: Column<u64>,
    pr: Column<u64>,
    br: Column<u64>,
}

fn missing(name: &str) -> tantivy::TantivyError {
    tantivy::TantivyError::SchemaError(format!("fast field {name} missing"))
}

impl SegmentColumns {
    pub(super) fn open(seg: &SegmentReader) -> tantivy::Result<SegmentColumns> {
        let ff = seg.fast_fields();
        let node = ff.str("node")?.ok_or_else(|| missing("node"))?;
        let shape = ff.bytes("shape")?.ok_or_else(|| missing("shape"))?;
        Ok(SegmentColumns {
            node_cache: vec![None; node.num_terms()],
            node,
            t: ff.date("t")?,
            src_ip: ff.ip_addr("src_ip")?,
            dst_ip: ff.ip_addr("dst_ip")?,
            snat_ip: ff.ip_addr("snat_ip")?,
            rsrc_ip: ff.ip_addr("rsrc_ip")?,
            src_port: ff.u64("src_port")?,
            snat_port: ff.u64("snat_port")?,
            id: ff.u64("id")?,
            shape_cache: vec![None; shape.num_terms()],
            shape,
            start_d: ff.i64("start_d")?,
            dstart_d: ff.i64("dstart_d")?,
            stop_d: ff.i64("stop_d")?,
            po: ff.u64("po")?,
            bo: ff.u64("bo")?,
            pr: ff.u64("pr")?,
            br: ff.u64("br")?,
        })
    }

    /// Node name and record of `doc`; `None` when a required column has no
    /// value (not written by this store).
    pub(super) fn record(&mut self, doc: DocId) -> tantivy::Result<Option<(String, ConnRecord)>> {
        let Some(node_ord) = self.node.ords().first(doc) else {
            return Ok(None);
        };
        let slot = &mut self.node_cache[node_ord as usize];
        if slot.is_none() {
            let mut s = String::new();
            self.node.ord_to_str(node_ord, &mut s)?;
            *slot = Some(s);
        }
        let node = slot.clone().unwrap_or_default();
        let Some(shape_ord) = self.shape.ords().first(doc) else {
            return Ok(None);
        };
        let slot = &mut self.shape_cache[shape_ord as usize];
        if slot.is_none() {
            let mut b = Vec::new();
            self.shape.ord_to_bytes(shape_ord, &mut b)?;
            if b.len() != SHAPE_LEN {
                return Ok(None);
            }
            let mut a = [0u8; SHAPE_LEN];
            a.copy_from_slice(&b);
            *slot = Some(a);
        }
        let Some(s) = *slot else { return Ok(None) };
        let (Some(t), Some(src), Some(dst), Some(snat), Some(sport), Some(nport), Some(id)) = (
            self.t.first(doc),
            self.src_ip.first(doc),
            self.dst_ip.first(doc),
            self.snat_ip.first(doc),
            self.src_port.first(doc),
            self.snat_port.first(doc),
            self.id.first(doc),
        ) else {
            return Ok(None);
        };
        let kind = match s[0] {
            0 => EventKind::New,
            1 => EventKind::Destroy,
            _ => EventKind::Recovered,
        };
        let Some(protocol) = Protocol::from_number(s[1]) else {
            return Ok(None);
        };
        let u16_at = |i: usize| u16::from_le_bytes([s[i], s[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
        let v6 = s[20];
        let event_ns = t.into_timestamp_nanos() as u64;
        let undelta = |d: i64| event_ns.wrapping_sub(d as u64);
        let orig_dst = from_v6(dst, v6 & 2 != 0);
        let reply_src = match self.rsrc_ip.first(doc) {
            Some(v) => from_v6(v, v6 & 4 != 0),
            None => orig_dst,
        };
        let start_col = if kind == EventKind::Destroy {
            &self.dstart_d
        } else {
            &self.start_d
        };
        let counters = |p: &Column<u64>, b: &Column<u64>| match (p.first(doc), b.first(doc)) {
            (Some(packets), Some(bytes)) => Some(Counters { packets, bytes }),
            _ => None,
        };
        let r = ConnRecord {
            kind,
            event_ns,
            protocol,
            orig: Tuple {
                src: from_v6(src, v6 & 1 != 0),
                dst: orig_dst,
                src_port: sport as u16,
                dst_port: u16_at(2),
            },
            reply: Tuple {
                src: reply_src,
                dst: from_v6(snat, v6 & 8 != 0),
                src_port: u16_at(4),
                dst_port: nport as u16,
            },
            id: id as u32,
            zone: u16_at(6),
            mark: u32_at(8),
            status: u32_at(12),
            tcp_state: tcp_state_from_code(u16_at(16)),
            tcp_flags_orig: s[18],
            tcp_flags_reply: s[19],
            start_ns: start_col.first(doc).map(undelta),
            stop_ns: self.stop_d.first(doc).map(undelta),
            counters_orig: counters(&self.po, &self.bo),
            counters_reply: counters(&self.pr, &self.br),
        };
        Ok(Some((node, r)))
    }
}
