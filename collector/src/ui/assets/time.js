// Times as the UI shows and reads them. Every time shown carries its zone
// ("UTC", or the browser's offset such as "+08:00") and only the precision
// its source has; the zone is the user's choice (UTC or browser-local, kept
// in localStorage). Typed times go to the API as typed, except zone-less
// ones (2026-11-30T10:50:34, 30/Nov/2026:10:50:34), which get the chosen
// zone's offset first: the API refuses a time without a zone.

const KEY = 'ctw.zone';
const listeners = new Set();

// 'utc' or 'local'.
export function zone() {
  return localStorage.getItem(KEY) === 'local' ? 'local' : 'utc';
}

export function setZone(z) {
  localStorage.setItem(KEY, z === 'local' ? 'local' : 'utc');
  for (const f of listeners) f();
}

// f() runs after each zone change (pages re-render their times).
export function onZoneChange(f) {
  listeners.add(f);
}

const p2 = (n, w = 2) => String(n).padStart(w, '0');

// Offset of the browser's zone at date d, as "+08:00".
export function localOffset(d) {
  const m = -d.getTimezoneOffset();
  const a = Math.abs(m);
  return `${m < 0 ? '-' : '+'}${p2(Math.floor(a / 60))}:${p2(a % 60)}`;
}

// The chosen zone as a label: "UTC" or "browser-local (+08:00)".
export function zoneLabel(d = new Date()) {
  return zone() === 'utc' ? 'UTC' : `browser-local (${localOffset(d)})`;
}

// Date (a Date, an RFC 3339 string, or ms since the epoch) -> parts in the
// chosen zone.
function parts(t) {
  const d = t instanceof Date ? t : new Date(t);
  if (Number.isNaN(d.getTime())) return null;
  const utc = zone() === 'utc';
  return {
    d,
    date: utc
      ? `${d.getUTCFullYear()}-${p2(d.getUTCMonth() + 1)}-${p2(d.getUTCDate())}`
      : `${d.getFullYear()}-${p2(d.getMonth() + 1)}-${p2(d.getDate())}`,
    clock: utc
      ? `${p2(d.getUTCHours())}:${p2(d.getUTCMinutes())}:${p2(d.getUTCSeconds())}`
      : `${p2(d.getHours())}:${p2(d.getMinutes())}:${p2(d.getSeconds())}`,
    ms: d.getUTCMilliseconds(),
    zone: utc ? 'UTC' : localOffset(d),
  };
}

function frac(ms, digits) {
  if (!digits) return '';
  return `.${p2(ms, 3).slice(0, Math.min(3, digits))}`;
}

// "2026-11-30 10:51:45.123 UTC" / "2026-11-30 18:51:45.123 +08:00".
// digits: fraction digits the source has (0-3; the API's times are ms).
export function fmtTime(t, digits = 3) {
  if (t === undefined || t === null || t === '') return '';
  const x = parts(t);
  if (!x) return String(t);
  return `${x.date} ${x.clock}${frac(x.ms, digits)} ${x.zone}`;
}

// Time of day with its zone: "10:51:45.123 UTC" (the date is elsewhere).
export function fmtClock(t, digits = 3) {
  if (t === undefined || t === null || t === '') return '';
  const x = parts(t);
  if (!x) return String(t);
  return `${x.clock}${frac(x.ms, digits)} ${x.zone}`;
}

// Fraction digits of a precision in ms: 1000 -> 0, 1 -> 3, 10 -> 2.
export function digitsOf(precisionMs) {
  if (!(precisionMs > 0)) return 3;
  return Math.max(0, Math.min(3, Math.round(3 - Math.log10(precisionMs))));
}

// Fraction digits as typed: "1764499905.12" -> 2, "10:50:57 +0000" -> 0.
export function digitsTyped(s) {
  const m = /\.(\d+)/.exec(String(s));
  return m ? Math.min(3, m[1].length) : 0;
}

const MONTHS = ['Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun', 'Jul', 'Aug', 'Sep', 'Oct', 'Nov', 'Dec'];

// A typed time for the API. Returns { value, zoneNote }: value is what to
// send (the text itself when it has a zone or is Unix seconds); zoneNote is
// set when the text had no zone and the chosen one was added
// ("read as UTC (+00:00)"). Forms the API accepts (common::api::parse_time):
// Unix seconds ($msec), RFC 3339 / $time_iso8601, $time_local, the last two
// zone-less with a zone added here.
export function typedTime(text) {
  let s = String(text ?? '').trim();
  if (s.startsWith('[') && s.endsWith(']')) s = s.slice(1, -1).trim();
  if (s === '') return { value: '' };
  // 2026-11-30T10:50:34(.123) or with a space for the T, no zone.
  let m = /^(\d{4})-(\d{2})-(\d{2})[T ](\d{2}):(\d{2}):(\d{2})(\.\d+)?$/.exec(s);
  let iso = true;
  if (!m) {
    // 30/Nov/2026:10:50:34, no zone.
    const l = /^(\d{2})\/([A-Za-z]{3})\/(\d{4}):(\d{2}):(\d{2}):(\d{2})$/.exec(s);
    const mon = l ? MONTHS.findIndex((x) => x.toLowerCase() === l[2].toLowerCase()) : -1;
    if (!l || mon < 0) return { value: s };
    m = [l[0], l[3], p2(mon + 1), l[1], l[4], l[5], l[6], undefined];
    iso = false;
  }
  let off;
  if (zone() === 'utc') {
    off = '+00:00';
  } else {
    // The browser's offset at that wall-clock time (DST included).
    const d = new Date(Number(m[1]), Number(m[2]) - 1, Number(m[3]), Number(m[4]), Number(m[5]), Number(m[6]));
    off = localOffset(d);
  }
  const value = iso ? `${s}${off}` : `${s} ${off.replace(':', '')}`;
  const name = zone() === 'utc' ? 'UTC (+00:00)' : `browser-local time (${off})`;
  return { value, zoneNote: `${s} has no zone: read as ${name}, the zone chosen at the top right` };
}
