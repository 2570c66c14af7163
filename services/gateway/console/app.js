// esk console: static pages over the gateway's HTTP API. No framework and no
// build step: the gateway embeds this file as it is. Every page is a function
// that fills its section and returns what stops its timers and connections.
'use strict';

// The API is served beside the console, under whatever prefix a proxy adds.
const BASE = location.pathname.replace(/\/console(\/.*)?$/, '');
const TOKEN_KEY = 'esk.adminToken';
const TAIL_ROWS = 500; // rows kept on the live tail; older ones drop off the bottom

// ---- DOM and formatting helpers

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v == null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'testid') el.dataset.testid = v;
    else if (k === 'class') el.className = v;
    else el.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat()) {
    if (c != null && c !== false) el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

const enc = encodeURIComponent;

function fmtTime(t) {
  if (t == null || t === '') return '–';
  const d = new Date(t);
  return isNaN(d) ? String(t) : d.toISOString().replace('T', ' ');
}

function fmtSecs(ms) {
  return ms < 1000 ? `${ms} ms` : `${(ms / 1000).toFixed(1)} s`;
}

// Compact JSON; long values fold into a <details> with the pretty form.
function dataCell(v) {
  const s = JSON.stringify(v);
  if (s === undefined) return '–';
  if (s.length <= 80) return h('code', null, s);
  return h('details', {class: 'data'}, h('summary', null, h('code', null, s.slice(0, 77) + '…')),
    h('pre', null, JSON.stringify(v, null, 2)));
}

function badge(ok, yes, no, testid) {
  return h('span', {class: `badge ${ok ? 'ok' : 'bad'}`, testid}, ok ? yes : no);
}

function streamLink(stream) {
  return h('a', {href: `#/streams/${enc(stream)}`, testid: 'stream-link'}, stream);
}

// A table that becomes cards on narrow screens. cols: [label, cell(item), testid?].
function grid(cols, testid, rowAttrs) {
  const body = h('tbody');
  const el = h('div', {class: 'scroll'}, h('table', {class: 'cards', testid},
    h('thead', null, h('tr', null, cols.map(([label]) => h('th', null, label)))), body));
  const row = (it) => h('tr', rowAttrs ? rowAttrs(it) : null,
    cols.map(([label, cell, id]) => h('td', {'data-label': label, testid: id}, cell(it))));
  return {
    el, body,
    add(items, top) {
      const rows = items.map(row);
      if (top) body.prepend(...rows); else body.append(...rows);
    },
    set(items) { body.replaceChildren(...items.map(row)); },
  };
}

// ---- the API

// A failed request: an RFC 9457 problem from the gateway, or one made up
// here when it did not answer or answered something else.
class Problem extends Error {
  constructor(status, doc) {
    super(doc.detail || doc.title || `HTTP ${status}`);
    this.status = status;
    this.doc = doc;
  }
}

async function problemOf(res) {
  const text = await res.text().catch(() => '');
  let doc = null;
  try { doc = JSON.parse(text); } catch { /* not JSON */ }
  if (!doc || typeof doc !== 'object') doc = {title: res.statusText, detail: text.trim() || `${res.status} ${res.statusText}`};
  return new Problem(res.status, doc);
}

async function api(path, {method = 'GET', body, headers = {}, signal} = {}) {
  const all = {Accept: 'application/json', ...headers};
  if (body !== undefined) all['Content-Type'] = 'application/json';
  let res;
  try {
    res = await fetch(BASE + path, {method, headers: all, signal, cache: 'no-store',
      body: body === undefined ? undefined : JSON.stringify(body)});
  } catch (e) {
    if (e.name === 'AbortError') throw e;
    throw new Problem(0, {title: 'unreachable', detail: `the gateway did not answer (${e.message})`});
  }
  if (!res.ok) throw await problemOf(res);
  const text = await res.text();
  return text ? JSON.parse(text) : null;
}

// Where a page shows its last failure; show(slot, null) clears it.
function slot() {
  return h('div', {class: 'slot', 'aria-live': 'polite'});
}

function show(where, err) {
  if (!err) { where.replaceChildren(); return; }
  console.error(err);
  const title = err.doc && err.doc.title && err.doc.title !== err.message ? err.doc.title : null;
  where.replaceChildren(h('div', {class: 'problem', role: 'alert', testid: 'problem', 'data-status': err.status ?? ''},
    err.status ? h('strong', null, `${err.status} `) : null, title ? h('span', null, `${title}: `) : null, err.message));
}

// Calls fn now and every ms after each call ends, until the returned stop.
function poll(ms, fn) {
  let timer = null;
  let stopped = false;
  const tick = async () => {
    try { await fn(); } finally { if (!stopped) timer = setTimeout(tick, ms); }
  };
  tick();
  return () => { stopped = true; clearTimeout(timer); };
}

// ---- events, as the streams, categories and live tail show them

const EVENT_COLS = [
  ['version', (e) => String(e.version), 'event-version'],
  ['type', (e) => e.type, 'event-type'],
  ['data', (e) => dataCell(e.data), 'event-data'],
  ['time (UTC)', (e) => fmtTime(e.time)],
  ['position', (e) => h('code', null, e.position)],
];
const STREAM_COL = ['stream', (e) => streamLink(e.stream), 'event-stream'];

function eventAttrs(testid) {
  return (e) => ({testid, 'data-stream': e.stream, 'data-version': e.version, 'data-type': e.type, 'data-id': e.id});
}

// ---- Streams: one stream, page by page; the categories and their newest events

function streamsPage(root, arg) {
  const input = h('input', {type: 'search', name: 'stream', placeholder: 'stream, e.g. order-1', value: arg,
    required: true, autocomplete: 'off', spellcheck: 'false', 'aria-label': 'stream', testid: 'stream-input'});
  const direction = h('select', {'aria-label': 'order', testid: 'stream-direction'},
    h('option', {value: 'forwards'}, 'oldest first'), h('option', {value: 'backwards'}, 'newest first'));
  const view = h('div', {class: 'stream', testid: 'stream-view'});
  const cats = h('div', {class: 'cats', testid: 'categories'});
  const catsMsg = slot();

  async function open(name) {
    const msg = slot();
    const meta = h('p', {class: 'meta', testid: 'stream-meta'}, 'loading…');
    const events = grid(EVENT_COLS, 'stream-events', eventAttrs('event'));
    const more = h('button', {type: 'button', hidden: true, testid: 'stream-more'}, 'More');
    view.replaceChildren(h('h2', null, name), meta, msg, events.el, more);
    let from = null;
    async function next() {
      const q = new URLSearchParams({direction: direction.value, limit: '50'});
      if (from != null) q.set('from', from);
      more.disabled = true;
      try {
        const doc = await api(`/streams/${enc(name)}?${q}`);
        meta.textContent = `version ${doc.version}`;
        meta.dataset.version = doc.version;
        events.add(doc.events);
        from = doc.next;
        more.hidden = doc.next == null;
        show(msg, null);
      } catch (e) {
        meta.textContent = '';
        show(msg, e);
      } finally {
        more.disabled = false;
      }
    }
    more.addEventListener('click', next);
    await next();
  }

  async function categories() {
    try {
      const {categories: list} = await api('/categories');
      show(catsMsg, null);
      if (!list.length) { cats.replaceChildren(h('p', {class: 'empty'}, 'No categories yet.')); return; }
      cats.replaceChildren(...list.map((c) => {
        const box = h('div', {class: 'events'}, 'loading…');
        api(`/categories/${enc(c.name)}/events?limit=10`)
          .then(({events}) => {
            if (!events.length) { box.replaceChildren(h('p', {class: 'empty'}, 'No events.')); return; }
            const g = grid([STREAM_COL, ...EVENT_COLS], 'category-events', eventAttrs('category-event'));
            g.set(events);
            box.replaceChildren(g.el);
          })
          .catch((e) => show(box, e));
        return h('details', {class: 'card', open: true, testid: 'category', 'data-name': c.name},
          h('summary', null, h('strong', null, c.name), ` · ${c.partitions} partitions · `,
            h('a', {href: `#/tail/${enc(c.name)}`}, 'tail')), box);
      }));
    } catch (e) {
      show(catsMsg, e);
    }
  }

  const form = h('form', {class: 'bar', onsubmit: (e) => {
    e.preventDefault();
    const name = input.value.trim();
    if (!name) return;
    const hash = `#/streams/${enc(name)}`;
    if (location.hash === hash) open(name); else location.hash = hash;
  }}, input, direction, h('button', {type: 'submit', testid: 'stream-open'}, 'Open'));
  direction.addEventListener('change', () => { if (arg) open(arg); });

  root.append(h('h1', null, 'Streams'), form, view,
    h('div', {class: 'heading'}, h('h2', null, 'Categories'),
      h('button', {type: 'button', class: 'secondary', onclick: categories, testid: 'categories-refresh'}, 'Refresh')),
    catsMsg, cats);
  if (arg) open(arg);
  categories();
  return {update(name) { input.value = name; arg = name; if (name) open(name); else view.replaceChildren(); }};
}

// ---- Live tail: Server-Sent Events read with fetch() (EventSource cannot
// send headers), resumed with Last-Event-ID after a drop or a pause.

// Reads an event-stream body, calling onMessage({id, data}) per event.
async function readEvents(body, onMessage) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buf = '';
  let id = null;
  let data = [];
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buf += decoder.decode(value, {stream: true});
    for (;;) {
      const nl = buf.search(/[\r\n]/);
      if (nl < 0 || (buf[nl] === '\r' && nl + 1 === buf.length)) break; // a \r may be half of \r\n
      const line = buf.slice(0, nl);
      buf = buf.slice(nl + (buf[nl] === '\r' && buf[nl + 1] === '\n' ? 2 : 1));
      if (line === '') {
        if (data.length) onMessage({id, data: data.join('\n')});
        data = [];
      } else if (!line.startsWith(':')) {
        const colon = line.indexOf(':');
        const field = colon < 0 ? line : line.slice(0, colon);
        const val = colon < 0 ? '' : line.slice(colon + (line[colon + 1] === ' ' ? 2 : 1));
        if (field === 'data') data.push(val);
        else if (field === 'id' && !val.includes('\0')) id = val;
      }
    }
  }
}

function tailPage(root, arg) {
  const msg = slot();
  const picker = h('select', {'aria-label': 'category', testid: 'tail-category'},
    h('option', {value: ''}, 'every category'), arg ? h('option', {value: arg, selected: true}, arg) : null);
  picker.addEventListener('change', () => { location.hash = picker.value ? `#/tail/${enc(picker.value)}` : '#/tail'; });
  api('/categories').then(({categories}) => {
    picker.append(...categories.filter((c) => c.name !== arg).map((c) => h('option', {value: c.name}, c.name)));
  }).catch((e) => show(msg, e));
  const from = h('select', {'aria-label': 'from', testid: 'tail-from'},
    h('option', {value: 'end'}, 'from now'), h('option', {value: 'start'}, 'from the start'));
  const pause = h('button', {type: 'button', testid: 'tail-pause'}, 'Pause');
  const clear = h('button', {type: 'button', class: 'secondary', testid: 'tail-clear'}, 'Clear');
  const status = h('span', {class: 'status', testid: 'tail-status'});
  const counter = h('span', {class: 'meta', testid: 'tail-count'}, '0 events');
  const events = grid([STREAM_COL, ...EVENT_COLS], 'tail-events', eventAttrs('tail-event'));
  root.append(h('h1', null, 'Live tail'), h('div', {class: 'bar'}, picker, from, pause, clear),
    h('p', {class: 'meta'}, status, ' · ', counter), msg, events.el);

  const path = arg ? `/subscriptions/${enc(arg)}` : '/subscriptions';
  let ctrl = null;
  let retry = null;
  let lastId = null;
  let backoff = 1000;
  let seen = 0;
  const state = (s, text) => { status.dataset.state = s; status.textContent = text; };

  function received({id, data}) {
    if (id != null) lastId = id;
    let e;
    try { e = JSON.parse(data); } catch { show(msg, new Problem(0, {detail: `not an event: ${data.slice(0, 200)}`})); return; }
    events.add([e], true);
    while (events.body.rows.length > TAIL_ROWS) events.body.lastElementChild.remove();
    seen += 1;
    counter.textContent = `${seen} event${seen === 1 ? '' : 's'}`;
  }

  async function connect() {
    clearTimeout(retry);
    const mine = new AbortController();
    ctrl = mine;
    const headers = {Accept: 'text/event-stream'};
    if (lastId != null) headers['Last-Event-ID'] = lastId;
    const q = lastId == null && from.value === 'start' ? '?from=start' : '';
    state('connecting', lastId == null ? 'connecting…' : 'resuming…');
    try {
      const res = await fetch(BASE + path + q, {headers, signal: mine.signal, cache: 'no-store'});
      if (!res.ok) throw await problemOf(res);
      state('live', 'live');
      show(msg, null);
      backoff = 1000;
      await readEvents(res.body, received);
      throw new Problem(0, {detail: 'the gateway ended the stream'});
    } catch (e) {
      if (mine.signal.aborted) return; // paused, restarted or left the page
      if (e.status >= 400 && e.status < 500) { state('failed', 'stopped'); show(msg, e); return; }
      const wait = backoff;
      backoff = Math.min(backoff * 2, 15000);
      state('reconnecting', `dropped (${e.message}); reconnecting in ${fmtSecs(wait)}`);
      retry = setTimeout(connect, wait);
    }
  }

  function stop() {
    clearTimeout(retry);
    if (ctrl) ctrl.abort();
  }

  pause.addEventListener('click', () => {
    if (status.dataset.state === 'paused') {
      pause.textContent = 'Pause';
      connect();
    } else {
      stop();
      pause.textContent = 'Resume';
      state('paused', lastId == null ? 'paused' : 'paused (resumes after the last event shown)');
    }
  });
  clear.addEventListener('click', () => { events.set([]); seen = 0; counter.textContent = '0 events'; });
  from.addEventListener('change', () => {
    stop();
    lastId = null;
    clear.click();
    pause.textContent = 'Pause';
    connect();
  });
  connect();
  return stop;
}

// ---- Projections: lag, rate, rebuild progress and parked events, every 2 s

// How far a rebuild has read: its positions over the partitions' high watermarks.
function rebuildCell(p) {
  const r = p.rebuild;
  if (!r) return '–';
  const running = r.phase === 'building' || r.phase === 'catching-up';
  let pct = null;
  if (running && Array.isArray(r.positions) && Array.isArray(p.partitions)) {
    let at = 0;
    let end = 0;
    for (const part of p.partitions) {
      const pos = r.positions.find((x) => x.topic === part.topic && x.partition === part.partition);
      end += part.high_watermark || 0;
      at += Math.min(pos ? pos.next_offset : 0, part.high_watermark || 0);
    }
    if (end > 0) pct = Math.floor((100 * at) / end);
  }
  return h('div', {class: 'rebuild', 'data-phase': r.phase},
    h('span', {class: `badge ${r.phase === 'failed' ? 'bad' : running ? 'busy' : 'ok'}`}, `v${r.version} ${r.phase}`),
    pct != null ? h('progress', {max: '100', value: String(pct), title: `${pct}%`}) : null,
    ` ${r.applied} applied · ${fmtSecs(r.started_ms_ago)} ago`,
    r.error ? h('div', {class: 'error'}, r.error) : null);
}

function projectionsPage(root) {
  const msg = slot();
  const meta = h('p', {class: 'meta', testid: 'projections-updated'}, 'loading…');
  const table = grid([
    ['projection', (p) => h('span', null, h('strong', null, p.name),
      p.projector ? h('small', null, h('br'), `${p.instance != null ? `instance ${p.instance} · ` : ''}${p.projector}`) : null),
    'projection-name'],
    ['lag', (p) => (p.lag == null ? 'not sampled yet'
      : `${p.lag} event${p.lag === 1 ? '' : 's'}${p.lag_ms ? ` · ${fmtSecs(p.lag_ms)} behind` : ''}`), 'projection-lag'],
    ['events/s', (p) => (p.events_per_second ?? 0).toFixed(1), 'projection-rate'],
    ['applied', (p) => String(p.applied ?? '–')],
    ['rebuild', rebuildCell, 'projection-rebuild'],
    ['parked', (p) => (p.parked ? h('a', {href: '#/dead-letters'}, String(p.parked)) : '0'), 'projection-parked'],
  ], 'projections', (p) => ({testid: 'projection', 'data-name': p.name, class: p.parked ? 'warn' : null}));
  const down = h('div', {testid: 'projections-unreachable'});
  root.append(h('h1', null, 'Projections'), meta, msg, down, table.el);
  return poll(2000, async () => {
    try {
      const doc = await api('/projections');
      table.set(doc.projections || []);
      // A projector that did not answer is named, not left out silently.
      down.replaceChildren(...(doc.unreachable || []).map((u) => h('div', {class: 'problem'},
        h('strong', null, 'projector unreachable '), h('code', null, u.url), `: ${u.error}`)));
      meta.textContent = `${doc.instance ? `instance ${doc.instance} · ` : ''}updated ${new Date().toLocaleTimeString()}`;
      show(msg, null);
    } catch (e) {
      show(msg, e);
    }
  });
}

// ---- Transactions: the coordinator's log, newest first, and a lookup by txid

function voteOf(v) {
  return v === true ? 'yes' : v === false ? 'no' : 'not yet';
}

function participants(tx) {
  return h('ul', {class: 'plain'}, (tx.participants || []).map((p) => h('li', {testid: 'tx-participant',
    'data-stream': p.stream, 'data-vote': voteOf(p.vote)},
  streamLink(p.stream), ' ', h('code', null, p.command ? `${p.command.type} ${JSON.stringify(p.command.data)}` : ''),
  ' · vote ', h('span', {class: `badge ${p.vote === true ? 'ok' : p.vote === false ? 'bad' : 'busy'}`}, voteOf(p.vote)),
  p.reason ? h('span', {class: 'reason'}, ` ${p.reason}`) : null,
  p.acked ? ' · acked' : ' · not acked', p.context ? ` · context ${p.context}` : null)));
}

function txGrid(testid) {
  return grid([
    ['txid', (t) => h('a', {href: `#/transactions/${enc(t.txid)}`}, t.txid), 'tx-id'],
    ['state', (t) => h('span', null, t.state, t.in_doubt ? h('span', {class: 'badge bad', testid: 'tx-in-doubt'}, 'in doubt') : null), 'tx-state'],
    ['outcome', (t) => h('span', {class: `badge ${t.outcome === 'committed' ? 'ok' : t.outcome === 'aborted' ? 'bad' : 'busy'}`}, t.outcome), 'tx-outcome'],
    ['participants', participants],
    ['reason', (t) => t.reason || '–', 'tx-reason'],
    ['created (UTC)', (t) => fmtTime(t.created_ms)],
    ['decided (UTC)', (t) => fmtTime(t.decided_ms)],
  ], testid, (t) => ({testid: 'tx', 'data-txid': t.txid, 'data-outcome': t.outcome, 'data-in-doubt': String(!!t.in_doubt),
    class: t.in_doubt ? 'in-doubt' : null}));
}

function transactionsPage(root, arg) {
  const input = h('input', {type: 'search', name: 'txid', placeholder: 'txid', value: arg, required: true,
    autocomplete: 'off', 'aria-label': 'txid', testid: 'tx-input'});
  const detailMsg = slot();
  const detail = h('div', {testid: 'tx-detail'});
  const listMsg = slot();
  const list = txGrid('tx-list');
  const meta = h('p', {class: 'meta', testid: 'tx-updated'});

  async function lookup(txid) {
    try {
      const one = txGrid('tx-found');
      one.set([await api(`/transactions/${enc(txid)}`)]);
      detail.replaceChildren(h('h2', null, `Transaction ${txid}`), one.el);
      show(detailMsg, null);
    } catch (e) {
      detail.replaceChildren();
      show(detailMsg, e);
    }
  }

  const form = h('form', {class: 'bar', onsubmit: (e) => {
    e.preventDefault();
    const txid = input.value.trim();
    const hash = `#/transactions/${enc(txid)}`;
    if (location.hash === hash) lookup(txid); else location.hash = hash;
  }}, input, h('button', {type: 'submit', testid: 'tx-lookup'}, 'Look up'));
  root.append(h('h1', null, 'Transactions'), form, detailMsg, detail,
    h('div', {class: 'heading'}, h('h2', null, 'Newest first'), meta), listMsg, list.el);
  if (arg) lookup(arg);
  const stop = poll(3000, async () => {
    try {
      const {transactions} = await api('/transactions?limit=50');
      list.set(transactions);
      meta.textContent = `${transactions.length} shown · ${transactions.filter((t) => t.in_doubt).length} in doubt · updated ${new Date().toLocaleTimeString()}`;
      show(listMsg, null);
    } catch (e) {
      show(listMsg, e);
    }
  });
  return {stop, update(txid) { input.value = txid; if (txid) lookup(txid); else detail.replaceChildren(); }};
}

// ---- Dead letters: parked events per consumer, and replays with the admin token

function deadLettersPage(root) {
  const token = h('input', {type: 'password', name: 'token', autocomplete: 'off', placeholder: 'admin token',
    value: sessionStorage.getItem(TOKEN_KEY) || '', 'aria-label': 'admin token', testid: 'admin-token'});
  const saved = h('span', {class: 'meta', testid: 'admin-token-state'});
  const remember = () => {
    const t = token.value.trim();
    if (t) sessionStorage.setItem(TOKEN_KEY, t); else sessionStorage.removeItem(TOKEN_KEY);
    saved.textContent = t ? 'kept for this tab' : 'none';
  };
  token.addEventListener('input', remember);
  remember();
  const result = h('div', {testid: 'dlq-result', 'aria-live': 'polite'});
  const msg = slot();
  const list = h('div', {testid: 'dead-letters'});

  async function replay(name, button) {
    button.disabled = true;
    const t = token.value.trim();
    try {
      const r = await api(`/dead-letters/${enc(name)}/replay`, {method: 'POST',
        headers: t ? {Authorization: `Bearer ${t}`} : {}});
      const failing = r.still_failing || [];
      result.replaceChildren(h('div', {class: 'done', testid: 'dlq-replayed', 'data-projection': name,
        'data-replayed': r.replayed ?? 0},
      `${name}: replayed ${r.replayed ?? 0}, already replayed ${r.already_replayed ?? 0}, `
        + `not parked here ${r.not_parked_here ?? 0}, still failing ${failing.length}`,
      failing.length ? h('ul', null, failing.map((f) => h('li', null, dataCell(f)))) : null));
      load();
    } catch (e) {
      if (e.status === 401) {
        result.replaceChildren(h('div', {class: 'problem', role: 'alert', testid: 'dlq-auth'},
          h('strong', null, 'The gateway asks for its admin token. '),
          'Type it in the admin token field above, then press Replay again.', h('br'),
          h('small', {testid: 'dlq-auth-detail'}, e.message)));
        token.focus();
      } else {
        show(result, e);
      }
    } finally {
      button.disabled = false;
    }
  }

  async function load() {
    try {
      const [{consumers}, projections] = await Promise.all([api('/dead-letters'),
        api('/projections').then((d) => (d.projections || []).map((p) => p.name)).catch(() => null)]);
      show(msg, null);
      if (!consumers.length) { list.replaceChildren(h('p', {class: 'empty'}, 'Nothing is parked.')); return; }
      list.replaceChildren(...consumers.map((c) => {
        const parked = grid([
          ['stream', (d) => (d.stream ? streamLink(d.stream) : '–')],
          ['type', (d) => d.type || '–'],
          ['reason', (d) => d.reason, 'dlq-reason'],
          ['source', (d) => h('code', null, `${d.topic}/${d.source_partition}@${d.source_offset}`)],
          ['parked (UTC)', (d) => fmtTime(d.time ?? d.time_ms)],
          ['parked at', (d) => h('code', null, `${d.partition}@${d.offset}`)],
        ], 'dlq-parked', (d) => ({testid: 'dlq-entry', 'data-stream': d.stream, 'data-offset': d.source_offset}));
        parked.set(c.parked || []);
        // Only a projection replays its own parked events.
        const canReplay = !projections || projections.includes(c.consumer);
        const button = canReplay ? h('button', {type: 'button', testid: 'dlq-replay', 'data-projection': c.consumer},
          'Replay') : null;
        if (button) button.addEventListener('click', () => replay(c.consumer, button));
        return h('section', {class: 'card', testid: 'dlq-consumer', 'data-consumer': c.consumer},
          h('div', {class: 'heading'}, h('h2', null, c.consumer, h('small', null, ` · ${(c.parked || []).length} parked`)),
            button),
          h('p', {class: 'meta'}, h('code', null, c.topic)),
          (c.parked || []).length ? parked.el : h('p', {class: 'empty'}, 'Nothing parked.'));
      }));
    } catch (e) {
      show(msg, e);
    }
  }

  root.append(h('h1', null, 'Dead letters'),
    h('div', {class: 'bar'}, h('label', null, 'Admin token ', token), saved,
      h('button', {type: 'button', class: 'secondary', onclick: load, testid: 'dead-letters-refresh'}, 'Refresh')),
    result, msg, list);
  load();
}

// ---- Services: health and readiness of each service the gateway knows

function servicesPage(root) {
  const msg = slot();
  const meta = h('p', {class: 'meta', testid: 'services-updated'}, 'loading…');
  const list = grid([
    ['service', (s) => h('span', null, h('strong', null, s.name), h('br'), h('small', null, s.url)), 'service-name'],
    ['healthy', (s) => badge(s.healthy, 'healthy', 'unhealthy'), 'service-healthy'],
    ['ready', (s) => badge(s.ready, 'ready', 'not ready'), 'service-ready'],
    ['reasons', (s) => ((s.reasons || []).length
      ? h('ul', {class: 'plain'}, s.reasons.map((r) => h('li', null, r))) : '–'), 'service-reasons'],
    ['status', (s) => (s.status ? dataCell(s.status) : '–')],
  ], 'services', (s) => ({testid: 'service', 'data-name': s.name, 'data-healthy': String(!!s.healthy),
    'data-ready': String(!!s.ready), class: s.ready ? null : 'warn'}));
  root.append(h('h1', null, 'Services'), meta, msg, list.el);
  return poll(5000, async () => {
    try {
      const {services} = await api('/services');
      list.set(services);
      meta.textContent = `${services.filter((s) => s.ready).length} of ${services.length} ready · updated ${new Date().toLocaleTimeString()}`;
      show(msg, null);
    } catch (e) {
      show(msg, e);
    }
  });
}

// ---- routing: #/<page>[/<argument>]

const PAGES = {
  streams: ['Streams', streamsPage],
  tail: ['Live tail', tailPage],
  projections: ['Projections', projectionsPage],
  transactions: ['Transactions', transactionsPage],
  'dead-letters': ['Dead letters', deadLettersPage],
  services: ['Services', servicesPage],
};
// What the page shown returned: {stop, update} (a bare function is its stop).
let current = {name: null, stop: null, update: null};

function setNav(open) {
  document.body.classList.toggle('nav-open', open);
  document.querySelector('.nav-toggle').setAttribute('aria-expanded', String(open));
}

function route() {
  const [name, ...rest] = location.hash.replace(/^#\/?/, '').split('/');
  if (!PAGES[name]) { location.replace('#/streams'); return; }
  let arg = '';
  try { arg = decodeURIComponent(rest.join('/')); } catch { arg = rest.join('/'); }
  setNav(false);
  // Another stream or txid on the page shown: that page updates in place.
  if (current.name === name && current.update) { current.update(arg); return; }
  if (current.stop) current.stop();
  const [title, page] = PAGES[name];
  for (const a of document.querySelectorAll('#nav a')) {
    const here = a.getAttribute('href') === `#/${name}`;
    a.classList.toggle('active', here);
    if (here) a.setAttribute('aria-current', 'page'); else a.removeAttribute('aria-current');
  }
  document.title = `${title} · esk console`;
  const root = h('section', {class: 'page', testid: `page-${name}`});
  document.getElementById('main').replaceChildren(root);
  const got = page(root, arg);
  current = {name, stop: typeof got === 'function' ? got : got && got.stop, update: got && got.update};
}

document.querySelector('.nav-toggle').addEventListener('click', () => {
  setNav(!document.body.classList.contains('nav-open'));
});
window.addEventListener('hashchange', route);
route();
