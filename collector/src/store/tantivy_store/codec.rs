//! Binary encoding of a [`StoredBatch`] as a write-ahead-log payload.
//!
//! Layout (little endian): version `u8`, node and boot id (`u16` length +
//! UTF-8), seq `u64`, then the records as a packed batch
//! ([`ctw_proto::packed`]: record count `u32`, then each record's length
//! and fields).

use ctw_proto::packed::{self, put_str, Reader};

use super::super::StoredBatch;

/// 2: packed records carry their length (version 1, unreleased, did not).
const VERSION: u8 = 2;

pub(super) fn encode(b: &StoredBatch, out: &mut Vec<u8>) {
    out.push(VERSION);
    put_str(out, &b.node);
    put_str(out, &b.boot_id);
    out.extend_from_slice(&b.seq.to_le_bytes());
    packed::encode(&b.records, out);
}

pub(super) fn decode(data: &[u8]) -> Result<StoredBatch, String> {
    let mut r = Reader::new(data);
    let header = (|| {
        let v = r.u8()?;
        Ok((v, r.string()?, r.string()?, r.u64()?))
    })();
    let (v, node, boot_id, seq) = header.map_err(|e: ctw_proto::ConvertError| e.to_string())?;
    if v != VERSION {
        return Err(format!("unknown entry version {v}"));
    }
    let u = packed::decode(r.rest());
    if let Some(e) = u.first_error {
        return Err(e);
    }
    Ok(StoredBatch {
        node,
        boot_id,
        seq,
        records: u.records,
    })
}
