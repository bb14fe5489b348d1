//! Writing: appended batches go to their partition's writer (and, until a
//! commit puts them in a segment, to the partition's fresh runs, searched
//! alongside); commits carry the WAL position they cover and write the
//! checkpoint; the background thread commits every `commit_interval_ms`
//! (sooner past `commit_max_records`) and runs retention.

use super::*;

impl Partition {
    pub(super) fn fresh_records(&self) -> u64 {
        self.fresh
            .read()
            .map_or(0, |f| f.iter().map(|r| r.records.len() as u64).sum::<u64>())
    }
}

impl Inner {
    pub(super) fn lock_ingest(&self) -> Result<MutexGuard<'_, Ingest>, StoreError> {
        self.ingest.lock().map_err(|_| poisoned())
    }

    pub(super) fn writer<'a>(
        &self,
        ing: &'a mut Ingest,
        start_ns: u64,
    ) -> Result<&'a mut WriterSlot, StoreError> {
        #[allow(clippy::map_entry)] // creating the writer is fallible
        if !ing.writers.contains_key(&start_ns) {
            let p = self.partition(start_ns)?;
            let w: IndexWriter<RecordDoc> = p
                .index
                .writer_with_options(
                    IndexWriterOptions::builder()
                        .num_worker_threads(1)
                        .num_merge_threads(1)
                        .memory_budget_per_thread(self.opts.writer_heap_bytes)
                        .build(),
                )
                .map_err(idx_err)?;
            let mut policy = LogMergePolicy::default();
            policy.set_max_docs_before_merge(MERGE_MAX_SEGMENT_DOCS);
            w.set_merge_policy(Box::new(policy));
            ing.writers.insert(
                start_ns,
                WriterSlot {
                    writer: w,
                    dirty: false,
                    idle_commits: 0,
                },
            );
        }
        ing.writers
            .get_mut(&start_ns)
            .ok_or_else(|| StoreError::Index("writer vanished".into()))
    }

    /// Give the records of one WAL entry (ending at `end`) to the writers;
    /// skip partitions whose last commit already covers `end`.
    pub(super) fn index_batch(
        &self,
        ing: &mut Ingest,
        b: &StoredBatch,
        end: u64,
        covered: &HashMap<u64, u64>,
    ) -> Result<(), StoreError> {
        let node: Arc<str> = Arc::from(b.node.as_str());
        // Records go to the writers in runs of the same partition, one
        // channel message per run (`add_document` sends one per document,
        // and waking the indexing thread per document cost more CPU than
        // indexing it).
        let mut run: Vec<ConnRecord> = Vec::with_capacity(b.records.len());
        let mut cur: Option<(u64, bool)> = None;
        for r in &b.records {
            let start = self.partition_start(r.event_ns);
            let skip = match cur {
                Some((s, skip)) if s == start => skip,
                _ => {
                    if let Some((s, false)) = cur {
                        self.send_run(ing, s, &node, &mut run)?;
                    }
                    let skip = covered.get(&start).is_some_and(|&c| c >= end);
                    cur = Some((start, skip));
                    skip
                }
            };
            if !skip {
                run.push(*r);
            }
        }
        if let Some((s, false)) = cur {
            self.send_run(ing, s, &node, &mut run)?;
        }
        Ok(())
    }

    /// Give one run to its partition's writer and make its records
    /// searchable (as fresh records until the next commit).
    pub(super) fn send_run(
        &self,
        ing: &mut Ingest,
        start: u64,
        node: &Arc<str>,
        records: &mut Vec<ConnRecord>,
    ) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let fresh = Arc::new(Run::new(node.clone(), std::mem::take(records)));
        let ops: Vec<UserOperation<RecordDoc>> =
            Run::docs(&fresh).map(UserOperation::Add).collect();
        let slot = self.writer(ing, start)?;
        slot.dirty = true;
        slot.writer.run(ops).map_err(idx_err)?;
        self.partition(start)?
            .fresh
            .write()
            .map_err(|_| poisoned())?
            .push(fresh);
        Ok(())
    }

    /// Commit every writer with new documents, reload their readers (their
    /// fresh records are then in segments) and, if
    /// `checkpoint`, write the checkpoint and drop covered WAL segments.
    pub(super) fn commit(&self, checkpoint: bool) -> Result<(), StoreError> {
        // One commit at a time (background thread, `commit()`, close).
        let _one = self.commit_lock.lock().map_err(|_| poisoned())?;
        let (pos, snapshot, committed, idle) = {
            let mut ing = self.lock_ingest()?;
            let pos = ing.applied;
            let any_dirty = ing.writers.values().any(|s| s.dirty);
            if !any_dirty && pos == ing.checkpointed {
                return Ok(());
            }
            // Positions a commit covers must be durable in the WAL, so that
            // new entries are never written below them after a crash.
            self.wal.sync_to(pos)?;
            let payload = pos.to_string();
            let mut committed = Vec::new();
            for (&start, slot) in ing.writers.iter_mut() {
                if slot.dirty {
                    let mut prepared = slot.writer.prepare_commit().map_err(idx_err)?;
                    prepared.set_payload(&payload);
                    prepared.commit().map_err(idx_err)?;
                    slot.dirty = false;
                    slot.idle_commits = 0;
                    // Every fresh run of the partition went to the writer
                    // before this commit (runs are added under the ingest
                    // lock): the reload below makes them all redundant.
                    let runs = match self.parts.read().map_err(|_| poisoned())?.get(&start) {
                        Some(p) => p.fresh.read().map_err(|_| poisoned())?.len(),
                        None => 0,
                    };
                    committed.push((start, runs));
                } else {
                    slot.idle_commits += 1;
                }
            }
            let newest = ing.writers.keys().next_back().copied();
            let idle: Vec<u64> = ing
                .writers
                .iter()
                .filter(|(&s, w)| Some(s) != newest && w.idle_commits >= IDLE_COMMITS_BEFORE_CLOSE)
                .map(|(&s, _)| s)
                .collect();
            let idle: Vec<WriterSlot> = idle.iter().filter_map(|s| ing.writers.remove(s)).collect();
            let snapshot = checkpoint.then(|| ing.dedup.clone());
            (pos, snapshot, committed, idle)
        };
        {
            let parts = self.parts.read().map_err(|_| poisoned())?;
            for (start, runs) in committed {
                if let Some(p) = parts.get(&start) {
                    let mut fresh = p.fresh.write().map_err(|_| poisoned())?;
                    p.reader.reload().map_err(idx_err)?;
                    let n = runs.min(fresh.len());
                    fresh.drain(..n);
                }
            }
        }
        for slot in idle {
            if let Err(e) = slot.writer.wait_merging_threads() {
                tracing::warn!(error = %e, "closing an idle partition writer");
            }
        }
        if let Some(dedup) = snapshot {
            dedup::write_checkpoint(&self.root, pos, &dedup)?;
            self.lock_ingest()?.checkpointed = pos;
            self.wal.remove_covered(pos)?;
        }
        Ok(())
    }

    /// Records not committed yet, in every partition.
    pub(super) fn fresh_records(&self) -> u64 {
        self.parts
            .read()
            .map_or(0, |parts| parts.values().map(|p| p.fresh_records()).sum())
    }

    /// Ask the background thread to commit now.
    pub(super) fn request_commit(&self) {
        if let Ok(mut bg) = self.bg.lock() {
            if !bg.commit_now {
                bg.commit_now = true;
                self.bg_cv.notify_all();
            }
        }
    }

    /// Commit every `commit_interval_ms`, or sooner when asked (too many
    /// fresh records); enforce retention every minute.
    pub(super) fn background(self: Arc<Self>) {
        let interval = Duration::from_millis(self.opts.commit_interval_ms.max(1));
        let mut next_retention = Instant::now() + RETENTION_EVERY;
        let Ok(mut bg) = self.bg.lock() else {
            return;
        };
        loop {
            let due = Instant::now() + interval;
            while bg.stop.is_none() && !bg.commit_now {
                let left = due.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                let Ok((b, _)) = self.bg_cv.wait_timeout(bg, left) else {
                    return;
                };
                bg = b;
            }
            if let Some(commit) = bg.stop {
                drop(bg);
                if commit {
                    if let Err(e) = self.commit(true) {
                        tracing::error!(error = %e, "final index commit failed");
                    }
                }
                return;
            }
            bg.commit_now = false;
            drop(bg);
            if let Err(e) = self.commit(true) {
                tracing::error!(error = %e, "index commit failed");
            }
            if Instant::now() >= next_retention {
                next_retention = Instant::now() + RETENTION_EVERY;
                if let Err(e) = self.enforce_retention(now_ns()) {
                    tracing::error!(error = %e, "retention failed");
                }
            }
            let Ok(b) = self.bg.lock() else { return };
            bg = b;
        }
    }
}
