// "Resolve" page: nginx access lines (pasted or from a file, sent in chunks
// to /api/v1/resolve) or one ip:port + time become rows with the pod that
// opened the connection, and a live lookup for rows that may still be open.

import { $, el, fill, show, hide, addr, fmtTime, fmtClock, fmtDuration, badge, ALIVE_AT_HELP, isClosing, stateText, endStateCell, endCell, hasPod, podCell, podLabel } from './dom.js';
import { typedTime, digitsOf, digitsTyped, onZoneChange, zoneLabel } from './time.js';
import { api, qs, ApiError } from './api.js';

// What the collector assumes when no log_format is given (shown as a hint).
const DEFAULT_FORMAT =
  '$remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent "$http_referer" "$http_user_agent" $remote_port';

const CHUNK_LINES = 5000;
// Halved on 413 until a chunk fits the collector's body limit.
let chunkBytes = 1 << 20;
const SHOWN_ROWS = 2000;

let results = [];
let running = null;
// The namespace/pod column is shown once an answer carries pod fields.
let podsShown = false;

export function init() {
  $('#log-format').placeholder = `default: ${DEFAULT_FORMAT}`;
  $('#resolve-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const lines = $('#lines').value.split(/\r?\n/);
    run(numbered(lines));
  });
  $('#file').addEventListener('change', async (ev) => {
    const f = ev.target.files[0];
    if (!f) return;
    const text = await f.text();
    run(numbered(text.split(/\r?\n/)), f.name);
    ev.target.value = '';
  });
  $('#single-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    single();
  });
  onZoneChange(rerender);
}

// The zone changed: draw the rows again from the answers kept.
function rerender() {
  if (!results.length) return;
  $('#resolve-table tbody').replaceChildren();
  render(results);
  renderSummary();
}

// On sign-out: forget everything that came from the API or was typed.
export function reset() {
  clearResults();
  $('#lines').value = '';
  $('#single-addr').value = '';
  $('#single-time').value = '';
}

function clearResults() {
  if (running) running.abort();
  results = [];
  $('#resolve-table tbody').replaceChildren();
  podsShown = false;
  for (const c of document.querySelectorAll('#resolve-table .pod-col')) c.hidden = true;
  for (const id of ['#resolve-table', '#resolve-summary', '#resolve-error', '#resolve-legend']) hide($(id));
  $('#resolve-progress').textContent = '';
}

function numbered(lines) {
  const out = [];
  lines.forEach((text, i) => {
    if (text.trim() !== '') out.push({ no: i + 1, text });
  });
  return out;
}

function options() {
  const o = {};
  const f = $('#log-format').value.trim();
  const w = $('#window').value.trim();
  const k = $('#skew').value.trim();
  if (f) o.log_format = f;
  if (w) o.window = w;
  if (k) o.skew = k;
  return o;
}

// Resolve every line, chunk by chunk, rendering rows as answers arrive.
async function run(lines, source) {
  clearResults();
  if (lines.length === 0) {
    show($('#resolve-error'), 'Paste at least one access log line, or choose a file.');
    return;
  }
  const opts = options();
  const ctl = new AbortController();
  running = ctl;
  const buttons = [$('#resolve-button'), $('#single-button')];
  buttons.forEach((b) => (b.disabled = true));
  const progress = $('#resolve-progress');
  try {
    let i = 0;
    while (i < lines.length) {
      const chunk = takeChunk(lines, i);
      progress.textContent = `${source ? `${source}: ` : ''}line ${lines[i].no} of ${lines[lines.length - 1].no}…`;
      let got;
      try {
        const ans = await api('/api/v1/resolve', {
          body: { lines: chunk.map((l) => l.text), ...opts },
          signal: ctl.signal,
        });
        got = (ans.results || []).map((r, k) => ({ ...r, window_ms: ans.window_ms, line_no: chunk[lineIndex(r, k, chunk)].no }));
      } catch (e) {
        if (e instanceof ApiError && e.status === 413 && chunk.length > 1) {
          chunkBytes = Math.max(1024, Math.floor(chunkBytes / 2));
          continue;
        }
        throw e;
      }
      if (ctl.signal.aborted) return;
      results.push(...got);
      render(got);
      i += chunk.length;
    }
    progress.textContent = '';
  } catch (e) {
    if (ctl.signal.aborted) return;
    show($('#resolve-error'), e.message);
  } finally {
    if (running === ctl) running = null;
    buttons.forEach((b) => (b.disabled = false));
    if (results.length) renderSummary();
  }
}

function takeChunk(lines, start) {
  let bytes = 0;
  let end = start;
  while (end < lines.length && end - start < CHUNK_LINES) {
    bytes += lines[end].text.length + 4;
    if (bytes > chunkBytes && end > start) break;
    end += 1;
  }
  return lines.slice(start, end);
}

// Index in the chunk of result k: its 1-based line_no when it fits.
function lineIndex(r, k, chunk) {
  const n = Number(r.line_no);
  return Number.isInteger(n) && n >= 1 && n <= chunk.length ? n - 1 : Math.min(k, chunk.length - 1);
}

// One ip:port and a time, through the search API.
async function single() {
  clearResults();
  const a = $('#single-addr').value.trim();
  const t = $('#single-time').value.trim();
  const m = /^\[?([0-9a-fA-F:.]+?)\]?:(\d{1,5})$/.exec(a);
  if (!m) {
    show($('#resolve-error'), `"${a}" is not ip:port (IPv6 as [addr]:port)`);
    return;
  }
  const typed = typedTime(t);
  try {
    const r = await lookupOne({ remote_addr: m[1], remote_port: Number(m[2]), time: typed.value }, options());
    r.line_no = '–';
    r.line = `${a} at ${t}`;
    r.time_digits = digitsTyped(t);
    r.zone_note = typed.zoneNote;
    results = [r];
    render(results);
    renderSummary();
  } catch (e) {
    show($('#resolve-error'), e.message);
  }
}

// The best connection with SNAT address remote_addr:remote_port alive at time.
async function lookupOne(p, opts, signal) {
  const q = qs({ snat_ip: p.remote_addr, snat_port: p.remote_port, at: p.time, window: opts.window || '5m', limit: 20 });
  const v = await api(`/api/v1/connections?${q}`, { signal });
  const recs = v.records || [];
  const alive = recs.filter((r) => r.alive_at !== false);
  const rec = alive[0];
  const r = {
    remote_addr: p.remote_addr,
    remote_port: p.remote_port,
    time: v.at || p.time,
    candidates: alive.length,
    incomplete: v.complete === false,
    gaps: v.gaps || [],
    searched: { from: v.from, to: v.to },
  };
  if (!rec) return { ...r, status: 'not_found', error: recs.length ? `${recs.length} connection(s) near that time, none alive at it` : 'no connection with that address and port in the window' };
  return {
    ...r,
    status: alive.length > 1 ? 'ambiguous' : 'resolved',
    pod_ip: rec.src_ip,
    pod_port: rec.src_port,
    node: rec.node,
    dst_ip: rec.dst_ip,
    dst_port: rec.dst_port,
    record: rec,
    ...(hasPod(rec)
      ? { pod: rec.pod, pod_reason: rec.pod_reason, pod_verified: rec.pod_verified, pod_ip_reused: rec.pod_ip_reused, pod_holders: rec.pod_holders }
      : {}),
  };
}

// The line's time with the precision it was logged with: the resolver's
// interval is [time, time + precision), so a one-second $time_local line
// shows no fraction and a $msec line shows ms.
function timeText(r) {
  const t = r.time;
  if (t === undefined || t === null || t === '') return '';
  if (typeof t === 'number' || /^\d+(\.\d+)?$/.test(String(t))) return fmtTime(new Date(Number(t) * 1000), digitsTyped(t));
  let digits = r.time_digits;
  if (digits === undefined && r.interval && r.interval.to) {
    const prec = Date.parse(r.interval.to) - Date.parse(t) + 1;
    if (prec > 0) digits = digitsOf(prec);
  }
  return fmtTime(t, digits ?? 3);
}

// What a "not found" searched: address, port, protocol, nodes, time window
// and the gaps in it.
function searchedText(r) {
  const parts = [`searched: SNAT address ${addr(r.remote_addr, r.remote_port)}, any protocol, every node's records`];
  if (r.interval && r.interval.from) {
    const w = r.window_ms;
    const from = w !== undefined ? new Date(Date.parse(r.interval.from) - w) : r.interval.from;
    const to = w !== undefined ? new Date(Date.parse(r.interval.to) + w) : r.interval.to;
    const when = Date.parse(r.interval.from) === Date.parse(r.time)
      ? `at the line's time ${timeText(r)}`
      : `between ${fmtTime(r.interval.from)} (the line's time less $request_time) and ${timeText(r)}`;
    const skew = r.skew_ms ? ` (± ${r.skew_ms >= 1000 ? `${r.skew_ms / 1000} s` : `${r.skew_ms} ms`} clock skew)` : '';
    parts.push(`for an entry alive ${when}${skew}, in records from ${fmtTime(from, 0)} to ${fmtTime(to, 0)}`);
  } else if (r.searched) {
    parts.push(`from ${fmtTime(r.searched.from) || '…'} to ${fmtTime(r.searched.to) || '…'}`);
  }
  const gaps = r.gaps || [];
  parts.push(gaps.length ? `gaps: ${gaps.map((g) => `${g.node} ${g.reason} ${fmtTime(g.from)} – ${fmtTime(g.to)}`).join('; ')}` : 'gaps: none (every agent connected, no events lost)');
  return parts.join('; ');
}

function statusCell(r) {
  const badges = [];
  const reasons = [];
  switch (r.status) {
    case 'resolved':
      badges.push(badge('ok', 'resolved'));
      break;
    case 'ambiguous': {
      const n = r.alive_candidates || r.near_candidates || r.candidates || '?';
      const why = r.match === 'skew'
        ? 'no connection was alive at that time; these were within the clock-skew tolerance'
        : 'several connections (distinct pods or ports) used this address and port around that time; the nearest is shown';
      badges.push(badge('warn', `ambiguous: ${n} candidates`, why));
      break;
    }
    case 'not_found':
      badges.push(badge('bad', 'not found'));
      break;
    case 'not_observed':
      badges.push(badge('bad', `not observed on ${r.node ?? '?'}`, 'the node that owns this address recorded no connection from it: its capture does not see this traffic'));
      break;
    case 'unparsed':
      badges.push(badge('bad', 'unparsed'));
      break;
    default:
      badges.push(badge('warn', String(r.status || 'unknown')));
  }
  const rec = r.record || {};
  if (rec.alive_at === true) badges.push(badge('ok', r.line_no === '–' ? 'alive at that time' : 'alive at line time', ALIVE_AT_HELP));
  if (r.midstream) badges.push(badge('ok', 'mid-stream', 'this conntrack entry was picked up mid-stream (an earlier entry of the same connection expired while idle, e.g. keepalive)'));
  if (r.merged > 1) reasons.push(`one connection, ${r.merged} conntrack entries merged`);
  if (r.error) reasons.push(r.error);
  if (r.note) reasons.push(r.note);
  if (r.zone_note) reasons.push(r.zone_note);
  if (r.status !== 'resolved' && Array.isArray(r.ranked) && r.ranked.length) {
    reasons.push(`ranked: ${r.ranked.map((c) => `${addr(c.pod_ip, c.pod_port)}${c.pod ? ` (${podLabel(c.pod)})` : ''} on ${c.node}${c.alive ? '' : ` (${c.distance_ms} ms away)`}`).join('; ')}`);
  }
  if (r.incomplete) {
    const gaps = r.gaps || [];
    const text = gaps.length
      ? gaps.map((g) => `${g.node}: ${g.reason} ${fmtTime(g.from)} – ${fmtTime(g.to)}${g.count ? ` (${g.count} lost)` : ''}`).join('; ')
      : 'an agent lost events or was disconnected in the window';
    badges.push(badge('warn', 'incomplete', text));
    reasons.push(`may be incomplete: ${text}`);
  }
  const searched = r.status === 'not_found' || r.status === 'not_observed' ? el('span', { class: 'searched' }, searchedText(r)) : null;
  return el('td', { class: 'status' }, badges, reasons.map((t) => el('span', { class: 'reason' }, t)), searched);
}

function row(r) {
  const rec = r.record || {};
  const podIp = r.pod_ip ?? rec.src_ip;
  const podPort = r.pod_port ?? rec.src_port;
  const dstIp = r.dst_ip ?? rec.dst_ip;
  const dstPort = r.dst_port ?? rec.dst_port;
  const snat = rec.snat_ip ? addr(rec.snat_ip, rec.snat_port) : '';
  const open = r.record && !rec.end;
  const lifetime = r.record
    ? [fmtClock(rec.start), ' – ', endCell(rec, (t) => fmtClock(t)), rec.duration_ms !== undefined ? el('span', { class: 'reason' }, fmtDuration(rec.duration_ms)) : null]
    : '';
  const cls = r.status === 'not_found' || r.status === 'not_observed' || r.status === 'unparsed' ? 'bad' : r.status === 'ambiguous' || r.incomplete ? 'warn' : '';
  if (r.status === 'unparsed' && !r.remote_addr) {
    // Nothing was read from the line: show the line itself.
    return el(
      'tr',
      { class: cls, 'data-line': r.line_no, 'data-status': r.status },
      el('td', { class: 'mono' }, r.line_no),
      el('td', { class: 'raw', colspan: 2 }, String(r.line ?? '').slice(0, 300)),
      el('td', { class: 'pod-ip' }),
      el('td', { class: 'pod', hidden: !podsShown }),
      el('td', { class: 'node' }),
      el('td', { colspan: 4 }),
      statusCell(r),
      el('td', {}),
    );
  }
  const tr = el(
    'tr',
    { class: cls || null, 'data-line': r.line_no, 'data-status': r.status },
    el('td', { class: 'mono', title: r.line }, r.line_no),
    el('td', { class: 'mono', title: r.line }, addr(r.remote_addr, r.remote_port)),
    el('td', { class: 'mono time' }, timeText(r)),
    el('td', { class: 'pod-ip' }, podIp ?? ''),
    el('td', { class: 'pod', hidden: !podsShown }, podCell(r)),
    el('td', { class: 'node' }, r.node ?? rec.node ?? ''),
    el('td', { class: 'mono' }, podIp ? `${addr(podIp, podPort)} → ${addr(dstIp, dstPort)}` : ''),
    el('td', { class: 'mono' }, snat),
    el('td', { class: 'mono lifetime', title: r.record ? `${rec.start} – ${rec.end || 'no end yet'}` : null }, lifetime),
    el('td', { class: 'state' }, stateText(rec), r.record && !rec.end && isClosing(rec.state) ? [' ', badge('warn', 'closing', 'TIME_WAIT or CLOSE: closed; conntrack drops the entry about 120 s after the close')] : null, endStateCell(rec)),
    statusCell(r),
  );
  const action = el('td', {});
  if (open) {
    const out = el('div', { class: 'live' });
    const b = el('button', { type: 'button', class: 'secondary small live-button', title: 'ask the node for the live conntrack entry' }, 'Look up live');
    b.addEventListener('click', () => lookupLive(rec, b, out));
    action.append(b, out);
  }
  tr.append(action);
  return tr;
}

// Live entry by the reply tuple: server (dst) -> SNAT address.
async function lookupLive(rec, button, out) {
  button.disabled = true;
  out.textContent = 'asking the node…';
  const q = qs({
    protocol: rec.protocol,
    tuple: 'reply',
    src_ip: rec.dst_ip,
    src_port: rec.dst_port,
    dst_ip: rec.snat_ip,
    dst_port: rec.snat_port,
    node: rec.node,
  });
  try {
    const v = await api(`/api/v1/conntrack/query?${q}`);
    const o = v.origin || {};
    const closing = isClosing(v.status);
    fill(
      out,
      closing
        ? badge('warn', `live: closing (${v.status})`, 'the connection is closed; conntrack keeps the entry in TIME_WAIT about 120 s after the close (nf_conntrack_tcp_timeout_time_wait), then drops it')
        : badge('ok', `live: ${v.status || 'open'}`),
      closing ? el('span', { class: 'reason' }, 'closed: conntrack drops the entry within ~120 s of the close') : null,
      el('span', { class: 'mono' }, `${addr(o.src, o.src_port)} → ${addr(o.dst, o.dst_port)}`),
      el('span', { class: 'reason' }, `${v.node || ''} zone ${v.zone ?? 0} ${(v.flags || []).join(' ')}${v.midstream ? ' · picked up mid-stream' : ''}`),
    );
  } catch (e) {
    const gone = e instanceof ApiError && e.status === 404;
    fill(out, badge(gone ? 'warn' : 'bad', gone ? 'closed' : `error ${e.status || ''}`), el('span', { class: 'reason' }, e.message));
  } finally {
    button.disabled = false;
  }
}

function render(rows) {
  const tbody = $('#resolve-table tbody');
  if (!podsShown && rows.some(hasPod)) {
    // The collector names pods: show the column (from now on).
    podsShown = true;
    for (const c of document.querySelectorAll('#resolve-table .pod-col, #resolve-table td.pod')) c.hidden = false;
  }
  const room = SHOWN_ROWS - tbody.childElementCount;
  if (room > 0) tbody.append(...rows.slice(0, room).map(row));
  show($('#resolve-table'));
  fill(
    $('#resolve-legend'),
    el('b', {}, 'Times'), ` in ${zoneLabel()} (switch at the top right); a line's time has the precision it was logged with. `,
    el('b', {}, 'alive at'), ` — ${ALIVE_AT_HELP} `,
    el('b', {}, 'state at first packet'), " — a NEW record's TCP state (SYN_SENT for a connection seen from its start); the state later in the connection is its live state. ",
    el('b', {}, 'end'), ' — destroy: the DESTROY event; superseded: a later entry took the tuple (an upper bound); gone: found gone at a re-check (between last seen and the end).',
  );
  show($('#resolve-legend'));
}

function renderSummary() {
  const c = { resolved: 0, not_found: 0, ambiguous: 0, not_observed: 0, unparsed: 0, incomplete: 0 };
  for (const r of results) {
    if (r.status in c) c[r.status] += 1;
    if (r.incomplete) c.incomplete += 1;
  }
  const s = $('#resolve-summary');
  const shown = results.length > SHOWN_ROWS ? ` (first ${SHOWN_ROWS} shown)` : '';
  const zoneNote = results.find((r) => r.zone_note)?.zone_note;
  fill(
    s,
    `${results.length} line${results.length === 1 ? '' : 's'}${shown}: `,
    badge('ok', `${c.resolved} resolved`),
    c.ambiguous ? badge('warn', `${c.ambiguous} ambiguous`) : null,
    c.not_found ? badge('bad', `${c.not_found} not found`) : null,
    c.not_observed ? badge('bad', `${c.not_observed} not observed`) : null,
    c.unparsed ? badge('bad', `${c.unparsed} unparsed`) : null,
    c.incomplete ? badge('warn', `${c.incomplete} incomplete`) : null,
    el('button', { type: 'button', class: 'secondary small', id: 'resolve-download', onclick: download }, 'Download CSV'),
    zoneNote ? el('span', { class: 'muted zone-note' }, ` · ${zoneNote}`) : null,
  );
  show(s);
}

function download() {
  const esc = (v) => {
    const s = v === undefined || v === null ? '' : String(v);
    return /[",\n]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
  };
  const head = ['line_no', 'remote_addr', 'remote_port', 'time', 'status', 'pod_ip', 'pod_port', 'node', 'dst_ip', 'dst_port', 'start', 'end', 'incomplete', 'midstream', 'note', 'error', 'line'];
  // With pod names (kubernetes on): the pod's columns at the end.
  const pods = results.some(hasPod);
  if (pods) head.push('pod_namespace', 'pod_name', 'pod_workload', 'pod_reason', 'pod_verified', 'pod_ip_reused');
  const lines = [head.join(',')];
  for (const r of results) {
    const rec = r.record || {};
    const row = [r.line_no, r.remote_addr, r.remote_port, r.time, r.status, r.pod_ip ?? rec.src_ip, r.pod_port ?? rec.src_port, r.node ?? rec.node, r.dst_ip ?? rec.dst_ip, r.dst_port ?? rec.dst_port, rec.start, rec.end, r.incomplete ? 'yes' : '', r.midstream ? 'yes' : '', r.note, r.error, r.line];
    if (pods) {
      const p = r.pod;
      const w = p && p.workload ? `${p.workload.kind}/${p.workload.name}` : '';
      row.push(p?.namespace, p?.name, w, r.pod_reason, hasPod(r) ? String(r.pod_verified) : '', r.pod_ip_reused ? 'true' : '');
    }
    lines.push(row.map(esc).join(','));
  }
  const url = URL.createObjectURL(new Blob([`${lines.join('\n')}\n`], { type: 'text/csv' }));
  const a = el('a', { href: url, download: 'resolved.csv' });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}
