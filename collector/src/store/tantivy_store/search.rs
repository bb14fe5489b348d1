//! Searching: the partitions overlapping the range plus the lookback, a
//! tantivy query on the most selective term, per-candidate checks from the
//! columns, and the fresh runs not yet in a segment; matches past the cap
//! are only counted (see the module docs of `tantivy_store`).

use super::*;

/// A search's matching records, from fresh runs and segments alike: the
/// first `cap` are collected, the rest only counted (see
/// [`counts_uncollected`] for which of them count as connections).
struct Matches<'q> {
    q: &'q SearchQuery,
    cap: usize,
    records: Vec<(String, ConnRecord)>,
    /// Uncollected matching records.
    uncollected: u64,
    /// Uncollected records that count as connections.
    uncollected_connections: u64,
}

impl<'q> Matches<'q> {
    fn new(q: &'q SearchQuery, cap: usize) -> Matches<'q> {
        Matches {
            q,
            cap,
            records: Vec::new(),
            uncollected: 0,
            uncollected_connections: 0,
        }
    }

    /// One more match (its node name is copied only when it is collected).
    fn add(&mut self, node: impl Into<String>, r: ConnRecord) {
        if self.records.len() >= self.cap {
            self.uncollected += 1;
            self.uncollected_connections += u64::from(counts_uncollected(self.q, &r));
        } else {
            self.records.push((node.into(), r));
        }
    }
}

impl Run {
    /// Records that may match `q` (all, unless it names a SNAT port).
    fn candidates<'a>(&'a self, q: &SearchQuery) -> Box<dyn Iterator<Item = &'a ConnRecord> + 'a> {
        match q.snat_port {
            Some(port) => Box::new(
                self.snat_ports
                    .iter()
                    .zip(&self.records)
                    .filter(move |(p, _)| **p == port)
                    .map(|(_, r)| r),
            ),
            None => Box::new(self.records.iter()),
        }
    }
}

impl Partition {
    /// The reader's segments and the records not in them yet, consistently.
    pub(super) fn view(&self) -> Result<(Searcher, Vec<Arc<Run>>), StoreError> {
        let fresh = self.fresh.read().map_err(|_| poisoned())?;
        Ok((self.reader.searcher(), fresh.clone()))
    }

    /// The columns of `seg`, opened on first use.
    pub(super) fn columns(&self, seg: &SegmentReader) -> Result<Arc<SegmentColumns>, StoreError> {
        let mut cache = self.columns.lock().map_err(|_| poisoned())?;
        if let Some(c) = cache.get(&seg.segment_id()) {
            return Ok(c.clone());
        }
        let c = Arc::new(SegmentColumns::open(seg).map_err(idx_err)?);
        cache.insert(seg.segment_id(), c.clone());
        Ok(c)
    }

    /// Forget the columns of segments `searcher` no longer has.
    pub(super) fn prune_columns(&self, searcher: &Searcher) {
        if let Ok(mut cache) = self.columns.lock() {
            let segs = searcher.segment_readers();
            cache.retain(|id, _| segs.iter().any(|s| s.segment_id() == *id));
        }
    }
}

impl Inner {
    pub(super) fn search(
        &self,
        q: &SearchQuery,
    ) -> Result<(SearchResult, SearchStats), StoreError> {
        if let (Some(f), Some(t)) = (q.from_ns, q.to_ns) {
            if f > t {
                return Err(StoreError::BadQuery(format!(
                    "from ({f}) is after to ({t})"
                )));
            }
        }
        let (lo, hi) = self.event_range(q);
        let parts = self.partitions_in(q);
        let mut stats = SearchStats {
            partitions: parts.iter().map(|p| p.name.clone()).collect(),
            ..Default::default()
        };
        let mut matches = Matches::new(q, self.opts.max_collected_docs);
        let width = self.width_ns();
        for p in &parts {
            let covered = lo <= p.start_ns && p.start_ns.saturating_add(width - 1) <= hi;
            let query = self.build_query(q, (!covered).then_some((lo, hi)));
            let (searcher, fresh) = p.view()?;
            for run in fresh.iter().rev() {
                for r in run.candidates(q) {
                    if (lo..=hi).contains(&r.event_ns) && matches_fields(q, &run.node, r) {
                        matches.add(&*run.node, *r);
                    }
                }
            }
            p.prune_columns(&searcher);
            let weight = query
                .weight(EnableScoring::disabled_from_searcher(&searcher))
                .map_err(idx_err)?;
            for seg in searcher.segment_readers() {
                let mut scorer = weight.scorer(seg, 1.0).map_err(idx_err)?;
                let alive = seg.alive_bitset();
                let mut cols: Option<Arc<SegmentColumns>> = None;
                let mut doc = scorer.doc();
                while doc != TERMINATED {
                    if alive.is_none_or(|a| a.is_alive(doc)) {
                        if cols.is_none() {
                            cols = Some(p.columns(seg)?);
                        }
                        // Time first (one column), then the whole record: the
                        // query may leave the time range, the exact SNAT port
                        // and the fast-only fields to this check. Past the
                        // cap, matches are only counted.
                        if let Some(c) = cols
                            .as_ref()
                            .filter(|c| c.event_ns(doc).is_some_and(|t| (lo..=hi).contains(&t)))
                        {
                            let rec = c.record(doc).map_err(idx_err)?;
                            if let Some((node, r)) =
                                rec.filter(|(node, r)| matches_fields(q, node, r))
                            {
                                matches.add(node, r);
                            }
                        }
                    }
                    doc = scorer.advance();
                }
            }
        }
        stats.docs = matches.records.len() as u64;
        stats.truncated = matches.uncollected > 0;
        let gaps = self.gaps.lock().map_err(|_| poisoned())?;
        let mut result = assemble_with(q, matches.records, &gaps.gaps, stats.truncated);
        result.total += matches.uncollected_connections;
        // Never fewer than returned (DESTROYs standing alone are returned
        // but not counted when their NEW may be among the uncollected).
        result.total = result.total.max(result.hits.len() as u64);
        Ok((result, stats))
    }

    /// Event times a search must read: `[from - lookback, to + lookback]`.
    pub(super) fn event_range(&self, q: &SearchQuery) -> (u64, u64) {
        let lb = self.opts.lookback_hours as u64 * NS_PER_HOUR;
        (
            q.from_ns.map_or(0, |f| f.saturating_sub(lb)),
            q.to_ns.map_or(u64::MAX, |t| t.saturating_add(lb)),
        )
    }

    /// Partitions overlapping the search's event range, in the order they
    /// are read: nearest to `at` first, else newest first.
    pub(super) fn partitions_in(&self, q: &SearchQuery) -> Vec<Arc<Partition>> {
        let (lo, hi) = self.event_range(q);
        let width = self.width_ns();
        let Ok(parts) = self.parts.read() else {
            return Vec::new();
        };
        let mut v: Vec<Arc<Partition>> = parts
            .values()
            .filter(|p| p.start_ns <= hi && p.start_ns.saturating_add(width) > lo)
            .cloned()
            .collect();
        match q.at_ns {
            Some(at) => v.sort_by_key(|p| {
                let end = p.start_ns.saturating_add(width);
                if at < p.start_ns {
                    p.start_ns - at
                } else {
                    at.saturating_sub(end)
                }
            }),
            None => v.reverse(),
        }
        v
    }

    /// The tantivy query of a search in one partition; `time` is the event
    /// range when the partition is not entirely inside it. The caller checks
    /// every candidate's time and fields again: a query with a selective
    /// term (a pod address or a SNAT port, whose postings are short) leaves
    /// out the clauses that scan columns (time, `src_port`, `dst_ip`,
    /// `node`, `snat_ip`): with a range in the middle of a partition,
    /// tantivy scans the time column from the partition's start to find its
    /// first match, which cost tens of milliseconds per partition at 100M
    /// records.
    pub(super) fn build_query(&self, q: &SearchQuery, time: Option<(u64, u64)>) -> Box<dyn Query> {
        let f = self.fields;
        let mut clauses: Vec<(Occur, Box<dyn Query>)> = Vec::new();
        let mut term = |t: Term| {
            clauses.push((
                Occur::Must,
                Box::new(TermQuery::new(t, IndexRecordOption::Basic)),
            ))
        };
        if let Some(ip) = q.src_ip {
            term(Term::from_field_ip_addr(f.src_ip, to_v6(ip)));
        }
        if let Some(p) = q.snat_port {
            // The port's bucket: the exact port is checked per candidate.
            term(Term::from_field_u64(f.snat_bucket, schema::snat_bucket(p)));
        }
        let selective = q.src_ip.is_some() || q.snat_port.is_some();
        if !selective {
            let mut range = |lo: Term, hi: Term| {
                clauses.push((
                    Occur::Must,
                    Box::new(RangeQuery::new(Bound::Included(lo), Bound::Included(hi))),
                ))
            };
            if let Some(p) = q.src_port {
                let t = Term::from_field_u64(f.src_port, p as u64);
                range(t.clone(), t);
            }
            if let Some(ip) = q.dst_ip {
                let (lo, hi) = shape_range_of_dst(ip);
                range(
                    Term::from_field_bytes(f.shape, &lo),
                    Term::from_field_bytes(f.shape, &hi),
                );
            }
            if let Some(n) = &q.node {
                let t = Term::from_field_text(f.node, n);
                range(t.clone(), t);
            }
            if let Some(ip) = q.snat_ip {
                let t = Term::from_field_bytes(f.snat, &to_v6(ip).octets());
                range(t.clone(), t);
            }
            if let Some((lo, hi)) = time {
                let date = |ns: u64| {
                    Term::from_field_date(f.t, DateTime::from_timestamp_micros((ns / 1000) as i64))
                };
                range(date(lo), date(hi));
            }
        }
        // protocol is checked on the rebuilt record (two values: an index
        // would not narrow anything).
        match clauses.len() {
            0 => Box::new(AllQuery),
            1 => clauses
                .pop()
                .map(|(_, q)| q)
                .unwrap_or_else(|| Box::new(AllQuery)),
            _ => Box::new(BooleanQuery::new(clauses)),
        }
    }
}

impl TantivyStore {
    /// Search and report what the search did.
    pub fn search_with_stats(
        &self,
        q: &SearchQuery,
    ) -> Result<(SearchResult, SearchStats), StoreError> {
        let (r, s) = self.inner.search(q)?;
        if let Ok(mut last) = self.inner.last_search.lock() {
            *last = s.clone();
        }
        Ok((r, s))
    }
}
