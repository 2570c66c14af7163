// Browser tests of esk-gateway's web console, driving Chromium with
// playwright-core (no test runner): it writes through the gateway's HTTP API
// and checks that each console page shows what was written.
//
//   ESK_GATEWAY_URL        the gateway, e.g. http://127.0.0.1:8705 (required)
//   ESK_ADMIN_TOKEN        the gateway's admin token (a replay without it must be refused)
//   ESK_PARKED_PROJECTION  a projection with a parked event to replay (default accounts)
//   ESK_EXPECT_REPLAYED    how many events that replay applies (unchecked if unset)
//   ESK_EXPECT_READY       services that must show ready, comma-separated (default none)
//   ESK_TEST_CATEGORY      the category of the streams written (default console)
//   ESK_CHROMIUM           the browser (default /usr/bin/chromium)
//   ESK_SCREENSHOTS        where screenshots go (default target/console-screenshots)
//   ESK_CONSOLE_WAIT_MS    the bound of every wait (default 20000)
//
// Exits 0 when every expectation held, 1 with the failed one otherwise.

import {mkdirSync} from 'node:fs';
import {randomUUID} from 'node:crypto';
import {dirname, join, resolve} from 'node:path';
import {fileURLToPath} from 'node:url';
import {chromium} from 'playwright-core';

const here = dirname(fileURLToPath(import.meta.url));
const env = process.env;
const GATEWAY = (env.ESK_GATEWAY_URL || '').replace(/\/+$/, '');
const ADMIN = env.ESK_ADMIN_TOKEN || '';
const PARKED = env.ESK_PARKED_PROJECTION || 'accounts';
const CATEGORY = env.ESK_TEST_CATEGORY || 'console';
const READY = (env.ESK_EXPECT_READY || '').split(',').map((s) => s.trim()).filter(Boolean);
const SHOTS = resolve(env.ESK_SCREENSHOTS || join(here, '../../target/console-screenshots'));
const WAIT = Number(env.ESK_CONSOLE_WAIT_MS || 20000);
const DESKTOP = {width: 1280, height: 900};
const PHONE = {width: 375, height: 812};

const run = randomUUID().slice(0, 8);
const started = Date.now();
let step = 'start';
let page = null;
const pageErrors = [];

class Failed extends Error {}

function fail(message) {
  throw new Failed(message);
}

function log(message) {
  console.log(`[${((Date.now() - started) / 1000).toFixed(1).padStart(5)} s] ${message}`);
}

// Polls check() until it returns a truthy value; fails with what after WAIT.
async function until(what, check, timeout = WAIT) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    try {
      const v = await check();
      if (v) return v;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) fail(`timed out after ${timeout} ms waiting for ${what}${last ? ` (last error: ${last.message})` : ''}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

// One request to the gateway's API: {status, headers, doc}.
async function http(method, path, body, headers = {}) {
  const res = await fetch(GATEWAY + path, {
    method,
    headers: {Accept: 'application/json', ...(body === undefined ? {} : {'Content-Type': 'application/json'}), ...headers},
    body: body === undefined ? undefined : JSON.stringify(body),
    signal: AbortSignal.timeout(WAIT),
  });
  const text = await res.text();
  let doc = text;
  try { doc = JSON.parse(text); } catch { /* kept as text */ }
  return {status: res.status, headers: res.headers, doc};
}

async function expectHttp(method, path, body, want) {
  const r = await http(method, path, body);
  if (r.status !== want) fail(`${method} ${path} answered ${r.status}, wanted ${want}: ${JSON.stringify(r.doc)}`);
  return r;
}

async function append(stream, expected, events) {
  const r = await expectHttp('POST', `/streams/${stream}/events`, {expected_version: expected, events}, 201);
  if (!r.headers.get('esk-position')) fail(`POST /streams/${stream}/events answered without an ESK-Position header`);
  return r.doc;
}

// The locator's single element visible, within WAIT.
async function visible(selector, what) {
  const l = page.locator(selector);
  try {
    await l.first().waitFor({state: 'visible', timeout: WAIT});
  } catch {
    fail(`${what}: nothing visible matches ${selector} after ${WAIT} ms`);
  }
  return l;
}

async function count(selector) {
  return page.locator(selector).count();
}

async function open(hash) {
  await page.goto(`${GATEWAY}/console/${hash}`);
  await visible('[data-testid^=page-]', `the console at ${hash}`);
}

// A full-page screenshot on a desktop and on a phone-sized screen, where the
// navigation must collapse and nothing may be wider than the screen.
async function screenshots(name) {
  await page.screenshot({path: join(SHOTS, `${name}.png`), fullPage: true});
  await page.setViewportSize(PHONE);
  if (!(await page.locator('[data-testid=nav-toggle]').isVisible())) fail(`${name}: no menu button on a 375 px screen`);
  if (await page.locator('[data-testid=nav]').isVisible()) fail(`${name}: the navigation is not collapsed on a 375 px screen`);
  const wide = await page.evaluate(() => document.documentElement.scrollWidth);
  if (wide > PHONE.width) fail(`${name}: the page is ${wide} px wide on a ${PHONE.width} px screen (it should scroll its tables or show cards)`);
  await page.screenshot({path: join(SHOTS, `${name}-phone.png`), fullPage: true});
  await page.setViewportSize(DESKTOP);
}

// Wraps fetch() so that the test can cut the console's subscriptions as a
// network drop would, without touching the console's code.
function dropper() {
  const real = window.fetch;
  const live = new Set();
  window.__dropSubscriptions = () => {
    const n = live.size;
    for (const {controller, reader} of live) {
      controller.error(new TypeError('network error (cut by the test)'));
      reader.cancel().catch(() => {});
    }
    live.clear();
    return n;
  };
  window.fetch = async (input, init) => {
    const res = await real(input, init);
    if (!String(input).includes('/subscriptions') || !res.body) return res;
    const reader = res.body.getReader();
    const entry = {reader, controller: null};
    const body = new ReadableStream({
      start(controller) { entry.controller = controller; live.add(entry); },
      async pull(controller) {
        try {
          const {value, done} = await reader.read();
          if (done) { live.delete(entry); controller.close(); } else controller.enqueue(value);
        } catch (e) {
          live.delete(entry);
          controller.error(e);
        }
      },
      cancel(reason) { live.delete(entry); return reader.cancel(reason); },
    });
    return new Response(body, {status: res.status, statusText: res.statusText, headers: res.headers});
  };
}

// ---- the pages

async function streamsPage(stream) {
  await open('#/streams');
  await page.fill('[data-testid=stream-input]', stream);
  await page.click('[data-testid=stream-open]');
  const rows = '[data-testid=stream-view] [data-testid=event]';
  await until(`two events of ${stream} on the streams page`, async () => (await count(rows)) === 2);
  const meta = await page.getAttribute('[data-testid=stream-meta]', 'data-version');
  if (meta !== '2') fail(`the stream's version shows as ${meta}, wanted 2`);
  const first = page.locator(`${rows}[data-version="1"]`);
  const type = await first.locator('[data-testid=event-type]').innerText();
  const data = await first.locator('[data-testid=event-data]').innerText();
  if (type !== 'ConsoleOpened' || !data.includes(`"run":"${run}"`)) fail(`event 1 shows type ${type} data ${data}`);
  if (!page.url().endsWith(`#/streams/${stream}`)) fail(`opening a stream did not route to it: ${page.url()}`);

  // The category, with its newest events linking to their streams.
  const newest = `[data-testid=category][data-name="${CATEGORY}"] [data-testid=category-event][data-stream="${stream}"]`;
  await visible(newest, `the newest events of category ${CATEGORY}`);
  const order = await page.locator(newest).evaluateAll((rs) => rs.map((r) => r.dataset.version));
  if (order.join() !== '2,1') {
    const api = await http('GET', `/categories/${CATEGORY}/events?limit=10`);
    fail(`the category's newest events show versions ${order}, wanted 2,1 (newest first); `
      + `GET /categories/${CATEGORY}/events?limit=10 answered ${api.status} ${JSON.stringify(api.doc)}`);
  }

  // An unknown stream: the problem's detail is shown.
  await page.fill('[data-testid=stream-input]', `${CATEGORY}-missing${run}`);
  await page.click('[data-testid=stream-open]');
  const problem = await visible('[data-testid=stream-view] [data-testid=problem]', 'the problem of an unknown stream');
  if ((await problem.getAttribute('data-status')) !== '404') fail(`an unknown stream showed ${await problem.innerText()}`);

  await page.locator(newest).first().locator('[data-testid=stream-link]').click();
  await until('the category link to open its stream', async () => (await count(rows)) === 2);
  await screenshots('streams');

  // The menu on a phone: closed, opened by its button, closed again by a choice.
  await page.setViewportSize(PHONE);
  await page.click('[data-testid=nav-toggle]');
  await visible('[data-testid=nav-projections]', 'the opened menu on a phone');
  await page.click('[data-testid=nav-tail]');
  await until('the menu to close after a choice', async () => !(await page.locator('[data-testid=nav]').isVisible()));
  await page.setViewportSize(DESKTOP);
}

async function tailPage(stream) {
  const resumes = [];
  page.on('request', (r) => {
    if (r.url().includes('/subscriptions')) resumes.push(r.headers()['last-event-id'] ?? null);
  });
  // Every category first, then the test's category from the picker.
  await open('#/tail');
  const status = '[data-testid=tail-status]';
  await visible(`${status}[data-state=live]`, 'the live tail of every category to connect');
  await page.selectOption('[data-testid=tail-category]', CATEGORY);
  await until('the picker to route to the category', async () => page.url().endsWith(`#/tail/${CATEGORY}`));
  await visible(`${status}[data-state=live]`, 'the live tail to connect');
  const row = (v) => `[data-testid=tail-event][data-stream="${stream}"][data-version="${v}"]`;

  // From the start: the stream's first events, then one appended while
  // tailing. (Not from now: the gateway fixes where from=end starts after
  // its 200, so an event appended right after it may come before the start.)
  await page.selectOption('[data-testid=tail-from]', 'start');
  await visible(row(2), 'the events written before the tail, from the start');
  await visible(`${status}[data-state=live]`, 'the live tail to connect from the start');
  await append(stream, 2, [{type: 'ConsoleTailed', data: {run, n: 3}}]);
  await visible(row(3), 'an event appended while tailing');
  const top = await page.locator('[data-testid=tail-events] tbody tr').first().getAttribute('data-version');
  if (top !== '3') fail(`the newest event is not on top (top row is version ${top})`);

  // Paused, the page shows nothing new; resumed, it shows what came meanwhile, once.
  await page.click('[data-testid=tail-pause]');
  await visible(`${status}[data-state=paused]`, 'the tail to pause');
  await append(stream, 3, [{type: 'ConsoleTailed', data: {run, n: 4}}]);
  await page.click('[data-testid=tail-pause]');
  await visible(row(4), 'the event appended while paused, after resuming');

  // A drop: the tail reconnects with Last-Event-ID and misses nothing.
  const cut = await page.evaluate(() => window.__dropSubscriptions());
  if (cut !== 1) fail(`${cut} subscriptions were open, wanted 1`);
  await append(stream, 4, [{type: 'ConsoleTailed', data: {run, n: 5}}]);
  await visible(row(5), 'an event appended across a dropped connection');
  for (const v of [1, 2, 3, 4, 5]) {
    const n = await count(row(v));
    if (n !== 1) fail(`version ${v} shows ${n} times on the tail, wanted once`);
  }
  // The category from now and from the start, then after the pause and after the drop.
  if (resumes.length < 4 || resumes.slice(-2).some((id) => !id)) {
    fail(`the tail's reconnections did not all send Last-Event-ID: ${JSON.stringify(resumes)}`);
  }
  await until('the tail to be live again', async () => (await page.getAttribute(status, 'data-state')) === 'live');
  await screenshots('tail');
}

async function transactionsPage() {
  const [a, b] = [`account-c${run}a`, `account-c${run}b`];
  for (const s of [a, b]) {
    await expectHttp('POST', `/streams/${s}/commands/OpenAccount`,
      {expected_version: 'no-stream', data: {owner: 'console'}}, 200);
  }
  const txid = `console-${run}`;
  const participants = [a, b].map((stream) => ({stream, command: 'Deposit', data: {amount: 5}}));
  const r = await expectHttp('POST', '/transactions', {txid, participants, timeout_ms: 10000}, 200);
  if (r.doc.outcome !== 'committed') fail(`POST /transactions answered ${JSON.stringify(r.doc)}`);

  await open('#/transactions');
  const listed = `[data-testid=tx-list] [data-testid=tx][data-txid="${txid}"]`;
  await visible(listed, `transaction ${txid} in the list`);
  await until(`${txid} to show as committed`,
    async () => (await page.getAttribute(listed, 'data-outcome')) === 'committed');
  const votes = await page.locator(`${listed} [data-testid=tx-participant]`)
    .evaluateAll((ps) => ps.map((p) => `${p.dataset.stream}:${p.dataset.vote}`).sort());
  if (votes.join() !== `${a}:yes,${b}:yes`) fail(`${txid}'s participants show ${votes}`);

  await page.fill('[data-testid=tx-input]', txid);
  await page.click('[data-testid=tx-lookup]');
  const found = `[data-testid=tx-detail] [data-testid=tx][data-txid="${txid}"]`;
  await visible(found, `the lookup of ${txid}`);
  if ((await page.getAttribute(found, 'data-outcome')) !== 'committed') fail(`the lookup of ${txid} is not committed`);

  await page.fill('[data-testid=tx-input]', `missing-${run}`);
  await page.click('[data-testid=tx-lookup]');
  const problem = await visible('[data-testid=page-transactions] [data-testid=problem][data-status="404"]',
    'the problem of an unknown txid');
  if (!(await problem.innerText()).trim()) fail('the unknown txid showed an empty problem');
  await page.fill('[data-testid=tx-input]', txid);
  await page.click('[data-testid=tx-lookup]');
  await visible(found, `the lookup of ${txid}`);
  await visible(listed, `transaction ${txid} still in the list after lookups`);
  await screenshots('transactions');
}

async function deadLettersPage() {
  await open('#/dead-letters');
  const consumer = `[data-testid=dlq-consumer][data-consumer="${PARKED}"]`;
  await visible(`${consumer} [data-testid=dlq-entry]`, `a parked event of ${PARKED}`);
  const reason = await page.locator(`${consumer} [data-testid=dlq-reason]`).first().innerText();
  if (!reason.trim()) fail('a parked event shows no reason');

  if (ADMIN) {
    // Without the token the replay is refused, and the page says what it needs.
    await page.fill('[data-testid=admin-token]', '');
    await page.click(`${consumer} [data-testid=dlq-replay]`);
    const asked = await visible('[data-testid=dlq-auth]', 'the request for the admin token');
    const detail = await page.innerText('[data-testid=dlq-auth-detail]');
    if (!/admin token/i.test(await asked.innerText()) || !detail.trim()) {
      fail(`a 401 shows '${await asked.innerText()}', without the problem's detail`);
    }
    await page.fill('[data-testid=admin-token]', ADMIN);
  }
  await page.click(`${consumer} [data-testid=dlq-replay]`);
  const done = await visible(`[data-testid=dlq-replayed][data-projection="${PARKED}"]`, `the replay of ${PARKED}`);
  const replayed = await done.getAttribute('data-replayed');
  if (env.ESK_EXPECT_REPLAYED && replayed !== env.ESK_EXPECT_REPLAYED) {
    fail(`the replay applied ${replayed} events, wanted ${env.ESK_EXPECT_REPLAYED}: ${await done.innerText()}`);
  }
  log(`replay: ${await done.innerText()}`);
  await screenshots('dead-letters');
  if (ADMIN) {
    // The token is kept for the tab.
    await page.reload();
    await visible(consumer, 'the dead letters after a reload');
    if ((await page.inputValue('[data-testid=admin-token]')) !== ADMIN) fail('the admin token was not kept in the tab');
  }
}

async function projectionsPage() {
  await open('#/projections');
  const row = `[data-testid=projection][data-name="${PARKED}"]`;
  await visible(row, `projection ${PARKED}`);
  const lag = await page.locator(`${row} [data-testid=projection-lag]`).innerText();
  const rate = await page.locator(`${row} [data-testid=projection-rate]`).innerText();
  const parked = Number(await page.locator(`${row} [data-testid=projection-parked]`).innerText());
  // (parked counts since the projector started: the Rust wrapper restarted it after parking.)
  if (!lag.trim() || Number.isNaN(Number(rate)) || Number.isNaN(parked)) {
    fail(`projection ${PARKED} shows lag '${lag}', events/s '${rate}', parked '${parked}'`);
  }
  const before = await page.innerText('[data-testid=projections-updated]');
  await until('the projections page to refresh itself', async () =>
    (await page.innerText('[data-testid=projections-updated]')) !== before, 6000);
  await screenshots('projections');
}

async function servicesPage() {
  await open('#/services');
  await visible('[data-testid=service]', 'a service');
  for (const name of READY) {
    await until(`service ${name} to show ready`, async () =>
      (await page.getAttribute(`[data-testid=service][data-name="${name}"]`, 'data-ready', {timeout: 1000})) === 'true');
  }
  const shown = await page.locator('[data-testid=service]').evaluateAll((s) =>
    s.map((x) => `${x.dataset.name}${x.dataset.ready === 'true' ? '' : ' (not ready)'}`));
  log(`services: ${shown.join(', ')}`);
  await screenshots('services');
}

// ---- the run

async function main() {
  if (!GATEWAY) fail('ESK_GATEWAY_URL is not set (the gateway to test, e.g. http://127.0.0.1:8705)');
  mkdirSync(SHOTS, {recursive: true});
  step = 'the gateway answers';
  await until(`${GATEWAY}/health`, async () => (await http('GET', '/health')).status === 200);
  const index = await http('GET', '/console/');
  if (index.status !== 200 || !String(index.doc).includes('app.js')) fail(`GET /console/ answered ${index.status}`);

  step = 'append a stream';
  const stream = `${CATEGORY}-s${run}`;
  await append(stream, 'no-stream', [
    {type: 'ConsoleOpened', data: {run, n: 1}},
    {type: 'ConsoleNoted', data: {run, n: 2, note: 'x'.repeat(120)}},
  ]);

  const browser = await chromium.launch({
    executablePath: env.ESK_CHROMIUM || '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox'],
    timeout: WAIT,
  });
  try {
    const context = await browser.newContext({viewport: DESKTOP});
    context.setDefaultTimeout(WAIT);
    await context.addInitScript(dropper);
    page = await context.newPage();
    page.on('pageerror', (e) => pageErrors.push(`${step}: ${e.message}`));
    const steps = [
      ['streams', () => streamsPage(stream)],
      ['live tail', () => tailPage(stream)],
      ['transactions', transactionsPage],
      ['dead letters', deadLettersPage],
      ['projections', projectionsPage],
      ['services', servicesPage],
    ];
    for (const [name, fn] of steps) {
      step = name;
      const t = Date.now();
      await fn();
      log(`ok  ${name} (${((Date.now() - t) / 1000).toFixed(1)} s)`);
    }
    if (pageErrors.length) fail(`uncaught errors in the page:\n  ${pageErrors.join('\n  ')}`);
  } catch (e) {
    if (page) {
      const shot = join(SHOTS, `failed-${step.replace(/\W+/g, '-')}.png`);
      await page.screenshot({path: shot, fullPage: true}).catch(() => {});
      const problems = await page.locator('[data-testid=problem]').allInnerTexts().catch(() => []);
      e.message += `\n  page: ${page.url()}\n  screenshot: ${shot}`
        + (problems.length ? `\n  problems shown: ${problems.join(' | ')}` : '')
        + (pageErrors.length ? `\n  page errors: ${pageErrors.join(' | ')}` : '');
    }
    throw e;
  } finally {
    await browser.close();
  }
}

// No wait above is unbounded; this bounds the run as a whole too.
const watchdog = setTimeout(() => {
  console.error(`FAILED (${step}): the run took more than ${(WAIT * 12) / 1000} s`);
  process.exit(1);
}, WAIT * 12);
watchdog.unref();

main().then(() => {
  log(`all console checks passed; screenshots in ${SHOTS}`);
}, (e) => {
  console.error(`FAILED (${step}): ${e instanceof Failed ? e.message : e.stack || e}`);
  process.exitCode = 1;
});
