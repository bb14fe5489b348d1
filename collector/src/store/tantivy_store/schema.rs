//! The index schema, and conversion of a record to a document and back from
//! fast fields (nothing is stored in the doc store).
//!
//! Records arrive [normalized](super::super::normalize): times are whole
//! microseconds and there is no conntrack id.
//!
//! Fields (all fast unless noted):
//! - `node`: raw string, indexed (doc ids only, no norms).
//! - `t`: event time in microseconds, date, fast only: partitions prune by
//!   time, searches with a selective term check it per candidate, and
//!   others use a range query on the column. An indexed date (one term per
//!   distinct second) cost 2-13 bytes per record and a third of the indexing
//!   CPU in measurements.
//! - `src_ip`: IP field, indexed. `snat` (reply dst, the SNAT address): a
//!   dictionary-encoded bytes column (16 bytes, IPv6 form), not indexed: a
//!   node's records come in batches with one or a few SNAT addresses, so
//!   runs of equal ordinals cost ~0.1 byte per record where an IP column
//!   costs ~0.6, and a SNAT address alone (a node's) narrows little, so
//!   searches use the SNAT port bucket's postings and check the address per
//!   candidate (postings for it cost 0.3 byte and a term per record to
//!   index). `dst_ip`: the first 16 bytes of `shape` (a few service
//!   addresses). `rsrc_ip` (reply src): fast only, present only when it
//!   differs from `dst_ip` (DNAT), so it costs nothing without DNAT.
//! - `snat_port` (reply dst port): u64, fast only. `snat_bucket`: the SNAT
//!   port divided by 16 ([`snat_bucket`]), indexed only: searches by SNAT
//!   port lead with its postings and check the exact port per candidate.
//!   Postings of the exact port (up to 64,512 distinct terms per segment,
//!   each hit once every few thousand records) missed the CPU cache on
//!   most records, the largest single ingest cost. 4,032 buckets stay
//!   cached and their postings are denser (1.1-2.1 bytes per record less
//!   as ingested); a query checks 16 times as many candidates (p99 3.3 →
//!   10.9 ms at 100M records; BENCHMARKS.md §3). `src_port`: fast only
//!   (searches by pod port come with the pod address, whose postings lead;
//!   its postings cost ~2.5 bytes per record). The destination port is
//!   only in `shape`: its postings (a few services' ports, so each matches
//!   a large share of the records and narrows little) cost 0.8 byte per
//!   record and a tenth of the indexing CPU; searches with a pod address or
//!   SNAT port check it per candidate, others scan the time range.
//! - `shape`: dictionary-encoded bytes of the low-cardinality fields (kind,
//!   protocol, dst port, reply src port, zone, mark, status, TCP state and
//!   flags, IPv4-mapped-IPv6 markers). A dictionary column costs log2(number
//!   of distinct shapes) bits per record, where separate bit-packed u64
//!   columns would cost the bit width of each field's range.
//! - `start_d` (non-DESTROY) / `dstart_d` (DESTROY): event time - start time,
//!   `stop_d`: event time - stop time, in microseconds, only when known
//!   (i64) and not equal to the event time (a flag in `shape` says
//!   "start/stop = event time", the usual case for NEW / DESTROY records).
//! - `pk`, `bk`: packets / bytes of both directions, bits interleaved (orig
//!   on even bits), when both directions are known and every value fits 32
//!   bits (a flag in `shape`); else `po`, `bo`, `pr`, `br`: packets/bytes per
//!   direction, only when known.
//!
//! Nothing is stored in the doc store, but tantivy writes one: an empty
//! document costs a 1-byte header plus a 4-byte offset in its block. LZ4
//! cannot shrink that; the partitions use tantivy's zstd doc store, which
//! brings it to ~2 bytes per record.

use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;

use ctw_common::{ConnRecord, Counters, EventKind, Protocol, Tuple};
use tantivy::columnar::Column;
use tantivy::schema::document::{Document, ReferenceValue, ReferenceValueLeaf, Value};
use tantivy::schema::{
    BytesOptions, DateOptions, DateTimePrecision, Field, IpAddrOptions, NumericOptions, Schema,
    TextOptions,
};
use tantivy::{DateTime, DocId, SegmentReader};

use ctw_proto::packed::{tcp_state_code, tcp_state_from_code};

#[derive(Debug, Clone)]
pub(super) struct Fields {
    pub(super) schema: Schema,
    pub(super) node: Field,
    pub(super) t: Field,
    pub(super) src_ip: Field,
    pub(super) rsrc_ip: Field,
    pub(super) src_port: Field,
    pub(super) snat_port: Field,
    pub(super) snat_bucket: Field,
    pub(super) shape: Field,
    pub(super) snat: Field,
    start_d: Field,
    dstart_d: Field,
    stop_d: Field,
    po: Field,
    bo: Field,
    pr: Field,
    br: Field,
    pk: Field,
    bk: Field,
}

impl Fields {
    pub(super) fn new() -> Fields {
        let mut b = Schema::builder();
        let ip = IpAddrOptions::default().set_indexed().set_fast();
        let bucket = NumericOptions::default().set_indexed();
        let fast = NumericOptions::default().set_fast();
        let node = b.add_text_field("node", TextOptions::default().set_fast("raw"));
        let t = b.add_date_field(
            "t",
            DateOptions::default()
                .set_fast()
                .set_precision(DateTimePrecision::Microseconds),
        );
        let src_ip = b.add_ip_addr_field("src_ip", ip.clone());
        let rsrc_ip = b.add_ip_addr_field("rsrc_ip", IpAddrOptions::default().set_fast());
        let src_port = b.add_u64_field("src_port", fast.clone());
        let snat_port = b.add_u64_field("snat_port", fast.clone());
        let snat_bucket = b.add_u64_field("snat_bucket", bucket);
        let shape = b.add_bytes_field("shape", BytesOptions::default().set_fast());
        let snat = b.add_bytes_field("snat", BytesOptions::default().set_fast());
        let start_d = b.add_i64_field("start_d", fast.clone());
        let dstart_d = b.add_i64_field("dstart_d", fast.clone());
        let stop_d = b.add_i64_field("stop_d", fast.clone());
        let po = b.add_u64_field("po", fast.clone());
        let bo = b.add_u64_field("bo", fast.clone());
        let pr = b.add_u64_field("pr", fast.clone());
        let br = b.add_u64_field("br", fast.clone());
        let pk = b.add_u64_field("pk", fast.clone());
        let bk = b.add_u64_field("bk", fast);
        Fields {
            schema: b.build(),
            node,
            t,
            src_ip,
            rsrc_ip,
            src_port,
            snat_port,
            snat_bucket,
            shape,
            snat,
            start_d,
            dstart_d,
            stop_d,
            po,
            bo,
            pr,
            br,
            pk,
            bk,
        }
    }

    /// The schema's fields (the schema never changes: built once).
    pub(super) fn get() -> &'static Fields {
        static FIELDS: std::sync::OnceLock<Fields> = std::sync::OnceLock::new();
        FIELDS.get_or_init(Fields::new)
    }

    /// The field values of one record, written into `vals`; returns how
    /// many.
    fn values(&self, r: &ConnRecord, vals: &mut [(Field, Slot); MAX_VALUES]) -> usize {
        let mut len = 0;
        let mut push = |f: Field, v: Slot| {
            vals[len] = (f, v);
            len += 1;
        };
        push(self.node, Slot::Node);
        push(
            self.t,
            Slot::Date(DateTime::from_timestamp_micros((r.event_ns / 1000) as i64)),
        );
        push(self.src_ip, Slot::Ip(to_v6(r.orig.src)));
        if r.reply.src != r.orig.dst {
            push(self.rsrc_ip, Slot::Ip(to_v6(r.reply.src)));
        }
        push(self.src_port, Slot::U64(r.orig.src_port as u64));
        push(self.snat_port, Slot::U64(r.reply.dst_port as u64));
        push(self.snat_bucket, Slot::U64(snat_bucket(r.reply.dst_port)));
        push(self.shape, Slot::Shape);
        push(self.snat, Slot::Snat);
        let us = |ns: u64| ns / 1000;
        let delta = |x: u64| us(r.event_ns).wrapping_sub(us(x)) as i64;
        let (start_at_event, stop_at_event) = at_event(r);
        if let Some(s) = r.start_ns.filter(|_| !start_at_event) {
            let f = if r.kind == EventKind::Destroy {
                self.dstart_d
            } else {
                self.start_d
            };
            push(f, Slot::I64(delta(s)));
        }
        if let Some(s) = r.stop_ns.filter(|_| !stop_at_event) {
            push(self.stop_d, Slot::I64(delta(s)));
        }
        if let Some((o, r)) = packed_counters(r) {
            push(self.pk, Slot::U64(interleave(o.packets, r.packets)));
            push(self.bk, Slot::U64(interleave(o.bytes, r.bytes)));
            return len;
        }
        if let Some(c) = r.counters_orig {
            push(self.po, Slot::U64(c.packets));
            push(self.bo, Slot::U64(c.bytes));
        }
        if let Some(c) = r.counters_reply {
            push(self.pr, Slot::U64(c.packets));
            push(self.br, Slot::U64(c.bytes));
        }
        len
    }
}

/// The indexed term of a SNAT port: ports 16 at a time.
pub(super) fn snat_bucket(port: u16) -> u64 {
    u64::from(port >> 4)
}

/// Records of one batch for one partition: what its documents are made of,
/// and what a search reads until their commit (the store's fresh records).
pub(super) struct Run {
    pub(super) node: Arc<str>,
    pub(super) records: Vec<ConnRecord>,
    /// Each record's SNAT port: a search by SNAT port (the usual one) reads
    /// this instead of every record (300k records are 57 MB, their ports
    /// 0.6 MB).
    pub(super) snat_ports: Vec<u16>,
}

impl Run {
    pub(super) fn new(node: Arc<str>, records: Vec<ConnRecord>) -> Run {
        Run {
            node,
            snat_ports: records.iter().map(|r| r.snat().1).collect(),
            records,
        }
    }

    /// The documents of the run's records.
    pub(super) fn docs(run: &Arc<Run>) -> impl Iterator<Item = RecordDoc> + '_ {
        run.records.iter().enumerate().map(|(i, r)| RecordDoc {
            run: run.clone(),
            i: i as u32,
            shape: shape(r),
            snat: to_v6(r.reply.dst).octets(),
        })
    }
}

/// Most field values of one document.
const MAX_VALUES: usize = 15;

/// One field value of a [`RecordDoc`].
#[derive(Debug, Clone, Copy)]
enum Slot {
    Node,
    Shape,
    Snat,
    U64(u64),
    I64(i64),
    Date(DateTime),
    Ip(Ipv6Addr),
}

/// The tantivy document of one record: the record stays in its [`Run`]
/// (shared with the fresh records), the document holds the two byte values
/// tantivy borrows. Field values are computed when tantivy iterates them.
/// Documents are moved three times on their way to the indexing thread:
/// an array of every field value (600 bytes) made those copies 8% of the
/// ingest CPU; a `TantivyDocument` cost an allocation of 1 KiB per record.
pub(super) struct RecordDoc {
    run: Arc<Run>,
    i: u32,
    shape: [u8; SHAPE_LEN],
    snat: [u8; 16],
}

impl std::fmt::Debug for RecordDoc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordDoc")
            .field("record", &self.run.records.get(self.i as usize))
            .finish_non_exhaustive()
    }
}

/// A borrowed leaf value of a [`RecordDoc`].
#[derive(Debug, Clone)]
pub(super) struct Leaf<'a>(ReferenceValueLeaf<'a>);

impl<'a> Value<'a> for Leaf<'a> {
    type ArrayIter = std::iter::Empty<Leaf<'a>>;
    type ObjectIter = std::iter::Empty<(&'a str, Leaf<'a>)>;

    fn as_value(&self) -> ReferenceValue<'a, Self> {
        ReferenceValue::Leaf(self.0.clone())
    }
}

impl Document for RecordDoc {
    type Value<'a> = Leaf<'a>;
    type FieldsValuesIter<'a> = RecordDocIter<'a>;

    fn iter_fields_and_values(&self) -> RecordDocIter<'_> {
        let mut vals = [(Fields::get().node, Slot::Node); MAX_VALUES];
        let len = match self.run.records.get(self.i as usize) {
            Some(r) => Fields::get().values(r, &mut vals),
            None => 0,
        };
        RecordDocIter {
            doc: self,
            vals,
            len,
            i: 0,
        }
    }
}

pub(super) struct RecordDocIter<'a> {
    doc: &'a RecordDoc,
    vals: [(Field, Slot); MAX_VALUES],
    len: usize,
    i: usize,
}

impl<'a> Iterator for RecordDocIter<'a> {
    type Item = (Field, Leaf<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        let d = self.doc;
        let (f, v) = *self.vals[..self.len].get(self.i)?;
        self.i += 1;
        let leaf = match v {
            Slot::Node => ReferenceValueLeaf::Str(&d.run.node),
            Slot::Shape => ReferenceValueLeaf::Bytes(&d.shape),
            Slot::Snat => ReferenceValueLeaf::Bytes(&d.snat),
            Slot::U64(x) => ReferenceValueLeaf::U64(x),
            Slot::I64(x) => ReferenceValueLeaf::I64(x),
            Slot::Date(x) => ReferenceValueLeaf::Date(x),
            Slot::Ip(x) => ReferenceValueLeaf::IpAddr(x),
        };
        Some((f, Leaf(leaf)))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.len - self.i;
        (n, Some(n))
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

/// Bytes of `shape`: the destination address (IPv6 form) first, so that a
/// search by `dst_ip` is a range of shape values; then the rest
/// ([`SHAPE_REST`] bytes).
pub(super) const SHAPE_LEN: usize = 16 + SHAPE_REST;
const SHAPE_REST: usize = 22;

fn shape(r: &ConnRecord) -> [u8; SHAPE_LEN] {
    let mut full = [0u8; SHAPE_LEN];
    let (dst, s) = full.split_at_mut(16);
    dst.copy_from_slice(&to_v6(r.orig.dst).octets());
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
    let (start_at_event, stop_at_event) = at_event(r);
    s[21] = start_at_event as u8
        | (stop_at_event as u8) << 1
        | (packed_counters(r).is_some() as u8) << 2;
    full
}

/// The range of `shape` values whose destination address is `ip`.
pub(super) fn shape_range_of_dst(ip: IpAddr) -> (Vec<u8>, Vec<u8>) {
    let dst = to_v6(ip).octets();
    let mut lo = dst.to_vec();
    lo.extend_from_slice(&[0u8; SHAPE_REST]);
    let mut hi = dst.to_vec();
    hi.extend_from_slice(&[0xFFu8; SHAPE_REST]);
    (lo, hi)
}

/// Both directions' counters when each value fits 32 bits: then stored as
/// two columns of interleaved bits (packets, bytes) instead of four
/// optional columns (each optional column costs 1 bit per document for its
/// presence index; interleaving two values of similar size costs about the
/// sum of their widths).
fn packed_counters(r: &ConnRecord) -> Option<(Counters, Counters)> {
    const MAX: u64 = u32::MAX as u64;
    match (r.counters_orig, r.counters_reply) {
        (Some(o), Some(r))
            if o.packets <= MAX && o.bytes <= MAX && r.packets <= MAX && r.bytes <= MAX =>
        {
            Some((o, r))
        }
        _ => None,
    }
}

/// Spread the low 32 bits of `x` to the even bits.
fn spread(x: u64) -> u64 {
    let mut x = x & 0xFFFF_FFFF;
    x = (x | x << 16) & 0x0000_FFFF_0000_FFFF;
    x = (x | x << 8) & 0x00FF_00FF_00FF_00FF;
    x = (x | x << 4) & 0x0F0F_0F0F_0F0F_0F0F;
    x = (x | x << 2) & 0x3333_3333_3333_3333;
    (x | x << 1) & 0x5555_5555_5555_5555
}

/// Inverse of [`spread`].
fn unspread(x: u64) -> u64 {
    let mut x = x & 0x5555_5555_5555_5555;
    x = (x | x >> 1) & 0x3333_3333_3333_3333;
    x = (x | x >> 2) & 0x0F0F_0F0F_0F0F_0F0F;
    x = (x | x >> 4) & 0x00FF_00FF_00FF_00FF;
    x = (x | x >> 8) & 0x0000_FFFF_0000_FFFF;
    (x | x >> 16) & 0x0000_0000_FFFF_FFFF
}

fn interleave(a: u64, b: u64) -> u64 {
    spread(a) | spread(b) << 1
}

fn deinterleave(x: u64) -> (u64, u64) {
    (unspread(x), unspread(x >> 1))
}

/// Whether the start / stop time equals the event time (NEW records start,
/// DESTROY records stop at their event): kept as a flag in `shape` instead of
/// a zero in an optional column (whose presence index costs 1 bit per
/// document).
fn at_event(r: &ConnRecord) -> (bool, bool) {
    (
        r.start_ns == Some(r.event_ns),
        r.stop_ns == Some(r.event_ns),
    )
}

/// A dictionary-encoded bytes column of fixed-size values, its dictionary
/// read once (a segment's columns are opened once and shared by searches).
struct Dict<const N: usize> {
    ords: Column<u64>,
    /// By ordinal; `None` for a value not of `N` bytes.
    values: Vec<Option<[u8; N]>>,
}

impl<const N: usize> Dict<N> {
    fn open(ff: &tantivy::fastfield::FastFieldReaders, name: &str) -> tantivy::Result<Self> {
        let col = ff.bytes(name)?.ok_or_else(|| missing(name))?;
        let mut values = Vec::with_capacity(col.num_terms());
        let mut terms = col.dictionary().stream()?;
        while terms.advance() {
            values.push(<[u8; N]>::try_from(terms.key()).ok());
        }
        Ok(Dict {
            ords: col.ords().clone(),
            values,
        })
    }

    /// The value of `doc`; `None` when it has none or not of `N` bytes.
    fn get(&self, doc: DocId) -> Option<[u8; N]> {
        let ord = self.ords.first(doc)?;
        *self.values.get(ord as usize)?
    }
}

/// The fast-field columns of one segment, to rebuild records. Opening them
/// reads per-block metadata of every column (milliseconds for a segment of
/// millions of documents), so each segment's are opened once and shared.
pub(super) struct SegmentColumns {
    node_ords: Column<u64>,
    /// Node names by ordinal.
    nodes: Vec<String>,
    t: Column<DateTime>,
    src_ip: Column<Ipv6Addr>,
    rsrc_ip: Column<Ipv6Addr>,
    src_port: Column<u64>,
    snat_port: Column<u64>,
    shape: Dict<SHAPE_LEN>,
    snat: Dict<16>,
    start_d: Column<i64>,
    dstart_d: Column<i64>,
    stop_d: Column<i64>,
    po: Column<u64>,
    bo: Column<u64>,
    pr: Column<u64>,
    br: Column<u64>,
    pk: Column<u64>,
    bk: Column<u64>,
}

fn missing(name: &str) -> tantivy::TantivyError {
    tantivy::TantivyError::SchemaError(format!("fast field {name} missing"))
}

impl SegmentColumns {
    pub(super) fn open(seg: &SegmentReader) -> tantivy::Result<SegmentColumns> {
        let ff = seg.fast_fields();
        let node = ff.str("node")?.ok_or_else(|| missing("node"))?;
        let mut nodes = Vec::with_capacity(node.num_terms());
        let mut terms = node.dictionary().stream()?;
        while terms.advance() {
            nodes.push(String::from_utf8_lossy(terms.key()).into_owned());
        }
        Ok(SegmentColumns {
            node_ords: node.ords().clone(),
            nodes,
            t: ff.date("t")?,
            src_ip: ff.ip_addr("src_ip")?,
            rsrc_ip: ff.ip_addr("rsrc_ip")?,
            src_port: ff.u64("src_port")?,
            snat_port: ff.u64("snat_port")?,
            shape: Dict::open(ff, "shape")?,
            snat: Dict::open(ff, "snat")?,
            start_d: ff.i64("start_d")?,
            dstart_d: ff.i64("dstart_d")?,
            stop_d: ff.i64("stop_d")?,
            po: ff.u64("po")?,
            bo: ff.u64("bo")?,
            pr: ff.u64("pr")?,
            br: ff.u64("br")?,
            pk: ff.u64("pk")?,
            bk: ff.u64("bk")?,
        })
    }

    /// Event time of `doc` (ns, a whole microsecond).
    pub(super) fn event_ns(&self, doc: DocId) -> Option<u64> {
        self.t
            .first(doc)
            .map(|t| (t.into_timestamp_micros() as u64).wrapping_mul(1000))
    }

    /// Node name and record of `doc`; `None` when a required column has no
    /// value (not written by this store).
    pub(super) fn record(&self, doc: DocId) -> tantivy::Result<Option<(String, ConnRecord)>> {
        let Some(node) = self
            .node_ords
            .first(doc)
            .and_then(|o| self.nodes.get(o as usize))
        else {
            return Ok(None);
        };
        let node = node.clone();
        let (Some(full), Some(snat)) = (self.shape.get(doc), self.snat.get(doc)) else {
            return Ok(None);
        };
        let snat = Ipv6Addr::from(snat);
        let (dst, s) = full.split_at(16);
        let dst = Ipv6Addr::from(<[u8; 16]>::try_from(dst).unwrap_or_default());
        let (Some(t), Some(src), Some(sport), Some(nport)) = (
            self.t.first(doc),
            self.src_ip.first(doc),
            self.src_port.first(doc),
            self.snat_port.first(doc),
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
        let event_us = t.into_timestamp_micros() as u64;
        let event_ns = event_us.wrapping_mul(1000);
        let undelta = |d: i64| event_us.wrapping_sub(d as u64).wrapping_mul(1000);
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
        let (counters_orig, counters_reply) = match (s[21] & 4 != 0)
            .then(|| self.pk.first(doc).zip(self.bk.first(doc)))
            .flatten()
        {
            Some((pk, bk)) => {
                let (po, pr) = deinterleave(pk);
                let (bo, br) = deinterleave(bk);
                (
                    Some(Counters {
                        packets: po,
                        bytes: bo,
                    }),
                    Some(Counters {
                        packets: pr,
                        bytes: br,
                    }),
                )
            }
            None => (counters(&self.po, &self.bo), counters(&self.pr, &self.br)),
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
            id: 0,
            zone: u16_at(6),
            mark: u32_at(8),
            status: u32_at(12),
            tcp_state: tcp_state_from_code(u16_at(16)),
            tcp_flags_orig: s[18],
            tcp_flags_reply: s[19],
            start_ns: if s[21] & 1 != 0 {
                Some(event_ns)
            } else {
                start_col.first(doc).map(undelta)
            },
            stop_ns: if s[21] & 2 != 0 {
                Some(event_ns)
            } else {
                self.stop_d.first(doc).map(undelta)
            },
            counters_orig,
            counters_reply,
        };
        Ok(Some((node, r)))
    }
}
