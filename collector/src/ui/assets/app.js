// Entry point: sign-in, sign-out and the hash router (#/resolve, #/search,
// #/agents). Nothing but the sign-in form renders without a token that the
// collector accepted.

import { $, show, hide } from './dom.js';
import { api, token, ApiError, setUnauthorizedHandler } from './api.js';
import * as resolve from './resolve.js';
import * as search from './search.js';
import * as agents from './agents.js';
import { zone, setZone, localOffset } from './time.js';

const PAGES = { resolve, search, agents };
const started = new Set();
let current = null;

function signOut(message) {
  token.clear();
  current = null;
  for (const name of Object.keys(PAGES)) PAGES[name].reset?.();
  route(message);
}

setUnauthorizedHandler((message) => signOut(message));

function showOnly(id) {
  for (const p of document.querySelectorAll('.page')) p.hidden = p.id !== id;
}

function route(message) {
  if (!token.get()) {
    hide($('#top'));
    showOnly('page-signin');
    const err = $('#signin-error');
    if (message) show(err, message);
    else hide(err);
    $('#token').focus();
    document.body.dataset.page = 'signin';
    return;
  }
  show($('#top'));
  const name = (location.hash.match(/^#\/(\w+)/) || [])[1];
  const page = PAGES[name] ? name : 'resolve';
  for (const a of document.querySelectorAll('header nav a')) a.classList.toggle('active', a.dataset.page === page);
  showOnly(`page-${page}`);
  if (!started.has(page)) {
    started.add(page);
    PAGES[page].init();
  }
  if (current !== page) PAGES[page].shown?.();
  current = page;
  document.body.dataset.page = page;
  document.title = `${page[0].toUpperCase()}${page.slice(1)} · conntrack-watch`;
}

$('#signin-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const t = $('#token').value.trim();
  const button = $('#signin-button');
  button.disabled = true;
  try {
    await api('/api/v1/agents', { tokenOverride: t });
    token.set(t);
    $('#token').value = '';
    current = null;
    route();
  } catch (e) {
    const msg = e instanceof ApiError && e.status === 401 ? 'Wrong token: the collector answered 401.' : e.message;
    show($('#signin-error'), msg);
  } finally {
    button.disabled = false;
  }
});

$('#sign-out').addEventListener('click', () => signOut('Signed out.'));

// The UTC / browser-local switch: remembered; pages re-render on change.
const zoneSelect = $('#zone');
zoneSelect.querySelector('option[value=local]').textContent = `browser-local (${localOffset(new Date())})`;
zoneSelect.value = zone();
zoneSelect.addEventListener('change', () => setZone(zoneSelect.value));
window.addEventListener('hashchange', () => route());

// A token kept from earlier in this tab is checked before anything renders.
async function boot() {
  if (token.get()) {
    try {
      await api('/api/v1/agents');
    } catch (e) {
      if (!(e instanceof ApiError) || e.status !== 401) {
        // Collector unreachable: keep the token, pages show their errors.
      } else {
        return; // the 401 handler already went back to sign-in
      }
    }
  }
  route();
}

boot();
