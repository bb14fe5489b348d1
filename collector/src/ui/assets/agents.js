// "Agents" page: every agent the collector knows, connected or not, with
// addresses, lag, last heartbeat, last batch and loss counters (with
// collector replicas, every agent of the cluster and the collector holding
// its stream). Disconnected agents and agents that lost events are
// highlighted. Refreshes every 5 s while shown.
// Agents that send heartbeats (`last_heartbeat` in the answer, every
// `heartbeat_interval_seconds`): "idle" = connected, a heartbeat within
// HEARTBEAT_MISSED intervals, and no batch for an interval (at least
// IDLE_MS); a connected agent whose heartbeats stopped is "no heartbeat".
// Older agents (no `last_heartbeat`): a connected agent with no batch for
// IDLE_MS is "idle": its stream is up (the collector's HTTP/2 keepalive
// pings it every 30 s and drops it after 20 s without an answer), there is
// just nothing to send, so its lag and "last seen" are not stale news.

import { $, el, fill, show, hide, fmtTime, badge } from './dom.js';
import { api } from './api.js';
import { onZoneChange } from './time.js';

const REFRESH_MS = 5000;
const IDLE_MS = 10000;
// Heartbeats missed before a connected agent is flagged.
const HEARTBEAT_MISSED = 3;
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

// The agent's heartbeat interval in ms; null for agents without heartbeats.
function heartbeatMs(a) {
  if (!a.last_heartbeat || !a.heartbeat_interval_seconds) return null;
  return a.heartbeat_interval_seconds * 1000;
}

// A connected agent with heartbeats whose last one is older than
// HEARTBEAT_MISSED intervals (plus the page's refresh period).
function heartbeatLate(a, now) {
  const every = heartbeatMs(a);
  if (!a.connected || every === null) return false;
  return now - Date.parse(a.last_heartbeat) > HEARTBEAT_MISSED * every + REFRESH_MS;
}

// Connected, alive (a recent heartbeat, when it sends them), and no batch
// for IDLE_MS or an interval, whichever is longer (or none yet).
function isIdle(a, now) {
  if (!a.connected || heartbeatLate(a, now)) return false;
  const quietMs = Math.max(IDLE_MS, heartbeatMs(a) ?? 0);
  const t = Date.parse(a.last_batch_at ?? '');
  return Number.isNaN(t) || now - t > quietMs;
}

// The heartbeat cell: when it arrived, what it said; or that this agent
// sends none (older version).
function heartbeatCell(a, late) {
  if (!a.last_heartbeat) return el('span', { class: 'muted', title: 'this agent sends no heartbeats (older version): idle is inferred from the last batch' }, 'none');
  const said = [
    `every ${a.heartbeat_interval_seconds} s`,
    a.live_entries !== undefined && a.live_entries !== null ? `${a.live_entries} live entries` : null,
    a.last_event_at ? `newest record ${fmtTime(a.last_event_at)}` : 'no record captured yet',
    a.heartbeat_agent_time ? `agent clock ${fmtTime(a.heartbeat_agent_time)}` : null,
  ].filter(Boolean).join(', ');
  return [
    late ? el('b', {}, fmtTime(a.last_heartbeat)) : fmtTime(a.last_heartbeat),
    el('span', { class: 'reason' }, said),
  ];
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
    const late = heartbeatLate(a, now);
    if (quiet) idle += 1;
    const status = a.connected ? badge('ok', 'connected') : badge('bad', 'disconnected');
    const quietS = Math.max(IDLE_MS, heartbeatMs(a) ?? 0) / 1000;
    const idleBadge = quiet
      ? badge('ok', 'idle', a.last_heartbeat ? `heartbeats arrive, no batch for over ${quietS} s: nothing to send` : `stream connected, no batch for over ${quietS} s: nothing to send`)
      : null;
    const lateBadge = late ? badge('warn', 'no heartbeat', `connected, but no heartbeat for over ${HEARTBEAT_MISSED} intervals`) : null;
    const lastBatch = a.last_batch_at ? `last batch ${fmtTime(a.last_batch_at)}` : 'no batch yet';
    const alive = a.last_heartbeat ? `last heartbeat ${fmtTime(a.last_heartbeat)}` : null;
    const stream = a.connected
      ? [`connected since ${fmtTime(a.connected_since)}`, el('span', { class: 'reason' }, quiet ? `idle: ${alive ? `${alive}, ` : ''}${lastBatch}` : lastBatch),
         // Collector replicas: the collector holding the agent's stream.
         a.collector ? el('span', { class: 'reason', 'data-collector': a.collector }, `via collector ${a.collector}`) : null]
      : [`disconnected since ${fmtTime(a.disconnected_since)}`, el('span', { class: 'reason' }, `last seen ${fmtTime(a.last_seen)}`)];
    return el(
      'tr',
      { class: !a.connected ? 'bad' : lost || late ? 'warn' : null, 'data-node': a.node, 'data-connected': String(!!a.connected), 'data-idle': String(quiet), 'data-heartbeat': a.last_heartbeat || null },
      el('td', { class: 'node' }, el('b', {}, a.node)),
      el('td', { class: 'status' }, status, idleBadge, lateBadge, lost ? badge('warn', 'lossy', 'the agent reported lost conntrack events') : null),
      el('td', { class: 'mono' }, (a.addresses || []).map((x, i) => [i ? el('br') : null, x])),
      el('td', {}, a.version ?? ''),
      el('td', { class: 'lag', title: 'when the last batch arrived minus the newest record time in it' }, quiet ? el('span', { title: `no batch for over ${quietS} s: lag is measured on batches${a.lag_seconds !== undefined && a.lag_seconds !== null ? `; the last one's was ${lag(a.lag_seconds)}` : ''}` }, 'idle') : lag(a.lag_seconds)),
      el('td', { class: 'mono heartbeat' }, heartbeatCell(a, late)),
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
