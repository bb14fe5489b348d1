// Drives the collector's web UI in headless Chromium (Debian's, through
// playwright-core; no browser is downloaded) and prints one JSON object
// with what the pages showed. Run by collector/tests/ui_browser.rs inside
// the collector's network namespace:
//
//   node ui-tests/run.mjs --url http://127.0.0.1:9360 --token TOKEN \
//     --lines FILE [--log-format '$remote_addr $remote_port $msec $server_port'] \
//     --screenshots DIR [--checks FILE] [--timezone Asia/Shanghai]
//
// The browser runs in --timezone (default Asia/Shanghai, UTC+8) so times
// shown without their zone would be caught. --checks names a JSON file:
//   { "single": [{ "addr": "ip:port", "time": "as typed", "zone": "utc|local" }],
//     "search_at": { "snat_ip": ..., "snat_port": ..., "at": "as typed",
//                    "at_zoneless": "in the browser's zone", "empty_port": N },
//     "search_workload": "KIND/NAME" }
// Every Resolve and Search row reports its pod cell (namespace/pod and
// workload as shown; empty when the collector names no pods).
//
// Exit code 0 with the JSON on stdout; any failure exits 1 with the reason
// on stderr (and a screenshot `failure.png` when a page was open).

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

const args = {};
for (let i = 2; i < process.argv.length; i += 2) args[process.argv[i].replace(/^--/, '')] = process.argv[i + 1];
for (const k of ['url', 'token', 'lines', 'screenshots']) {
  if (!args[k]) {
    console.error(`missing --${k}`);
    process.exit(2);
  }
}
const TIMEOUT = Number(args.timeout_ms || 30000);
const lines = fs.readFileSync(args.lines, 'utf8').split('\n').filter((l) => l.trim() !== '');
fs.mkdirSync(args.screenshots, { recursive: true });
fs.rmSync(path.join(args.screenshots, 'failure.png'), { force: true });
const shot = (page, name) => page.screenshot({ path: path.join(args.screenshots, `${name}.png`), fullPage: true });

const userDir = fs.mkdtempSync(path.join(os.tmpdir(), 'ctw-ui-chromium-'));
const checks = args.checks ? JSON.parse(fs.readFileSync(args.checks, 'utf8')) : {};
const ctx = await chromium.launchPersistentContext(userDir, {
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  timezoneId: args.timezone || 'Asia/Shanghai',
  viewport: { width: 1400, height: 900 },
  args: [
    '--headless',
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
  ],
});
const page = ctx.pages()[0] || (await ctx.newPage());
page.setDefaultTimeout(TIMEOUT);
const problems = [];
page.on('console', (m) => {
  if (m.type() === 'error') problems.push(`console: ${m.text()}`);
});
page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
// Everything the page loads must come from the collector itself.
const origin = new URL(args.url).origin;
page.on('request', (r) => {
  const u = r.url();
  if (!u.startsWith(origin) && !u.startsWith('blob:') && !u.startsWith('data:')) problems.push(`foreign request: ${u}`);
});

const out = { problems };
const visible = (sel) => page.locator(sel).waitFor({ state: 'visible' });
const text = (s) => s.replace(/\s+/g, ' ').trim();
// Every row of the Resolve table, cell by cell.
const resolveRows = () =>
  page.$$eval('#resolve-table tbody tr', (rows) =>
    rows.map((tr) => ({
      line: Number(tr.dataset.line),
      status: tr.dataset.status,
      pod_ip: tr.querySelector('td.pod-ip').textContent.trim(),
      node: tr.querySelector('td.node').textContent.trim(),
      time: tr.querySelector('td.time')?.textContent.trim() ?? '',
      lifetime: tr.querySelector('td.lifetime')?.innerText.replace(/\s+/g, ' ').trim() ?? '',
      // The record's own state, without the connection's last known state.
      state: (() => {
        const td = tr.querySelector('td.state')?.cloneNode(true);
        td?.querySelectorAll('.end-state').forEach((e) => e.remove());
        return td?.textContent.trim() ?? '';
      })(),
      end_state: tr.querySelector('td.state .end-state')?.textContent.trim() ?? '',
      status_text: tr.querySelector('td.status').innerText.replace(/\s+/g, ' ').trim(),
      live_button: !!tr.querySelector('.live-button'),
      // The pod cell as shown (inlined: this runs in the page).
      pod_shown: !!tr.querySelector('td.pod') && !tr.querySelector('td.pod').hidden,
      pod_name: tr.querySelector('td.pod .pod-name')?.textContent.trim() ?? '',
      pod_workload: tr.querySelector('td.pod .workload')?.textContent.trim() ?? '',
      pod_text: tr.querySelector('td.pod')?.innerText.replace(/\s+/g, ' ').trim() ?? '',
      text: tr.innerText.replace(/\s+/g, ' ').trim(),
    })),
  );
// Every Search row: source and pod cell.
const searchPodRows = () =>
  page.$$eval('#search-table tbody tr', (rows) =>
    rows.map((tr) => {
      const td = tr.querySelector('td.pod');
      return {
        src: tr.querySelector('td.src').textContent.trim(),
        pod_shown: !!td && !td.hidden,
        pod_name: td?.querySelector('.pod-name')?.textContent.trim() ?? '',
        pod_workload: td?.querySelector('.workload')?.textContent.trim() ?? '',
        pod_text: td?.innerText.replace(/\s+/g, ' ').trim() ?? '',
      };
    }),
  );
const setZone = async (z) => {
  await page.selectOption('#zone', z);
};
try {
  // Sign-in: nothing else renders; a wrong token is refused with a message.
  await page.goto(`${args.url}/#/agents`);
  await visible('#page-signin');
  out.signin = {
    header_hidden: await page.locator('#top').isHidden(),
    agents_hidden: await page.locator('#page-agents').isHidden(),
  };
  await page.fill('#token', 'not-the-token');
  await page.click('#signin-button');
  await visible('#signin-error');
  out.signin.wrong_token_message = await page.textContent('#signin-error');
  await page.fill('#token', '');
  await shot(page, 'signin');
  // Chromium logs the refused request as an error: that one was expected.
  const expected = problems.findIndex((p) => /status of 401/.test(p));
  if (expected >= 0) problems.splice(expected, 1);
  await page.fill('#token', args.token);
  await page.click('#signin-button');
  await visible('#page-agents');
  await page.click('nav a[data-page=resolve]');
  await visible('#page-resolve');

  // Resolve: paste the nginx lines with their log_format (none: the
  // collector's default). Times are shown in UTC first (the default).
  out.zone_default = await page.inputValue('#zone');
  await page.fill('#lines', lines.join('\n'));
  if (args['log-format']) await page.fill('#log-format', args['log-format']);
  await page.click('#resolve-button');
  await visible('#resolve-summary');
  await page.waitForFunction(
    (n) => document.querySelectorAll('#resolve-table tbody tr').length >= n,
    lines.length,
  );
  // A live lookup on the last row that may still be open.
  const row = page.locator('#resolve-table tbody tr:has(.live-button)').last();
  if ((await row.count()) > 0) {
    const line = await row.getAttribute('data-line');
    await row.locator('.live-button').click();
    await row.locator('.live .badge').waitFor();
    out.live = { line: Number(line), text: text(await row.locator('.live').innerText()) };
  }
  out.resolve = await resolveRows();
  out.resolve_summary = text(await page.innerText('#resolve-summary'));
  out.resolve_progress = await page.textContent('#resolve-progress');
  out.resolve_legend = text(await page.innerText('#resolve-legend'));
  await shot(page, 'resolve');

  // The switch to browser-local redraws the rows with the browser's offset,
  // and is remembered across a reload.
  await setZone('local');
  await page.waitForFunction(() => / [+-]\d\d:\d\d$/.test(document.querySelector('#resolve-table tbody td.time')?.textContent ?? ''));
  out.resolve_local = await resolveRows();
  await shot(page, 'resolve-local');
  await page.reload();
  await visible('#page-resolve');
  out.zone_after_reload = await page.inputValue('#zone');

  // The same lines from a file upload (read in the browser, sent in chunks).
  // (Clear the pasted answer first so the wait below sees the upload's.)
  await page.evaluate(() => {
    document.querySelector('#resolve-table tbody').replaceChildren();
    document.querySelector('#resolve-summary').hidden = true;
  });
  await page.setInputFiles('#file', args.lines);
  await page.waitForFunction(
    (n) => !document.querySelector('#resolve-summary').hidden && document.querySelectorAll('#resolve-table tbody tr').length >= n,
    lines.length,
  );
  out.upload = await page.$$eval('#resolve-table tbody tr td.pod-ip', (tds) => tds.map((td) => td.textContent.trim()));

  // One ip:port and a time typed as nginx writes it, or zone-less in the
  // chosen zone.
  out.single = [];
  for (const c of checks.single || []) {
    await setZone(c.zone || 'utc');
    await page.evaluate(() => document.querySelector('#resolve-table tbody').replaceChildren());
    await page.fill('#single-addr', c.addr);
    await page.fill('#single-time', c.time);
    await page.click('#single-button');
    await page.locator('#resolve-table tbody tr[data-status], #resolve-error:not([hidden])').first().waitFor();
    const rows = await resolveRows();
    out.single.push({
      ...c,
      ...(rows[0] || {}),
      error: (await page.locator('#resolve-error').isVisible()) ? await page.textContent('#resolve-error') : null,
      summary: (await page.locator('#resolve-summary').isVisible()) ? text(await page.innerText('#resolve-summary')) : '',
    });
  }
  await shot(page, 'single');
  await setZone('utc');

  // Search: one connection at a time typed as nginx writes it (alive at).
  await page.click('nav a[data-page=search]');
  await visible('#page-search');
  if (checks.search_at) {
    const a = checks.search_at;
    await page.fill('#search-form input[name=snat_ip]', a.snat_ip);
    await page.fill('#search-form input[name=snat_port]', String(a.snat_port));
    await page.fill('#search-form input[name=at]', a.at);
    await page.fill('#search-form input[name=window]', '2m');
    await page.click('#search-button');
    await page.locator('#search-table tbody tr, #search-error:not([hidden])').first().waitFor();
    out.search_at = {
      error: (await page.locator('#search-error').isVisible()) ? await page.textContent('#search-error') : null,
      rows: await page.$$eval('#search-table tbody tr', (rows) => rows.map((tr) => tr.innerText.replace(/\s+/g, ' ').trim())),
      alive: await page.$$eval('#search-table tbody td.alive', (tds) => tds.map((td) => td.textContent.trim())),
      legend: (await page.innerText('#search-legend')).replace(/\s+/g, ' ').trim(),
    };
    await shot(page, 'search-at');
    if (a.at_zoneless) {
      // The same time without a zone, typed in the browser's zone.
      await setZone('local');
      await page.fill('#search-form input[name=at]', a.at_zoneless);
      await page.click('#search-button');
      await page.waitForFunction(() => document.querySelector('#search-summary .zone-note'));
      out.search_at.zoneless = {
        rows: await page.$$eval('#search-table tbody tr', (rows) => rows.map((tr) => tr.innerText.replace(/\s+/g, ' ').trim())),
        summary: text(await page.innerText('#search-summary')),
      };
      await setZone('utc');
      await page.fill('#search-form input[name=at]', a.at);
    }
    // Nothing on the port next to it: the summary says what was searched.
    await page.fill('#search-form input[name=snat_port]', String(a.empty_port));
    await page.click('#search-button');
    await page.waitForFunction(() => document.querySelector('#search-summary .searched'));
    out.search_empty = text(await page.innerText('#search-summary'));
    await page.click('#search-form button[type=reset]');
  }
  // Every connection to port 80, sorted by node, with a histogram.
  await page.fill('#search-form input[name=dst_port]', '80');
  await page.click('#search-button');
  await visible('#search-table');
  await visible('#histogram svg');
  await page.click('#search-table th[data-key=node]');
  out.search = {
    summary: (await page.innerText('#search-summary')).replace(/\s+/g, ' ').trim(),
    nodes: await page.$$eval('#search-table tbody td.node', (tds) => tds.map((td) => td.textContent.trim())),
    pods: await page.$$eval('#search-table tbody td.src', (tds) => tds.map((td) => td.textContent.trim())),
    histogram_bars: await page.locator('#histogram rect.bar').count(),
    histogram_total: await page.$$eval('#histogram rect.bar', (rs) => rs.reduce((n, r) => n + Number(r.dataset.count), 0)),
    sorted_class: await page.getAttribute('#search-table th[data-key=node]', 'class'),
    rows: await page.$$eval('#search-table tbody tr', (rows) => rows.map((tr) => tr.innerText.replace(/\s+/g, ' ').trim())),
    pod_rows: await searchPodRows(),
  };
  await shot(page, 'search');
  // The same search narrowed to one workload (the pod filter).
  if (checks.search_workload) {
    await page.fill('#search-form input[name=workload]', checks.search_workload);
    await page.click('#search-button');
    await page.waitForFunction(
      (n) => document.querySelectorAll('#search-table tbody tr').length < n,
      out.search.rows.length,
    );
    out.search_workload = {
      summary: text(await page.innerText('#search-summary')),
      pod_rows: await searchPodRows(),
    };
    await shot(page, 'search-workload');
    await page.fill('#search-form input[name=workload]', '');
  }

  // Agents.
  await page.click('nav a[data-page=agents]');
  await visible('#page-agents');
  await page.waitForFunction(() => document.querySelectorAll('#agents-table tbody tr').length > 0);
  // No traffic now: the agents are connected and idle (the page refreshes
  // every 5 s; idle after 10 s without a batch), with a heartbeat that
  // arrived after this wait started (they come every 10 s).
  out.agents_wait_started = new Date().toISOString();
  await page.waitForFunction(
    (since) =>
      [...document.querySelectorAll('#agents-table tbody tr')].every(
        (tr) => tr.dataset.idle === 'true' && Date.parse(tr.dataset.heartbeat || '') > Date.parse(since),
      ),
    out.agents_wait_started,
    { timeout: Number(args.idle_timeout_ms || 60000) },
  );
  out.agents = await page.$$eval('#agents-table tbody tr', (rows) =>
    rows.map((tr) => ({
      node: tr.dataset.node,
      connected: tr.dataset.connected === 'true',
      idle: tr.dataset.idle === 'true',
      lag: tr.querySelector('td.lag').textContent.trim(),
      heartbeat_at: tr.dataset.heartbeat || null,
      heartbeat: tr.querySelector('td.heartbeat').innerText.replace(/\s+/g, ' ').trim(),
      stream: tr.querySelector('td.stream').innerText.replace(/\s+/g, ' ').trim(),
      text: tr.innerText.replace(/\s+/g, ' ').trim(),
    })),
  );
  out.agents_summary = text(await page.innerText('#agents-summary'));
  await shot(page, 'agents');

  // Sign out: back to sign-in, and the pages stay hidden.
  await page.click('#sign-out');
  await visible('#page-signin');
  await page.goto(`${args.url}/#/search`);
  await visible('#page-signin');
  out.signed_out = {
    search_hidden: await page.locator('#page-search').isHidden(),
    token_kept: await page.evaluate(() => sessionStorage.length),
  };
  process.stdout.write(`${JSON.stringify(out)}\n`);
  await ctx.close();
  fs.rmSync(userDir, { recursive: true, force: true });
} catch (e) {
  console.error(`ui-tests/run.mjs: ${e.stack || e}`);
  console.error(`problems so far: ${JSON.stringify(problems)}`);
  await shot(page, 'failure').catch(() => {});
  await ctx.close().catch(() => {});
  fs.rmSync(userDir, { recursive: true, force: true });
  process.exit(1);
}
