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
