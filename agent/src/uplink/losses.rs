//! Loss reports waiting for the collector.
//!
//! The protocol has no ack for a loss report, so a report counts as
//! delivered when a record batch sent after it on the same stream is
//! acknowledged (the stream is ordered, and the collector acks a batch only
//! after storing it). Until then it is resent on every new connection and
//! kept in the spool's `losses` file; the collector may see a report twice
//! and deduplicates by (boot id, reason, from_ns, to_ns).
//!
//! Bounded: a new report is merged into an unsent one with the same boot,
//! reason and `resynced` (counts added, windows joined) when its reason is
//! not `kernel_drop`, or for any reason once [`MAX_PENDING`] are waiting.

use ctw_proto::pb;

/// Reports kept before new ones are merged into old ones.
pub const MAX_PENDING: usize = 256;

#[derive(Debug)]
struct Pending {
    report: pb::LossReport,
    /// Message number it was sent as on the current connection.
    sent_no: Option<u64>,
}

#[derive(Debug, Default)]
pub struct Losses {
    pending: Vec<Pending>,
    /// Changed since the last [`Losses::take_dirty`].
    dirty: bool,
}

impl Losses {
    /// Reports saved by an earlier run; none of them sent yet.
    pub fn from_saved(saved: Vec<pb::LossReport>) -> Losses {
        Losses {
            pending: saved
                .into_iter()
                .map(|report| Pending {
                    report,
                    sent_no: None,
                })
                .collect(),
            dirty: false,
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    pub fn add(&mut self, r: pb::LossReport) {
        if r.count == 0 {
            return;
        }
        self.dirty = true;
        let mergeable = r.reason != "kernel_drop" || self.pending.len() >= MAX_PENDING;
        if mergeable {
            if let Some(p) = self.pending.iter_mut().rev().find(|p| {
                p.sent_no.is_none()
                    && p.report.boot_id == r.boot_id
                    && p.report.reason == r.reason
                    && p.report.resynced == r.resynced
            }) {
                p.report.count += r.count;
                p.report.from_ns = p.report.from_ns.min(r.from_ns);
                p.report.to_ns = p.report.to_ns.max(r.to_ns);
                return;
            }
        }
        self.pending.push(Pending {
            report: r,
            sent_no: None,
        });
    }

    pub fn has_unsent(&self) -> bool {
        self.pending.iter().any(|p| p.sent_no.is_none())
    }

    /// The oldest report not sent on this connection, marked as sent as
    /// message `send_no`.
    pub fn next_unsent(&mut self, send_no: u64) -> Option<pb::LossReport> {
        let p = self.pending.iter_mut().find(|p| p.sent_no.is_none())?;
        p.sent_no = Some(send_no);
        Some(p.report.clone())
    }

    /// A batch sent as message `send_no` was acknowledged: every report sent
    /// before it is delivered. Returns how many.
    pub fn confirm_before(&mut self, send_no: u64) -> usize {
        let before = self.pending.len();
        self.pending
            .retain(|p| !matches!(p.sent_no, Some(n) if n < send_no));
        let n = before - self.pending.len();
        if n > 0 {
            self.dirty = true;
        }
        n
    }

    /// The connection is gone: everything is unsent again.
    pub fn reset(&mut self) {
        for p in &mut self.pending {
            p.sent_no = None;
        }
    }

    /// The reports to save, if they changed since the last call.
    pub fn take_dirty(&mut self) -> Option<Vec<pb::LossReport>> {
        if !std::mem::take(&mut self.dirty) {
            return None;
        }
        Some(self.pending.iter().map(|p| p.report.clone()).collect())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn r(reason: &str, from: u64, to: u64, count: u64) -> pb::LossReport {
        pb::LossReport {
            boot_id: "b".into(),
            reason: reason.into(),
            from_ns: from,
            to_ns: to,
            count,
            resynced: false,
        }
    }

    #[test]
    fn reports_are_confirmed_by_a_later_ack_only() {
        let mut l = Losses::default();
        l.add(r("kernel_drop", 1, 2, 5));
        l.add(r("kernel_drop", 8, 9, 1));
        assert_eq!(l.len(), 2);
        assert_eq!(l.next_unsent(10).map(|x| x.count), Some(5));
        assert_eq!(l.next_unsent(11).map(|x| x.count), Some(1));
        assert!(l.next_unsent(12).is_none());
        // An ack of a batch sent before the second report confirms only the first.
        assert_eq!(l.confirm_before(11), 1);
        l.reset();
        assert_eq!(l.next_unsent(1).map(|x| x.from_ns), Some(8));
        assert_eq!(l.confirm_before(2), 1);
        assert!(l.is_empty());
    }

    #[test]
    fn overflow_reports_merge_with_exact_counts() {
        let mut l = Losses::default();
        l.add(r("spool_overflow", 10, 20, 3));
        l.add(r("spool_overflow", 21, 30, 4));
        l.add(r("uplink_queue", 5, 6, 1));
        l.add(r("spool_overflow", 0, 0, 0));
        assert_eq!(l.len(), 2);
        let first = l.next_unsent(1).unwrap();
        assert_eq!((first.from_ns, first.to_ns, first.count), (10, 30, 7));
        // A sent report is not changed any more.
        l.add(r("spool_overflow", 31, 40, 2));
        assert_eq!(l.len(), 3);
        let saved = l.take_dirty().unwrap();
        assert_eq!(saved.len(), 3);
        assert!(l.take_dirty().is_none());
    }

    #[test]
    fn kernel_drops_are_kept_apart_until_the_bound() {
        let mut l = Losses::default();
        for i in 0..(MAX_PENDING as u64 + 10) {
            l.add(r("kernel_drop", i * 10, i * 10 + 1, 1));
        }
        assert_eq!(l.len(), MAX_PENDING);
        let total: u64 = l.take_dirty().unwrap().iter().map(|x| x.count).sum();
        assert_eq!(total, MAX_PENDING as u64 + 10);
    }
}
