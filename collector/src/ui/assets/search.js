// "Search" page: a form over every /api/v1/connections parameter, a table
// sortable by any column, and a histogram of the returned records' start
// times (inline SVG).

import { $, el, fill, show, hide, addr, fmtTime, fmtDuration, badge } from './dom.js';
import { api, qs } from './api.js';

const BINS = 40;
let records = [];
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
}

export function reset() {
  records = [];
  $('#search-form').reset();
  $('#search-table tbody').replaceChildren();
  for (const id of ['#search-table', '#search-summary', '#search-gaps', '#histogram', '#search-error']) hide($(id));
}

async function run() {
  const form = $('#search-form');
  const params = Object.fromEntries(new FormData(form).entries());
  const button = $('#search-button');
  button.disabled = true;
  hide($('#search-error'));
  try {
    const v = await api(`/api/v1/connections?${qs(params)}`);
    records = v.records || [];
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
    case 'src':
      return `${ipKey(r.src_ip)}#${String(r.src_port).padStart(5, '0')}`;
    case 'dst':
      return `${ipKey(r.dst_ip)}#${String(r.dst_port).padStart(5, '0')}`;
    case 'snat':
      return `${ipKey(r.snat_ip)}#${String(r.snat_port).padStart(5, '0')}`;
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
        el('td', { class: 'mono' }, r.end ? fmtTime(r.end) : el('b', {}, 'open')),
        el('td', {}, fmtDuration(r.duration_ms)),
        el('td', { class: 'node' }, r.node),
        el('td', {}, r.protocol),
        el('td', { class: 'mono src' }, addr(r.src_ip, r.src_port)),
        el('td', { class: 'mono' }, addr(r.dst_ip, r.dst_port)),
        el('td', { class: 'mono' }, addr(r.snat_ip, r.snat_port)),
        el('td', { title: r.midstream ? 'picked up mid-stream: the connection started before this entry' : null }, `${r.state ?? ''}${r.midstream ? ' (mid-stream)' : ''}${r.zone ? ` zone ${r.zone}` : ''}`),
        el('td', {}, r.kind ?? ''),
      ),
    );
  for (const th of document.querySelectorAll('#search-table th[data-key]')) {
    th.classList.toggle('asc', th.dataset.key === key && dir > 0);
    th.classList.toggle('desc', th.dataset.key === key && dir < 0);
  }
  $('#search-table tbody').replaceChildren(...rows);
  show($('#search-table'));
}
