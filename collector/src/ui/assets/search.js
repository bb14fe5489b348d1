// "Search" page: a form over every /api/v1/connections parameter, a table
// sortable by any column, and a histogram of the returned records' start
// times (inline SVG).

import { $, el, fill, show, hide, addr, fmtTime, fmtDuration, badge, ALIVE_AT_HELP, isClosing, stateText, endStateCell, endCell, hasPod, podCell, podLabel } from './dom.js';
import { typedTime, onZoneChange, zoneLabel } from './time.js';
import { api, qs } from './api.js';

const BINS = 40;
let records = [];
let last = null; // the last answer, kept to redraw on a zone change
let zoneNotes = [];
let lastParams = {};
let sort = { key: 'start', dir: -1 };

export function init() {
  const form = $('#search-form');
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    run();
  });
  for (const b of form.querySelectorAll('button[data-last]')) {
    b.addEventListener('click', () => {
      form.elements.from.value = String(Math.floor(Date.now() / 1000) - Number(b.dataset.last));
      form.elements.to.value = '';
      form.elements.at.value = '';
      form.elements.window.value = '';
      run();
    });
  }
  for (const th of document.querySelectorAll('#search-table th[data-key]')) {
    th.addEventListener('click', () => {
      const key = th.dataset.key;
      sort = { key, dir: sort.key === key ? -sort.dir : 1 };
      renderTable();
    });
  }
  onZoneChange(() => {
    if (!last) return;
    renderSummary(last);
    renderHistogram(last);
    renderTable();
  });
}

export function reset() {
  records = [];
  last = null;
  $('#search-form').reset();
  $('#search-table tbody').replaceChildren();
  for (const id of ['#search-table', '#search-summary', '#search-gaps', '#histogram', '#search-error', '#search-legend']) hide($(id));
}

async function run() {
  const form = $('#search-form');
  const params = Object.fromEntries(new FormData(form).entries());
  // Typed times as nginx writes them go as typed; zone-less ones get the
  // zone chosen at the top right (said next to the result).
  zoneNotes = [];
  for (const k of ['from', 'to', 'at']) {
    const t = typedTime(params[k]);
    params[k] = t.value;
    if (t.zoneNote) zoneNotes.push(`${k}: ${t.zoneNote}`);
  }
  const button = $('#search-button');
  button.disabled = true;
  hide($('#search-error'));
  try {
    const v = await api(`/api/v1/connections?${qs(params)}`);
    records = v.records || [];
    last = v;
    lastParams = params;
    renderSummary(v);
    renderHistogram(v);
    renderTable();
  } catch (e) {
    const p = e.body && e.body.parameter;
    show($('#search-error'), p ? `${e.message} (parameter ${p})` : e.message);
    if (p && form.elements[p]) form.elements[p].focus();
  } finally {
    button.disabled = false;
  }
}

function renderSummary(v) {
  const s = $('#search-summary');
  const more = v.total > v.returned;
  fill(
    s,
    el('b', {}, `${v.total}`),
    ` match${v.total === 1 ? '' : 'es'}, ${v.returned} returned`,
    more ? ` (limit ${v.limit}: raise it or narrow the filter to see all)` : '',
    v.from || v.to ? el('span', { class: 'muted' }, ` · ${fmtTime(v.from) || '…'} – ${fmtTime(v.to) || '…'}`) : '',
    ' ',
    v.complete ? badge('ok', 'complete') : badge('warn', 'may be incomplete'),
    zoneNotes.map((n) => el('span', { class: 'reason zone-note' }, n)),
    v.total === 0 ? el('span', { class: 'searched' }, searchedText(v)) : null,
  );
  show(s);
  const g = $('#search-gaps');
  const gaps = v.gaps || [];
  if (v.complete || gaps.length === 0) {
    hide(g);
    return;
  }
  fill(
    g,
    el('b', {}, 'Records may be missing: '),
    'agents lost events or were not connected during part of this range.',
    el('ul', {}, gaps.map((x) => el('li', {}, `${x.node}: ${x.reason} from ${fmtTime(x.from)} to ${fmtTime(x.to)}${x.count ? `, ${x.count} events` : ''}`))),
  );
  show(g);
}

// What an empty search looked for: every filter given, the protocol, the
// time range and the gaps in it.
function searchedText(v) {
  const p = lastParams;
  const f = [];
  const pair = (ip, port, what) => {
    if (p[ip] || p[port]) f.push(`${what} ${p[ip] || '*'}:${p[port] || '*'}`);
  };
  pair('src_ip', 'src_port', 'pod (src)');
  pair('dst_ip', 'dst_port', 'dst');
  pair('snat_ip', 'snat_port', 'SNAT');
  f.push(`protocol ${p.protocol || 'any'}`);
  f.push(p.node ? `node ${p.node}` : 'every node');
  if (p.kind) f.push(`kind ${p.kind}`);
  f.push(v.from || v.to ? `from ${fmtTime(v.from) || 'the first record'} to ${fmtTime(v.to) || 'now'}` : 'any time');
  const gaps = v.gaps || [];
  f.push(gaps.length ? `gaps: ${gaps.map((g) => `${g.node} ${g.reason} ${fmtTime(g.from)} – ${fmtTime(g.to)}`).join('; ')}` : 'gaps: none');
  return `No connection found. Searched: ${f.join(', ')}.`;
}

function ms(t) {
  const n = Date.parse(t);
  return Number.isNaN(n) ? null : n;
}

function renderHistogram(v) {
  const box = $('#histogram');
  const times = records.map((r) => ms(r.start)).filter((t) => t !== null);
  if (times.length === 0) {
    hide(box);
    return;
  }
  let lo = Math.min(...times);
  let hi = Math.max(...times);
  if (hi - lo < 1000) {
    lo -= 500;
    hi += 500;
  }
  const width = (hi - lo) / BINS;
  const counts = new Array(BINS).fill(0);
  for (const t of times) counts[Math.min(BINS - 1, Math.floor((t - lo) / width))] += 1;
  const max = Math.max(...counts);
  // Drawn at the box's pixel width so text is not stretched.
  show(box);
  const W = Math.max(400, box.clientWidth - 30);
  const H = 170;
  const top = 14;
  const bottom = 22;
  const left = 34;
  const plotH = H - top - bottom;
  const bw = (W - left) / BINS;
  const s = { svg: true };
  const svg = el('svg', { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: 'img', 'aria-label': 'connections started over time' });
  svg.append(
    el('line', { ...s, x1: left, y1: top + plotH, x2: W, y2: top + plotH }),
    el('line', { ...s, x1: left, y1: top, x2: W, y2: top }),
    el('text', { ...s, x: left - 4, y: top + 4, 'text-anchor': 'end' }, max),
    el('text', { ...s, x: left - 4, y: top + plotH, 'text-anchor': 'end' }, 0),
    el('text', { ...s, x: left, y: H - 6 }, fmtTime(new Date(lo).toISOString())),
    el('text', { ...s, x: W, y: H - 6, 'text-anchor': 'end' }, fmtTime(new Date(hi).toISOString())),
  );
  counts.forEach((c, i) => {
    if (!c) return;
    const h = Math.max(1, (c / max) * plotH);
    const from = new Date(lo + i * width).toISOString();
    const to = new Date(lo + (i + 1) * width).toISOString();
    svg.append(
      el(
        'rect',
        { ...s, class: 'bar', x: left + i * bw + 1, y: top + plotH - h, width: Math.max(1, bw - 2), height: h, 'data-count': c },
        el('title', s, `${c} started ${fmtTime(from)} – ${fmtTime(to)}`),
      ),
    );
  });
  const partial = v.total > v.returned ? ` (the ${v.returned} returned of ${v.total})` : '';
  box.replaceChildren(el('h2', {}, `Connections started over time${partial}, ${fmtDuration(Math.round(width))} per bar`), svg);
  show(box);
}

function ipKey(ip) {
  const s = String(ip ?? '');
  const m = /^(\d+)\.(\d+)\.(\d+)\.(\d+)$/.exec(s);
  return m ? `4:${m.slice(1).map((x) => x.padStart(3, '0')).join('.')}` : `6:${s}`;
}

function sortValue(r, key) {
  switch (key) {
    case 'start':
    case 'end':
      return ms(r[key]) ?? -Infinity;
    case 'duration_ms':
      return r.duration_ms ?? -Infinity;
    case 'alive_at':
      return r.alive_at === undefined ? '' : String(r.alive_at);
    case 'src':
      return `${ipKey(r.src_ip)}#${String(r.src_port).padStart(5, '0')}`;
    case 'dst':
      return `${ipKey(r.dst_ip)}#${String(r.dst_port).padStart(5, '0')}`;
    case 'snat':
      return `${ipKey(r.snat_ip)}#${String(r.snat_port).padStart(5, '0')}`;
    case 'pod':
      return r.pod ? podLabel(r.pod) : `~${r.pod_reason ?? ''}`;
    default:
      return String(r[key] ?? '');
  }
}

function renderTable() {
  const { key, dir } = sort;
  const rows = records
    .map((r, i) => [sortValue(r, key), i, r])
    .sort((a, b) => (a[0] < b[0] ? -dir : a[0] > b[0] ? dir : a[1] - b[1]))
    .map(([, , r]) =>
      el(
        'tr',
        {},
        el('td', { class: 'mono' }, fmtTime(r.start)),
        el('td', { class: 'mono end' }, endCell(r, (t) => fmtTime(t))),
        el('td', {}, fmtDuration(r.duration_ms)),
        el('td', { class: 'node' }, r.node),
        el('td', {}, r.protocol),
        el('td', { class: 'mono src' }, addr(r.src_ip, r.src_port)),
        el('td', { class: 'pod' }, podCell(r)),
        el('td', { class: 'mono' }, addr(r.dst_ip, r.dst_port)),
        el('td', { class: 'mono' }, addr(r.snat_ip, r.snat_port)),
        el(
          'td',
          { class: 'state', title: r.midstream ? 'picked up mid-stream: the connection started before this entry' : null },
          stateText(r),
          !r.end && isClosing(r.state) ? badge('warn', 'closing') : null,
          endStateCell(r),
          r.zone ? ` zone ${r.zone}` : '',
        ),
        el('td', {}, r.kind ?? ''),
        el('td', { class: 'alive', title: ALIVE_AT_HELP }, r.alive_at === undefined ? '' : r.alive_at ? 'yes' : 'no'),
      ),
    );
  for (const th of document.querySelectorAll('#search-table th[data-key]')) {
    th.classList.toggle('asc', th.dataset.key === key && dir > 0);
    th.classList.toggle('desc', th.dataset.key === key && dir < 0);
  }
  $('#search-table tbody').replaceChildren(...rows);
  show($('#search-table'));
  const withAt = records.some((r) => r.alive_at !== undefined);
  for (const c of document.querySelectorAll('#search-table .alive-col, #search-table td.alive')) c.hidden = !withAt;
  const withPods = records.some(hasPod);
  for (const c of document.querySelectorAll('#search-table .pod-col, #search-table td.pod')) c.hidden = !withPods;
  fill(
    $('#search-legend'),
    el('b', {}, 'Times'), ` in ${zoneLabel()}. `,
    withAt ? [el('b', {}, 'alive at'), ` (the time searched with at) — ${ALIVE_AT_HELP} `] : null,
    el('b', {}, 'state'), " — as the record saw it: at the first packet for a NEW record, at the end for a DESTROY; TIME_WAIT or CLOSE is called closing. ",
    el('b', {}, 'end'), ' — destroy: the DESTROY event; superseded: a later entry took the tuple (an upper bound); gone: found gone at a re-check (between last seen and the end); no end yet: no DESTROY so far (a closed TCP connection keeps its entry ~120 s).',
  );
  show($('#search-legend'));
}
