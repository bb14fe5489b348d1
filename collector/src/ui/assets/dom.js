// Small DOM and formatting helpers shared by the pages.

export const $ = (sel, root = document) => root.querySelector(sel);

// el('td', {class: 'x', 'data-k': 1}, child, 'text', ...): children may be
// nodes, strings, numbers, null/undefined (skipped) or arrays of those.
export function el(tag, attrs = {}, ...children) {
  const ns = tag === 'svg' || attrs.svg ? 'http://www.w3.org/2000/svg' : null;
  const e = ns ? document.createElementNS(ns, tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'svg' || v === undefined || v === null || v === false) continue;
    if (k === 'onclick') e.addEventListener('click', v);
    else e.setAttribute(k, v === true ? '' : String(v));
  }
  append(e, children);
  return e;
}

function append(e, children) {
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    if (Array.isArray(c)) append(e, c);
    else e.append(c instanceof Node ? c : String(c));
  }
}

// Replace node's children; null/undefined/false children are skipped.
export function fill(node, ...children) {
  node.replaceChildren();
  append(node, children);
  return node;
}

export function show(node, text) {
  if (text !== undefined) node.textContent = text;
  node.hidden = false;
}

export function hide(node) {
  node.hidden = true;
}

// ip:port, with brackets for IPv6.
export function addr(ip, port) {
  if (ip === undefined || ip === null || ip === '') return '';
  const host = String(ip).includes(':') ? `[${ip}]` : ip;
  return port === undefined || port === null ? host : `${host}:${port}`;
}

// Times carry their zone and the chosen UTC/local switch (time.js).
export { fmtTime, fmtClock } from './time.js';

export function fmtDuration(ms) {
  if (ms === undefined || ms === null) return '';
  if (ms < 1000) return `${ms} ms`;
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(s < 10 ? 2 : 1)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} m ${Math.round(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} m`;
}

export function badge(kind, text, title) {
  return el('span', { class: `badge ${kind}`, title }, text);
}

// Help shown wherever "alive at" appears.
export const ALIVE_AT_HELP =
  'alive at = the conntrack entry existed at that time (between its first packet and its end). ' +
  'It does not mean the connection is open now, nor that it was still sending: a closed TCP ' +
  "connection's entry stays in TIME_WAIT about 120 s (nf_conntrack_tcp_timeout_time_wait) before conntrack drops it.";

const CLOSING = new Set(['TIME_WAIT', 'CLOSE']);

// A TCP state in the TIME_WAIT/CLOSE family is called "closing".
export function isClosing(state) {
  return CLOSING.has(String(state ?? ''));
}

// What a record's `state` means, by how the record was made (`kind`):
// a NEW carries the state at the connection's first packet (SYN_SENT), a
// mid-stream NEW the state at the first packet seen, a recovered record the
// state when the table was read, a DESTROY the state at the end.
export function stateText(r) {
  if (!r || !r.state) return '';
  if (r.kind === 'destroy') return `state at end: ${r.state}`;
  if (r.kind === 'recovered') return `state when read from the table: ${r.state}`;
  if (r.midstream) return `state at first packet seen: ${r.state} (mid-stream)`;
  return `state at first packet: ${r.state}`;
}

// What each last known state (`end_state`: the kernel's state in the
// DESTROY that ended the connection) says about the end shown.
const END_STATE_HELP = {
  TIME_WAIT: 'closed normally; conntrack kept the entry in TIME_WAIT until its timeout (nf_conntrack_tcp_timeout_time_wait, 120 s by default) ran out, so the end shown is about that long after the close',
  CLOSE: 'reset (or closed after a reset); conntrack dropped the entry when its CLOSE timeout (10 s by default) ran out',
  ESTABLISHED: 'the entry was removed while the connection was still established (deleted by hand, a flush, or its idle timeout)',
};

// The connection's last known state as nodes (empty without `end_state`):
// the DESTROY's state, next to the record's own (stateText).
export function endStateCell(r) {
  if (!r || !r.end_state) return [];
  const help = END_STATE_HELP[r.end_state] || 'the TCP state conntrack reported when it dropped the entry';
  return [el('span', { class: 'reason end-state', title: help }, `last known state: ${r.end_state}`)];
}

// The end of a record as nodes for a table cell: the end and how it is known
// (end_kind), or that none is known yet.
export function endCell(r, clock) {
  const f = clock || ((t) => t);
  if (!r.end) {
    return [
      el('b', { class: 'no-end', title: 'no DESTROY event yet: the conntrack entry still existed when last heard of. A closed TCP connection keeps its entry ~120 s in TIME_WAIT; look it up live for its state now.' }, 'no end yet'),
    ];
  }
  switch (r.end_kind) {
    case 'superseded':
      return [
        `by ${f(r.end)}`,
        el('span', { class: 'reason end-kind' }, 'ended at or before this (superseded: a later entry took the tuple; an upper bound)'),
      ];
    case 'gone':
      return [
        r.last_seen ? `${f(r.last_seen)} … ${f(r.end)}` : `by ${f(r.end)}`,
        el('span', { class: 'reason end-kind' }, 'ended between these (gone: last seen alive, then found gone at a re-check)'),
      ];
    default:
      return [f(r.end), el('span', { class: 'reason end-kind' }, 'ended (destroy: the kernel\'s DESTROY event)')];
  }
}

// The pod fields of an answer (issue 13: `pod`, `pod_reason`,
// `pod_verified`, `pod_ip_reused`, `pod_holders`) are present only when the
// collector names pods (kubernetes on).
export function hasPod(r) {
  return !!r && r.pod_verified !== undefined;
}

// namespace/name (Kind/name) of a pod of an answer.
export function podLabel(p) {
  const w = p.workload ? ` (${p.workload.kind}/${p.workload.name})` : '';
  return `${p.namespace}/${p.name}${w}`;
}

// The pod of an answer as nodes for a table cell: namespace/name, the
// workload, and badges when the name is not proven (a gap of the pod watch)
// or the address changed hands; or why no pod is named.
export function podCell(r) {
  if (!hasPod(r)) return [];
  const holders = (r.pod_holders || []).map((h) => `${podLabel(h)} from ${h.from}${h.to ? ` to ${h.to}` : ''}`).join('; ');
  const out = [];
  if (r.pod) {
    const p = r.pod;
    out.push(el('span', { class: 'pod-name', title: `uid ${p.uid}, node ${p.node}, held the address from ${p.from}${p.to ? ` to ${p.to}` : ''}` }, `${p.namespace}/${p.name}`));
    if (p.workload) out.push(el('span', { class: 'reason workload' }, `${p.workload.kind}/${p.workload.name}`));
  } else {
    const why = {
      no_pod_at_time: 'no pod held the address then',
      history_gap: 'the pod watch has a gap then',
      host_network: 'a hostNetwork pod (shares the node address): not named',
      ip_handover: 'the address was being handed over between pods: see the holders',
    }[r.pod_reason] || r.pod_reason || '';
    out.push(el('span', { class: 'muted no-pod', title: holders || null }, `no pod (${why})`));
  }
  if (r.pod_verified === false) out.push(' ', badge('warn', 'unverified', 'the time falls in a gap of the pod watch or in a pod IP handover (or the entry\'s start is unknown): the name is the best guess, not proven'));
  if (r.pod_ip_reused) out.push(' ', badge('warn', 'IP reused', `the address changed hands within the connection: ${holders}`));
  return out;
}
