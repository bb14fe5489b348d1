// "Agents" page: every agent the collector knows, connected or not, with
// addresses, lag, last batch and loss counters (with collector replicas,
// every agent of the cluster and the collector holding its stream). Disconnected agents and
// agents that lost events are highlighted. Refreshes every 5 s while shown.
// A connected agent with no batch for IDLE_MS is "idle": its stream is up
// (the collector's HTTP/2 keepalive pings it every 30 s and drops it after
// 20 s without an answer), there is just nothing to send, so its lag and
// "last seen" (the last message) are not stale news.

import { $, el, fill, show, hide, fmtTime, badge } from './dom.js';
import { api } from './api.js';
import { onZoneChange } from './time.js';

const REFRESH_MS = 5000;
const IDLE_MS = 10000;
let lastAgents = null;
let timer = null;

export function init() {
  $('#agents-refresh').addEventListener('click', load);
  onZoneChange(() => lastAgents && render(lastAgents));
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
    lastAgents = v.agents || [];
    render(lastAgents);
  } catch (e) {
    if (e.status !== 401) show($('#agents-error'), e.message);
  }
}

// Connected, and no batch in IDLE_MS (or none yet).
function isIdle(a, now) {
  if (!a.connected) return false;
  const t = Date.parse(a.last_batch_at ?? '');
  return Number.isNaN(t) || now - t > IDLE_MS;
}

function render(agents) {
  const sorted = [...agents].sort((a, b) => String(a.node).localeCompare(String(b.node)));
  const now = Date.now();
  let down = 0;
  let lossy = 0;
  let idle = 0;
  const rows = sorted.map((a) => {
    const lost = (a.events_lost || 0) > 0 || (a.loss_reports || 0) > 0;
    if (!a.connected) down += 1;
    if (lost) lossy += 1;
    const quiet = isIdle(a, now);
    if (quiet) idle += 1;
    const status = a.connected ? badge('ok', 'connected') : badge('bad', 'disconnected');
    const idleBadge = quiet ? badge('ok', 'idle', `stream connected, no batch for over ${IDLE_MS / 1000} s: nothing to send`) : null;
    const lastBatch = a.last_batch_at ? `last batch ${fmtTime(a.last_batch_at)}` : 'no batch yet';
    const stream = a.connected
      ? [`connected since ${fmtTime(a.connected_since)}`, el('span', { class: 'reason' }, quiet ? `idle: ${lastBatch}` : lastBatch),
         // Collector replicas: the collector holding the agent's stream.
         a.collector ? el('span', { class: 'reason', 'data-collector': a.collector }, `via collector ${a.collector}`) : null]
      : [`disconnected since ${fmtTime(a.disconnected_since)}`, el('span', { class: 'reason' }, `last seen ${fmtTime(a.last_seen)}`)];
    return el(
      'tr',
      { class: !a.connected ? 'bad' : lost ? 'warn' : null, 'data-node': a.node, 'data-connected': String(!!a.connected), 'data-idle': String(quiet) },
      el('td', { class: 'node' }, el('b', {}, a.node)),
      el('td', { class: 'status' }, status, idleBadge, lost ? badge('warn', 'lossy', 'the agent reported lost conntrack events') : null),
      el('td', { class: 'mono' }, (a.addresses || []).map((x, i) => [i ? el('br') : null, x])),
      el('td', {}, a.version ?? ''),
      el('td', { class: 'lag', title: 'when the last batch arrived minus the newest record time in it' }, quiet ? el('span', { title: `no batch for over ${IDLE_MS / 1000} s: lag is measured on batches${a.lag_seconds !== undefined && a.lag_seconds !== null ? `; the last one's was ${lag(a.lag_seconds)}` : ''}` }, 'idle') : lag(a.lag_seconds)),
      el('td', { class: 'mono' }, fmtTime(a.last_batch_at), a.last_batch_seq !== undefined && a.last_batch_seq !== null ? el('span', { class: 'reason' }, `seq ${a.last_batch_seq}`) : null),
      el('td', {}, a.records_stored ?? 0, el('span', { class: 'reason' }, `${a.batches_stored ?? 0} batches`)),
      el('td', {}, a.duplicates ?? 0),
      el('td', {}, a.loss_reports ?? 0),
      el('td', { class: a.events_lost ? 'lost' : null }, a.events_lost ? el('b', {}, a.events_lost) : 0),
      el('td', {}, a.conversion_errors ?? 0),
      el('td', { class: 'mono stream' }, stream),
    );
  });
  $('#agents-table tbody').replaceChildren(...rows);
  const s = $('#agents-summary');
  fill(
    s,
    `${agents.length} agent${agents.length === 1 ? '' : 's'}: `,
    badge('ok', `${agents.length - down} connected`),
    idle ? badge('ok', `${idle} idle`) : null,
    down ? badge('bad', `${down} disconnected`) : null,
    lossy ? badge('warn', `${lossy} lost events`) : null,
    el('span', { class: 'muted' }, ` · updated ${fmtTime(new Date().toISOString())}`),
  );
  show(s);
}
