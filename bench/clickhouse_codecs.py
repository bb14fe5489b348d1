#!/usr/bin/env python3
"""Which column codecs suit conntrack-watch's ClickHouse tables, measured.

Loads the records that `clickhouse_bench --start 1 --dump FILE` wrote
(RowBinary, the records table's columns in order: the same records the
18.16 run stored) into chdb (the ClickHouse engine in-process, `pip
install chdb`) and reports compressed bytes per record of every column,
after `OPTIMIZE TABLE ... FINAL` (one part per day), for:

  screen  (DAYS whole days, default 4: about 11.4M of 20M records) every
          column of the records table (sorted like it: snat_ip,
          snat_port, event_us) and of the pod-address index (src_ip,
          event_us), each with the server's default compression (LZ4) and
          with each candidate codec. A column's compression does not
          depend on the other columns, only on the row order, so the
          candidates are copies of the column in one wide table per sort
          order (one load, one merge).
  ddl     the collector's own CREATE statements (`clickhouse_bench --ddl
          VERSION` prints them) run as they are; the records inserted into
          the records table, the materialized view filling the pod index.

  /path/to/venv/bin/python bench/clickhouse_codecs.py screen ROWS DATADIR [DAYS]
  clickhouse_bench --ddl 26.9.2.1 --database ctw > ddl.sql
  /path/to/venv/bin/python bench/clickhouse_codecs.py ddl ROWS DATADIR ddl.sql

DATADIR is created (a chdb session directory) and left for inspection:
remove it afterwards. Prints markdown tables.
"""

import os
import re
import sys
import time

from chdb import session

# The records table's columns, in order (schema version 2).
RECORD_COLUMNS = [
    ("day", "Date"),
    ("family", "UInt8"),
    ("snat_ip", "FixedString(16)"),
    ("snat_port", "UInt16"),
    ("event_us", "UInt64"),
    ("node", "String"),
    ("kind", "UInt8"),
    ("protocol", "UInt8"),
    ("zone", "UInt16"),
    ("src_ip", "FixedString(16)"),
    ("src_port", "UInt16"),
    ("dst_ip", "FixedString(16)"),
    ("dst_port", "UInt16"),
    ("reply_src_ip", "FixedString(16)"),
    ("reply_src_port", "UInt16"),
    ("mark", "UInt32"),
    ("status", "UInt32"),
    ("tcp_state", "UInt8"),
    ("tcp_flags_orig", "UInt8"),
    ("tcp_flags_reply", "UInt8"),
    ("present", "UInt8"),
    ("start_before_us", "Int64"),
    ("stop_after_us", "Int64"),
    ("orig_packets", "UInt64"),
    ("orig_bytes", "UInt64"),
    ("reply_packets", "UInt64"),
    ("reply_bytes", "UInt64"),
]
POD_INDEX = ["day", "family", "src_ip", "event_us", "snat_ip", "snat_port"]

# Candidate codecs by type, besides LZ4 (the base column: written with
# CODEC(LZ4), since chdb's default part compression is not LZ4).
NARROW = ["ZSTD(1)", "ZSTD(3)", "T64, ZSTD(1)", "T64, ZSTD(3)"]
WIDE = NARROW + ["Delta, ZSTD(1)", "Delta, ZSTD(3)"]
CANDIDATES = {
    "UInt8": NARROW,
    "Date": WIDE,
    "UInt16": WIDE,
    "UInt32": WIDE,
    "UInt64": WIDE,
    "Int64": WIDE,
    "FixedString(16)": ["ZSTD(1)", "ZSTD(3)"],
    "String": ["ZSTD(1)", "ZSTD(3)"],
}
# More for the time and port columns (sorted within a key).
EXTRA = {
    "event_us": ["DoubleDelta, ZSTD(1)", "DoubleDelta, ZSTD(3)", "ZSTD(6)", "T64, ZSTD(6)"],
    "snat_port": ["DoubleDelta, ZSTD(1)", "DoubleDelta, ZSTD(3)"],
}

# What-if columns (not in the schema): would another representation of a
# costly column save bytes, on 18.16 (LZ4 or ZSTD part compression) too?
DERIVED = {
    "screen.records": [
        ("event_in_day_us", "UInt64", "event_us - toUInt64(day) * 86400000000"),
    ],
    "screen.by_pod": [
        ("event_s", "UInt32", "toUInt32(intDiv(event_us, 1000000))"),
    ],
}

TYPES = dict(RECORD_COLUMNS)
STRUCTURE = ", ".join(f"{n} {t}" for n, t in RECORD_COLUMNS)
WIDE_PARTS = "min_bytes_for_wide_part = 0, min_rows_for_wide_part = 0"


def slug(codec):
    return re.sub(r"[^A-Za-z0-9]+", "_", codec).strip("_")


def q(s, sql, fmt="TSV"):
    return str(s.query(sql, fmt))


def source(path):
    return f"file('{path}', 'RowBinary', '{STRUCTURE}')"


def optimize(s, table):
    for day in q(s, f"SELECT DISTINCT partition FROM system.parts WHERE database || '.' || table "
                    f"= '{table}' AND active").split():
        q(s, f"OPTIMIZE TABLE {table} PARTITION '{day}' FINAL")


def sizes(s, table):
    db, t = table.split(".")
    rows = q(s, f"SELECT name, data_compressed_bytes FROM system.columns WHERE database = '{db}' "
                f"AND table = '{t}'")
    return {n: int(b) for n, b in (l.split("\t") for l in rows.strip().splitlines())}


def parts(s, table):
    db, t = table.split(".")
    return q(s, f"SELECT count(), sum(rows), sum(bytes_on_disk) FROM system.parts "
                f"WHERE database = '{db}' AND table = '{t}' AND active").split()


def screen(rows_path, datadir, days):
    s = session.Session(datadir)
    # Whole days only (compression works within a day's partition): the
    # `days` days after the first (partial) one.
    first = int(q(s, f"SELECT toUInt16(min(day)) FROM {source(rows_path)}").strip()) + 1
    where = f"toUInt16(day) BETWEEN {first} AND {first + days - 1}"
    q(s, "CREATE DATABASE IF NOT EXISTS screen")
    for table, cols, order in [
        ("screen.records", [n for n, _ in RECORD_COLUMNS], "snat_ip, snat_port, event_us"),
        ("screen.by_pod", POD_INDEX, "src_ip, event_us"),
    ]:
        defs, sel = [], []
        for c in cols:
            defs.append(f"{c} {TYPES[c]} CODEC(LZ4)")
            sel.append(c)
            for codec in CANDIDATES[TYPES[c]] + EXTRA.get(c, []):
                defs.append(f"{c}__{slug(codec)} {TYPES[c]} CODEC({codec})")
                sel.append(c)
        for name, typ, expr in DERIVED[table]:
            TYPES[name] = typ
            cols = cols + [name]
            defs.append(f"{name} {typ} CODEC(LZ4)")
            sel.append(expr)
            for codec in CANDIDATES[typ]:
                defs.append(f"{name}__{slug(codec)} {typ} CODEC({codec})")
                sel.append(expr)
        q(s, f"DROP TABLE IF EXISTS {table}")
        q(s, f"CREATE TABLE {table} ({', '.join(defs)}) ENGINE = MergeTree PARTITION BY day "
             f"ORDER BY ({order}) SETTINGS {WIDE_PARTS}")
        t0 = time.time()
        q(s, f"INSERT INTO {table} SELECT {', '.join(sel)} FROM {source(rows_path)} WHERE {where} "
             f"SETTINGS max_insert_block_size = 262144, min_insert_block_size_rows = 262144, "
             f"min_insert_block_size_bytes = 0, max_threads = 1")
        t1 = time.time()
        optimize(s, table)
        t2 = time.time()
        n_parts, n, _ = parts(s, table)
        n = int(n)
        size = sizes(s, table)
        print(f"\n### {table}: {n} rows, {n_parts} parts after OPTIMIZE FINAL "
              f"(load {t1 - t0:.0f} s, merge {t2 - t1:.0f} s)\n")
        print("| column | type | default (LZ4) | candidates (bytes per record) | best |")
        print("|---|---|---|---|---|")
        best_total, lz4_total, zstd_total = 0.0, 0.0, 0.0
        derived = [d[0] for d in DERIVED[table]]
        for c in cols:
            if c in derived:
                print(f"| total of the schema's columns | | {lz4_total:.3f} | "
                      f"ZSTD(1) everywhere {zstd_total:.3f} | {best_total:.3f} |")
            base = size[c] / n
            cands = [(codec, size[f"{c}__{slug(codec)}"] / n)
                     for codec in CANDIDATES[TYPES[c]] + EXTRA.get(c, [])]
            best = min(cands + [("LZ4", base)], key=lambda x: x[1])
            if c not in derived:
                lz4_total += base
                zstd_total += dict(cands)["ZSTD(1)"]
                best_total += best[1]
            what_if = " (what-if)" if c in derived else ""
            print(f"| {c}{what_if} | {TYPES[c]} | {base:.3f} | "
                  + ", ".join(f"{k} {v:.3f}" for k, v in cands)
                  + f" | {best[0]} {best[1]:.3f} |")
    s.close()


def ddl(rows_path, datadir, ddl_path):
    s = session.Session(datadir)
    statements = [l.strip() for l in open(ddl_path) if l.strip()]
    db = re.match(r"CREATE DATABASE IF NOT EXISTS (\w+)", statements[0]).group(1)
    for sql in statements:
        q(s, sql)
    t0 = time.time()
    q(s, f"INSERT INTO {db}.ctw_records SELECT * FROM {source(rows_path)} "
         f"SETTINGS max_threads = 1")
    t1 = time.time()
    total_bytes, total_cols = 0, 0.0
    n_records = None
    for t in ["ctw_records", "ctw_records_by_pod"]:
        table = f"{db}.{t}"
        optimize(s, table)
        n_parts, n, on_disk = parts(s, table)
        n = int(n)
        n_records = n_records or n
        size = sizes(s, table)
        codecs = dict(l.split("\t") for l in q(
            s, f"SELECT name, compression_codec FROM system.columns WHERE database = '{db}' "
               f"AND table = '{t}'").strip().splitlines())
        print(f"\n### {table}: {n} rows, {n_parts} parts after OPTIMIZE FINAL, "
              f"{int(on_disk) / n_records:.3f} bytes on disk per record (load {t1 - t0:.0f} s)\n")
        print("| column | codec | compressed bytes per record |")
        print("|---|---|---|")
        for c, b in size.items():
            print(f"| {c} | {codecs.get(c) or 'default (LZ4)'} | {b / n_records:.3f} |")
        cols = sum(size.values()) / n_records
        print(f"| total of columns | | {cols:.3f} |")
        total_bytes += int(on_disk)
        total_cols += cols
    print(f"\nrecords + pod index: {total_cols:.3f} bytes per record in columns, "
          f"{total_bytes / n_records:.3f} on disk (every file of the parts)")
    print(q(s, "SELECT version()").strip())
    s.close()


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "screen":
        screen(os.path.abspath(sys.argv[2]), sys.argv[3],
               int(sys.argv[4]) if len(sys.argv) > 4 else 4)
    elif len(sys.argv) >= 5 and sys.argv[1] == "ddl":
        ddl(os.path.abspath(sys.argv[2]), sys.argv[3], sys.argv[4])
    else:
        sys.exit(__doc__)
