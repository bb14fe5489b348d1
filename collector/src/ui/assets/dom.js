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

// RFC3339 from the API -> "2024-12-09 15:05:00.123" in local time.
export function fmtTime(t) {
  if (!t) return '';
  const d = new Date(t);
  if (Number.isNaN(d.getTime())) return String(t);
  const p = (n, w = 2) => String(n).padStart(w, '0');
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}.${p(d.getMilliseconds(), 3)}`;
}

// Time of day only: "15:05:00.123" (the date is in the row's time).
export function fmtClock(t) {
  return fmtTime(t).slice(11);
}

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
