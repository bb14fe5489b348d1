// "Agents" page: every agent the collector knows, connected or not, with
// addresses, lag, last batch and loss counters. Disconnected agents and
// agents that lost events are highlighted. Refreshes every 5 s while shown.

import { $, el, fill, show, hide, fmtTime, badge } from './dom.js';
import { api } from './api.js';

const REFRESH_MS = 5000;
let timer = null;

export function init() {
  $('#agents-refresh').addEventListener('click', load);
  window.addEventListener('hashchange', () => {
    if (!location.hash.startsWith('#/agents')) stop();
  });
}

export function shown() {
  load();
  stop();
  timer = setInterval(() => {
    if (document.body.dataset.page === 'agents' && !document.hidden) load();
  }, REFRESH_MS);
}

function stop() {
  if (timer) clearInterval(timer);
  timer = null;
}

export function reset() {
  stop();
  $('#agents-table tbody').replaceChildren();
  $('#agents-summary').textContent = '';
  hide($('#agents-error'));
}

function lag(s) {
  if (s === undefined || s === null) return '';
  return s < 1 ? `${Math.round(s * 1000)} ms` : `${s.toFixed(1)} s`;
}

async function load() {
  try {
    const v = await api('/api/v1/agents');
    hide($('#agents-error'));
    render(v.agents || []);
  } catch (e) {
    if (e.status !== 401) show($('#agents-error'), e.message);
  }
}

function render(agents) {
  const sorted = [...agents].sort((a, b) => String(a.node).localeCompare(String(b.node)));
  let down = 0;
  let lossy = 0;
  const rows = sorted.map((a) => {
    const lost = (a.events_lost || 0) > 0 || (a.loss_reports || 0) > 0;
    if (!a.connected) down += 1;
    if (lost) lossy += 1;
    const status = a.connected ? badge('ok', 'connected') : badge('bad', 'disconnected');
    const since = a.connected ? a.connected_since : a.disconnected_since;
    return el(
      'tr',
      { class: !a.connected ? 'bad' : lost ? 'warn' : null, 'data-node': a.node, 'data-connected': String(!!a.connected) },
      el('td', { class: 'node' }, el('b', {}, a.node)),
      el('td', { class: 'status' }, status, lost ? badge('warn', 'lossy', 'the agent reported lost conntrack events') : null),
      el('td', { class: 'mono' }, (a.addresses || []).map((x, i) => [i ? el('br') : null, x])),
      el('td', {}, a.version ?? ''),
      el('td', {}, lag(a.lag_seconds)),
      el('td', { class: 'mono' }, fmtTime(a.last_batch_at), a.last_batch_seq !== undefined && a.last_batch_seq !== null ? el('span', { class: 'reason' }, `seq ${a.last_batch_seq}`) : null),
      el('td', {}, a.records_stored ?? 0, el('span', { class: 'reason' }, `${a.batches_stored ?? 0} batches`)),
      el('td', {}, a.duplicates ?? 0),
      el('td', {}, a.loss_reports ?? 0),
      el('td', { class: a.events_lost ? 'lost' : null }, a.events_lost ? el('b', {}, a.events_lost) : 0),
      el('td', {}, a.conversion_errors ?? 0),
      el('td', { class: 'mono' }, fmtTime(since), el('span', { class: 'reason' }, `last seen ${fmtTime(a.last_seen)}`)),
    );
  });
  $('#agents-table tbody').replaceChildren(...rows);
  const s = $('#agents-summary');
  fill(
    s,
    `${agents.length} agent${agents.length === 1 ? '' : 's'}: `,
    badge('ok', `${agents.length - down} connected`),
    down ? badge('bad', `${down} disconnected`) : null,
    lossy ? badge('warn', `${lossy} lost events`) : null,
    el('span', { class: 'muted' }, ` · updated ${fmtTime(new Date().toISOString())}`),
  );
  show(s);
}
