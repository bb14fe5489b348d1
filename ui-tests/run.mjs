// Drives the collector's web UI in headless Chromium (Debian's, through
// playwright-core; no browser is downloaded) and prints one JSON object
// with what the pages showed. Run by collector/tests/ui_browser.rs inside
// the collector's network namespace:
//
//   node ui-tests/run.mjs --url http://127.0.0.1:9360 --token TOKEN \
//     --lines FILE --log-format '$remote_addr $remote_port $msec $server_port' \
//     --screenshots DIR
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
const ctx = await chromium.launchPersistentContext(userDir, {
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
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

  // Resolve: paste the nginx lines with their log_format.
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
    out.live = { line: Number(line), text: (await row.locator('.live').innerText()).replace(/\s+/g, ' ').trim() };
  }
  out.resolve = await page.$$eval('#resolve-table tbody tr', (rows) =>
    rows.map((tr) => ({
      line: Number(tr.dataset.line),
      status: tr.dataset.status,
      pod_ip: tr.querySelector('td.pod-ip').textContent.trim(),
      node: tr.querySelector('td.node').textContent.trim(),
      text: tr.innerText.replace(/\s+/g, ' ').trim(),
    })),
  );
  out.resolve_summary = (await page.innerText('#resolve-summary')).replace(/\s+/g, ' ').trim();
  out.resolve_progress = await page.textContent('#resolve-progress');
  await shot(page, 'resolve');

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

  // One ip:port and a time, from the first line.
  const [ip, port, time] = lines[0].split(/\s+/);
  await page.fill('#single-addr', `${ip}:${port}`);
  await page.fill('#single-time', time);
  await page.click('#single-button');
  await page.locator('#resolve-table tbody tr[data-status]').first().waitFor();
  out.single = await page.$eval('#resolve-table tbody tr', (tr) => ({
    status: tr.dataset.status,
    pod_ip: tr.querySelector('td.pod-ip').textContent.trim(),
    node: tr.querySelector('td.node').textContent.trim(),
  }));

  // Search: every connection to port 80, sorted by node, with a histogram.
  await page.click('nav a[data-page=search]');
  await visible('#page-search');
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
  };
  await shot(page, 'search');

  // Agents.
  await page.click('nav a[data-page=agents]');
  await visible('#page-agents');
  await page.waitForFunction(() => document.querySelectorAll('#agents-table tbody tr').length > 0);
  out.agents = await page.$$eval('#agents-table tbody tr', (rows) =>
    rows.map((tr) => ({
      node: tr.dataset.node,
      connected: tr.dataset.connected === 'true',
      text: tr.innerText.replace(/\s+/g, ' ').trim(),
    })),
  );
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
