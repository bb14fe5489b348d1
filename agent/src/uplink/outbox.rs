//! Every batch not yet acknowledged by the collector, oldest first: in
//! memory while it can be sent at once, otherwise in the [`Spool`].
//!
//! Rules:
//! - Batches are sent oldest first; the ones sent on the current connection
//!   are a prefix of the queue (at most `max_inflight` of them).
//! - A new batch stays in memory only while the stream is up, the in-flight
//!   window has room for it and nothing older waits in the spool; otherwise
//!   it is written to the spool.
//! - When the connection is lost (and at shutdown) the batches in memory are
//!   written to the spool; every batch counts as unsent again.
//! - An ack removes the batch from memory or deletes its file.
//! - The spool is bounded: to make room, the oldest spooled batches not in
//!   flight are deleted; each deletion is returned as a [`Dropped`] so the
//!   exact loss can be reported.

use std::collections::VecDeque;
use std::time::Instant;

use ctw_proto::pb;
use prost::Message;

use super::spool::{self, BatchMeta, Spool, SpoolError, SpooledBatch};

/// Why a batch was dropped: the loss reason reported to the collector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Deleted to make room in a full spool.
    SpoolOverflow,
    /// Its spool file could not be written or read back.
    SpoolError,
}

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::SpoolOverflow => "spool_overflow",
            DropReason::SpoolError => "spool_error",
        }
    }
}

/// A batch the outbox gave up on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    pub meta: BatchMeta,
    pub reason: DropReason,
}

#[derive(Debug)]
enum Body {
    /// `msg` is taken when the batch is sent; `encoded` is kept for the spool.
    Mem {
        encoded: Vec<u8>,
        msg: Option<pb::RecordBatch>,
    },
    Disk {
        size: u64,
    },
}

#[derive(Debug)]
struct Entry {
    /// Spool order: also the file name.
    index: u64,
    meta: BatchMeta,
    body: Body,
    /// When sent on the current connection: its message number there.
    sent: Option<(u64, Instant)>,
}

/// A batch taken for sending.
#[derive(Debug)]
pub struct Outgoing {
    pub msg: pb::RecordBatch,
    pub records: u32,
}

/// What an ack acknowledged.
#[derive(Debug)]
pub struct Acked {
    pub meta: BatchMeta,
    /// Message number it was sent as on the current connection, if it was.
    pub sent_no: Option<u64>,
}

#[derive(Debug)]
pub struct Outbox {
    spool: Spool,
    entries: VecDeque<Entry>,
    /// `entries[..sent]` were sent on the current connection.
    sent: usize,
    next_index: u64,
    max_inflight: usize,
    /// Write errors: batches kept in memory beyond the window, at most this many.
    max_memory: usize,
}

impl Outbox {
    /// `found`: the batches already in the spool, oldest first.
    pub fn new(spool: Spool, found: Vec<SpooledBatch>, max_inflight: usize) -> Outbox {
        let next_index = found.last().map_or(1, |b| b.index + 1);
        let entries = found
            .into_iter()
            .map(|b| Entry {
                index: b.index,
                meta: b.meta,
                body: Body::Disk { size: b.size },
                sent: None,
            })
            .collect();
        Outbox {
            spool,
            entries,
            sent: 0,
            next_index,
            max_inflight: max_inflight.max(1),
            max_memory: 2 * max_inflight.max(1),
        }
    }

    pub fn spool(&self) -> &Spool {
        &self.spool
    }

    /// Batches not yet acknowledged.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// When the oldest batch in flight was sent.
    pub fn oldest_in_flight(&self) -> Option<Instant> {
        self.entries
            .iter()
            .take(self.sent)
            .filter_map(|e| e.sent.map(|(_, t)| t))
            .min()
    }

    /// Whether [`Outbox::next_batch`] has something to send.
    pub fn can_send(&self) -> bool {
        self.sent < self.entries.len() && self.sent < self.max_inflight
    }

    fn memory_entries(&self) -> usize {
        self.entries
            .iter()
            .filter(|e| matches!(e.body, Body::Mem { .. }))
            .count()
    }

    /// Adds a sealed batch. `up`: the stream is up, so the batch may stay in
    /// memory if it can be sent at once. Returns the records written to the
    /// spool (0 when kept in memory or dropped).
    pub fn push(
        &mut self,
        meta: BatchMeta,
        msg: pb::RecordBatch,
        up: bool,
        dropped: &mut Vec<Dropped>,
    ) -> Result<u32, SpoolError> {
        let index = self.next_index;
        self.next_index += 1;
        let encoded = msg.encode_to_vec();
        let in_memory = up
            && self.entries.len() < self.max_inflight
            && self
                .entries
                .iter()
                .skip(self.sent)
                .all(|e| matches!(e.body, Body::Mem { .. }));
        if in_memory {
            self.entries.push_back(Entry {
                index,
                meta,
                body: Body::Mem {
                    encoded,
                    msg: Some(msg),
                },
                sent: None,
            });
            return Ok(0);
        }
        match self.write(index, &meta, &encoded, dropped) {
            Ok(Some(size)) => {
                let records = meta.records;
                self.entries.push_back(Entry {
                    index,
                    meta,
                    body: Body::Disk { size },
                    sent: None,
                });
                Ok(records)
            }
            Ok(None) => Ok(0),
            Err(e) => {
                if self.memory_entries() < self.max_memory {
                    self.entries.push_back(Entry {
                        index,
                        meta,
                        body: Body::Mem {
                            encoded,
                            msg: Some(msg),
                        },
                        sent: None,
                    });
                } else {
                    dropped.push(Dropped {
                        meta,
                        reason: DropReason::SpoolError,
                    });
                }
                Err(e)
            }
        }
    }

    /// Makes room for a file of `size` bytes for the batch `index` by
    /// deleting older spooled batches that are not in flight, oldest first.
    /// False when that is not enough (the batch itself is the oldest left).
    fn make_room(&mut self, index: u64, size: u64, dropped: &mut Vec<Dropped>) -> bool {
        let max = self.spool.max_bytes();
        if size > max {
            return false;
        }
        while self.spool.bytes() + size > max {
            let victim = (self.sent..self.entries.len()).find(|&p| {
                let e = &self.entries[p];
                e.index < index && matches!(e.body, Body::Disk { .. })
            });
            let Some(p) = victim else { return false };
            let Some(e) = self.entries.remove(p) else {
                return false;
            };
            if let Body::Disk { size } = e.body {
                self.spool.remove(e.index, size);
            }
            dropped.push(Dropped {
                meta: e.meta,
                reason: DropReason::SpoolOverflow,
            });
        }
        true
    }

    /// Writes a batch file, making room first. `Ok(None)`: no room, the
    /// batch was dropped (and is in `dropped`).
    fn write(
        &mut self,
        index: u64,
        meta: &BatchMeta,
        encoded: &[u8],
        dropped: &mut Vec<Dropped>,
    ) -> Result<Option<u64>, SpoolError> {
        let size = spool::file_size(&meta.boot_id, encoded.len());
        if !self.make_room(index, size, dropped) {
            dropped.push(Dropped {
                meta: meta.clone(),
                reason: DropReason::SpoolOverflow,
            });
            return Ok(None);
        }
        self.spool.write(index, meta, encoded).map(Some)
    }

    /// The connection is gone (or the agent stops): batches in memory go to
    /// the spool, and nothing counts as sent any more. Returns the records
    /// spooled and the first write error, if any (those batches stay in
    /// memory).
    pub fn reset(&mut self, dropped: &mut Vec<Dropped>) -> (u64, Option<SpoolError>) {
        self.sent = 0;
        for e in self.entries.iter_mut() {
            e.sent = None;
        }
        let mem: Vec<u64> = self
            .entries
            .iter()
            .filter(|e| matches!(e.body, Body::Mem { .. }))
            .map(|e| e.index)
            .collect();
        let mut spooled = 0u64;
        let mut first_err = None;
        for index in mem {
            let Some(p) = self.position(index) else {
                continue;
            };
            let (meta, encoded) = match &self.entries[p].body {
                Body::Mem { encoded, .. } => (self.entries[p].meta.clone(), encoded.clone()),
                Body::Disk { .. } => continue,
            };
            match self.write(index, &meta, &encoded, dropped) {
                Ok(Some(size)) => {
                    if let Some(p) = self.position(index) {
                        self.entries[p].body = Body::Disk { size };
                    }
                    spooled += u64::from(meta.records);
                }
                Ok(None) => {
                    if let Some(p) = self.position(index) {
                        self.entries.remove(p);
                    }
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        (spooled, first_err)
    }

    fn position(&self, index: u64) -> Option<usize> {
        self.entries.binary_search_by_key(&index, |e| e.index).ok()
    }

    /// Takes the oldest unsent batch for sending as message `send_no`.
    /// Spool files that cannot be read back are deleted and returned in
    /// `dropped`.
    pub fn next_batch(&mut self, send_no: u64, dropped: &mut Vec<Dropped>) -> Option<Outgoing> {
        while self.can_send() {
            let p = self.sent;
            let e = &mut self.entries[p];
            let msg = match &mut e.body {
                Body::Mem { encoded, msg } => match msg.take() {
                    Some(m) => Ok(m),
                    None => pb::RecordBatch::decode(encoded.as_slice()).map_err(|err| {
                        SpoolError::Corrupt {
                            path: "memory".into(),
                            reason: err.to_string(),
                        }
                    }),
                },
                Body::Disk { .. } => self.spool.read(e.index).and_then(|b| {
                    pb::RecordBatch::decode(b.as_slice()).map_err(|err| SpoolError::Corrupt {
                        path: self.spool.dir().join(format!("{:020}.batch", e.index)),
                        reason: err.to_string(),
                    })
                }),
            };
            match msg {
                Ok(msg) => {
                    e.sent = Some((send_no, Instant::now()));
                    self.sent += 1;
                    return Some(Outgoing {
                        msg,
                        records: e.meta.records,
                    });
                }
                Err(err) => {
                    tracing::warn!(error = %err, seq = e.meta.seq, records = e.meta.records,
                        "unreadable spooled batch dropped");
                    if let Some(e) = self.entries.remove(p) {
                        if let Body::Disk { size } = e.body {
                            self.spool.remove(e.index, size);
                        }
                        dropped.push(Dropped {
                            meta: e.meta,
                            reason: DropReason::SpoolError,
                        });
                    }
                }
            }
        }
        None
    }

    /// The collector stored batch (`boot_id`, `seq`): forget it.
    pub fn ack(&mut self, boot_id: &str, seq: u64) -> Option<Acked> {
        let p = self
            .entries
            .iter()
            .position(|e| e.meta.seq == seq && &*e.meta.boot_id == boot_id)?;
        let e = self.entries.remove(p)?;
        if p < self.sent {
            self.sent -= 1;
        }
        if let Body::Disk { size } = e.body {
            self.spool.remove(e.index, size);
        }
        Some(Acked {
            meta: e.meta,
            sent_no: e.sent.map(|(n, _)| n),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::path::PathBuf;
    use std::sync::Arc;

    use super::*;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ctw-outbox-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn batch(seq: u64, n: usize) -> (BatchMeta, pb::RecordBatch) {
        let boot: Arc<str> = "boot-a".into();
        let records: Vec<pb::Record> = (0..n)
            .map(|i| pb::Record {
                event_ns: seq * 1000 + i as u64,
                id: seq as u32,
                ..Default::default()
            })
            .collect();
        (
            BatchMeta {
                boot_id: boot.clone(),
                seq,
                records: n as u32,
                from_ns: seq * 1000,
                to_ns: seq * 1000 + n as u64 - 1,
            },
            pb::RecordBatch {
                boot_id: boot.to_string(),
                seq,
                records,
                packed: Vec::new(),
            },
        )
    }

    fn open(name: &str, max_bytes: u64, max_inflight: usize) -> (Outbox, PathBuf) {
        let d = tmpdir(name);
        let (s, found) = Spool::open(&d, max_bytes, &mut Vec::new()).unwrap();
        (Outbox::new(s, found, max_inflight), d)
    }

    fn send_all(o: &mut Outbox, no: &mut u64) -> Vec<u64> {
        let mut out = Vec::new();
        let mut dropped = Vec::new();
        while let Some(b) = o.next_batch(*no, &mut dropped) {
            *no += 1;
            out.push(b.msg.seq);
        }
        assert!(dropped.is_empty());
        out
    }

    #[test]
    fn window_then_spool_then_refill_in_order() {
        let (mut o, d) = open("window", 1 << 20, 2);
        let mut dropped = Vec::new();
        let mut no = 1;
        for seq in 1..=5 {
            let (m, b) = batch(seq, 3);
            o.push(m, b, true, &mut dropped).unwrap();
        }
        // Two fit the window and stay in memory; three are spooled.
        assert!(o.spool().bytes() > 0);
        assert_eq!(send_all(&mut o, &mut no), vec![1, 2]);
        assert!(!o.can_send());
        assert_eq!(o.ack("boot-a", 2).unwrap().sent_no, Some(2));
        assert_eq!(send_all(&mut o, &mut no), vec![3]);
        assert!(o.ack("boot-a", 9).is_none());
        assert!(o.ack("other-boot", 1).is_none());
        o.ack("boot-a", 1).unwrap();
        o.ack("boot-a", 3).unwrap();
        assert_eq!(send_all(&mut o, &mut no), vec![4, 5]);
        o.ack("boot-a", 4).unwrap();
        o.ack("boot-a", 5).unwrap();
        assert!(o.is_empty());
        assert_eq!(o.spool().bytes(), 0);
        assert!(dropped.is_empty());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn lost_connection_spools_memory_and_resends_everything() {
        let (mut o, d) = open("reset", 1 << 20, 4);
        let mut dropped = Vec::new();
        let mut no = 1;
        for seq in 1..=3 {
            let (m, b) = batch(seq, 2);
            o.push(m, b, true, &mut dropped).unwrap();
        }
        assert_eq!(o.spool().bytes(), 0);
        assert_eq!(send_all(&mut o, &mut no), vec![1, 2, 3]);
        o.ack("boot-a", 2).unwrap();
        let (spooled, err) = o.reset(&mut dropped);
        assert!(err.is_none());
        assert_eq!(spooled, 4);
        assert!(o.spool().bytes() > 0);
        assert_eq!(send_all(&mut o, &mut no), vec![1, 3]);
        // The spool survives a restart.
        drop(o);
        let (s, found) = Spool::open(&d, 1 << 20, &mut Vec::new()).unwrap();
        let mut o = Outbox::new(s, found, 4);
        assert_eq!(send_all(&mut o, &mut no), vec![1, 3]);
        let (m, b) = batch(4, 1);
        o.push(m, b, true, &mut dropped).unwrap();
        assert_eq!(send_all(&mut o, &mut no), vec![4]);
        assert!(dropped.is_empty());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn full_spool_drops_oldest_first_except_in_flight() {
        let one = spool::file_size("boot-a", batch(1, 10).1.encode_to_vec().len());
        let (mut o, d) = open("overflow", 3 * one, 1);
        let mut dropped = Vec::new();
        let mut no = 1;
        // Disconnected: everything goes to the spool, which holds three.
        for seq in 1..=5 {
            let (m, b) = batch(seq, 10);
            o.push(m, b, false, &mut dropped).unwrap();
        }
        assert_eq!(o.len(), 3);
        assert_eq!(
            dropped
                .iter()
                .map(|d| (d.meta.seq, d.reason))
                .collect::<Vec<_>>(),
            vec![
                (1, DropReason::SpoolOverflow),
                (2, DropReason::SpoolOverflow)
            ]
        );
        dropped.clear();
        // Batch 3 in flight is kept; 4 is the oldest that can go.
        assert_eq!(send_all(&mut o, &mut no), vec![3]);
        let (m, b) = batch(6, 10);
        o.push(m, b, false, &mut dropped).unwrap();
        assert_eq!(
            dropped.iter().map(|d| d.meta.seq).collect::<Vec<_>>(),
            vec![4]
        );
        assert!(o.spool().bytes() <= 3 * one);
        // A batch larger than the whole spool is dropped itself.
        dropped.clear();
        let (m, b) = batch(7, 1000);
        o.push(m, b, false, &mut dropped).unwrap();
        assert_eq!(
            dropped.iter().map(|d| d.meta.seq).collect::<Vec<_>>(),
            vec![7]
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn unreadable_spool_file_is_dropped_and_reported() {
        let (mut o, d) = open("unreadable", 1 << 20, 4);
        let mut dropped = Vec::new();
        for seq in 1..=2 {
            let (m, b) = batch(seq, 2);
            o.push(m, b, false, &mut dropped).unwrap();
        }
        std::fs::write(d.join(format!("{:020}.batch", 1)), b"garbage").unwrap();
        let mut no = 1;
        let first = o.next_batch(no, &mut dropped).unwrap();
        no += 1;
        assert_eq!(first.msg.seq, 2);
        assert!(o.next_batch(no, &mut dropped).is_none());
        assert_eq!(dropped.len(), 1);
        assert_eq!(dropped[0].meta.seq, 1);
        assert_eq!(dropped[0].reason, DropReason::SpoolError);
        let _ = std::fs::remove_dir_all(&d);
    }
}
