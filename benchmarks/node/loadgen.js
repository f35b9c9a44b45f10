#!/usr/bin/env node
// WebSocket load generator for the Atlas benchmark harness.
//
//   node loadgen.js <scenario> --url ws://127.0.0.1:PORT [options]
//
// Scenarios
//   probe        one connection; checks that text comes back as text and binary
//                as binary, byte for byte (used as a readiness/correctness check)
//   throughput   --conns C (100) connections, --inflight W (10) messages in flight
//                on each, --size (64) byte messages, --mode binary|text;
//                --warmup (1 s) then a --duration (5 s) window; echoes/s
//   tick         --conns (1000) connections, each sending one ~60-byte JSON message
//                at --rate (20) Hz with starts staggered over one period;
//                --warmup (1 s) then --duration (10 s); round-trip latency
//                percentiles and achieved vs offered rate
//   connections  first opens --idle (2000) idle connections and holds them (the
//                driver reads the proxy's RSS at the idle_before/idle_after
//                markers), closes them, then runs --handshakes (5000) WebSocket
//                handshakes (each followed by a close) at --concurrency (100)
//
// Common options
//   --threads N        spread the connections over N worker threads (default 1)
//   --connect-concurrency N   handshakes in progress at once while setting up (100)
//   --sync             after each RSS marker wait for a line on stdin (driver ack)
//   --timeout S        hard limit for the whole run (default: derived from the options)
//
// Output
//   stdout: exactly one JSON object with the results.
//   stderr: marker lines "@@mark <name> <epoch_ms>" at window boundaries, which the
//           driver uses to sample the proxy's CPU time and RSS; anything else on
//           stderr is diagnostics.
//
// Every loop here is bounded in count and in time and the process exits by itself.
'use strict';

const { Worker, isMainThread, parentPort, workerData } = require('worker_threads');
const { performance } = require('perf_hooks');
const WebSocket = require('ws');

const CLIENT_OPTS = {
  perMessageDeflate: false,
  skipUTF8Validation: true,
  handshakeTimeout: 10000,
  followRedirects: false,
  maxPayload: 16 * 1024 * 1024,
};

// ---------------------------------------------------------------------------
// Log-linear latency histogram in integer microseconds (~1.5% resolution).
// ---------------------------------------------------------------------------
const SUB = 64;
const NBUCKETS = SUB + (32 - 6) * SUB;

function bucketOf(us) {
  if (us < SUB) return us < 0 ? 0 : us;
  if (us > 0x7fffffff) us = 0x7fffffff;
  const e = 31 - Math.clz32(us); // >= 6
  return SUB + (e - 6) * SUB + ((us >>> (e - 6)) - SUB);
}

function bucketMid(b) {
  if (b < SUB) return b;
  const e = Math.floor((b - SUB) / SUB) + 6;
  const sub = (b - SUB) % SUB;
  const lo = (SUB + sub) * 2 ** (e - 6);
  const width = 2 ** (e - 6);
  return lo + (width - 1) / 2;
}

class Hist {
  constructor() {
    this.counts = new Float64Array(NBUCKETS);
    this.n = 0;
    this.sum = 0;
    this.max = 0;
    this.min = Infinity;
  }
  addMs(ms) {
    const us = Math.round(ms * 1000);
    this.counts[bucketOf(us)]++;
    this.n++;
    this.sum += us;
    if (us > this.max) this.max = us;
    if (us < this.min) this.min = us;
  }
  toJSON() {
    // sparse form, cheap to post between threads
    const b = [];
    for (let i = 0; i < NBUCKETS; i++) if (this.counts[i]) b.push([i, this.counts[i]]);
    return { b, n: this.n, sum: this.sum, max: this.max, min: this.min };
  }
  static merge(list) {
    const h = new Hist();
    for (const j of list) {
      if (!j) continue;
      for (const [i, c] of j.b) h.counts[i] += c;
      h.n += j.n;
      h.sum += j.sum;
      if (j.max > h.max) h.max = j.max;
      if (j.min < h.min) h.min = j.min;
    }
    return h;
  }
  quantileUs(q) {
    if (this.n === 0) return null;
    const rank = Math.max(1, Math.ceil(q * this.n));
    let acc = 0;
    for (let i = 0; i < NBUCKETS; i++) {
      acc += this.counts[i];
      if (acc >= rank) return Math.min(bucketMid(i), this.max);
    }
    return this.max;
  }
  summaryMs() {
    if (this.n === 0) return { count: 0 };
    const r = (us) => (us === null ? null : Math.round(us) / 1000);
    return {
      count: this.n,
      mean: r(this.sum / this.n),
      min: r(this.min),
      p50: r(this.quantileUs(0.5)),
      p90: r(this.quantileUs(0.9)),
      p99: r(this.quantileUs(0.99)),
      p999: r(this.quantileUs(0.999)),
      max: r(this.max),
    };
  }
}

const nowAbs = () => performance.timeOrigin + performance.now();
const toLocal = (abs) => abs - performance.timeOrigin;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function checkLoopbackUrl(url) {
  const u = new URL(url);
  if (u.protocol !== 'ws:') throw new Error(`only ws:// URLs are supported (${url})`);
  const h = u.hostname.replace(/^\[|\]$/g, '');
  if (!(h === 'localhost' || h === '::1' || /^127\.\d+\.\d+\.\d+$/.test(h))) {
    throw new Error(`refusing non-loopback target ${url}`);
  }
}

// ---------------------------------------------------------------------------
// Opening many connections at bounded concurrency, bounded in time.
// ---------------------------------------------------------------------------
function openMany(url, count, concurrency, deadlineLocal, setup) {
  return new Promise((resolve) => {
    const conns = [];
    let launched = 0;
    let pending = 0;
    let errors = 0;
    const errorSamples = [];
    let finished = false;
    const finish = () => {
      if (finished) return;
      finished = true;
      clearTimeout(timer);
      resolve({ conns, errors, errorSamples });
    };
    const timer = setTimeout(() => {
      errors += count - conns.length - errors;
      errorSamples.push('connect deadline reached');
      finish();
    }, Math.max(0, deadlineLocal - performance.now()));
    const launch = () => {
      while (!finished && pending < concurrency && launched < count && performance.now() < deadlineLocal) {
        launched++;
        pending++;
        const ws = new WebSocket(url, CLIENT_OPTS);
        let settled = false;
        ws.on('open', () => {
          if (settled) return;
          settled = true;
          pending--;
          conns.push(ws);
          if (setup) setup(ws, conns.length - 1);
          if (conns.length + errors >= count) finish();
          else launch();
        });
        ws.on('error', (err) => {
          if (settled) return;
          settled = true;
          pending--;
          errors++;
          if (errorSamples.length < 5) errorSamples.push(String(err && err.message));
          if (conns.length + errors >= count) finish();
          else launch();
        });
      }
    };
    if (count <= 0) finish();
    else launch();
  });
}

function closeAll(conns, timeoutMs) {
  return new Promise((resolve) => {
    let open = 0;
    const done = () => {
      clearTimeout(timer);
      for (const ws of conns) if (ws.readyState !== WebSocket.CLOSED) ws.terminate();
      resolve();
    };
    const timer = setTimeout(done, timeoutMs);
    for (const ws of conns) {
      if (ws.readyState === WebSocket.CLOSED) continue;
      open++;
      ws.once('close', () => {
        if (--open === 0) done();
      });
      try {
        ws.close(1000);
      } catch (e) {
        ws.terminate();
      }
    }
    if (open === 0) done();
  });
}

// ---------------------------------------------------------------------------
// Worker side
// ---------------------------------------------------------------------------
async function workerMain() {
  const p = workerData;
  const post = (m) => parentPort.postMessage(m);
  const inbox = [];
  let waiter = null;
  parentPort.on('message', (m) => {
    if (waiter) {
      const w = waiter;
      waiter = null;
      w(m);
    } else inbox.push(m);
  });
  const recv = () => (inbox.length ? Promise.resolve(inbox.shift()) : new Promise((r) => (waiter = r)));

  if (p.scenario === 'throughput') await workerThroughput(p, post, recv);
  else if (p.scenario === 'tick') await workerTick(p, post, recv);
  else if (p.scenario === 'connections') await workerConnections(p, post, recv);
  process.exit(0);
}

async function workerThroughput(p, post, recv) {
  const binary = p.mode === 'binary';
  const payload = Buffer.alloc(p.size, binary ? 0xa5 : 0x61); // 0x61 = 'a': valid UTF-8
  const sendOpts = { binary };
  let sending = false;
  let inflight = 0;
  let winStart = Infinity;
  let winEnd = -Infinity;
  let echoesInWindow = 0;
  let echoesTotal = 0;
  let mismatches = 0;
  let unexpectedCloses = 0;
  let closing = false;
  const hist = new Hist();

  const setup = (ws) => {
    const fifo = [];
    ws._fifo = fifo;
    ws.on('message', (data, isBinary) => {
      const t = performance.now();
      if (isBinary !== binary || data.length !== p.size) mismatches++;
      const sentAt = fifo.shift();
      inflight--;
      echoesTotal++;
      if (t >= winStart && t < winEnd) {
        echoesInWindow++;
        if (sentAt !== undefined) hist.addMs(t - sentAt);
      }
      if (sending) {
        fifo.push(performance.now());
        inflight++;
        ws.send(payload, sendOpts);
      }
    });
    ws.on('close', () => {
      if (!closing) unexpectedCloses++;
    });
  };

  const deadline = performance.now() + p.connectTimeoutMs;
  const { conns, errors, errorSamples } = await openMany(p.url, p.conns, p.connectConcurrency, deadline, setup);
  post({ type: 'ready', opened: conns.length, errors, errorSamples });

  const go = await recv();
  if (go.type === 'go') {
    winStart = toLocal(go.tStart);
    winEnd = toLocal(go.tEnd);
    await sleep(Math.max(0, toLocal(go.tGo) - performance.now()));
    sending = true;
    for (const ws of conns) {
      for (let i = 0; i < p.inflight; i++) {
        ws._fifo.push(performance.now());
        inflight++;
        ws.send(payload, sendOpts);
      }
    }
    await sleep(Math.max(0, winEnd - performance.now()));
    sending = false;
    const drainEnd = performance.now() + p.drainMs;
    while (inflight > 0 && performance.now() < drainEnd) await sleep(5);
  }
  post({
    type: 'result',
    echoesInWindow,
    echoesTotal,
    unanswered: Math.max(0, inflight),
    mismatches,
    unexpectedCloses,
    hist: hist.toJSON(),
  });
  await recv(); // 'close'
  closing = true;
  await closeAll(conns, 3000);
  post({ type: 'closed' });
}

async function workerTick(p, post, recv) {
  let closing = false;
  let inflight = 0;
  let sentInWindow = 0;
  let recvInWindow = 0;
  let answeredOfWindow = 0;
  let sentTotal = 0;
  let recvTotal = 0;
  let mismatches = 0;
  let unexpectedCloses = 0;
  let winStart = Infinity;
  let winEnd = -Infinity;
  const hist = new Hist();
  const lag = new Hist();

  const setup = (ws) => {
    const fifo = [];
    ws._fifo = fifo;
    ws.on('message', (data, isBinary) => {
      const t = performance.now();
      const rec = fifo.shift();
      inflight--;
      recvTotal++;
      if (rec === undefined) {
        mismatches++;
        return;
      }
      if (isBinary || data.length !== rec.len) mismatches++;
      if (t >= winStart && t < winEnd) recvInWindow++;
      if (rec.sent >= winStart && rec.sent < winEnd) {
        answeredOfWindow++;
        hist.addMs(t - rec.sent);
      }
    });
    ws.on('close', () => {
      if (!closing) unexpectedCloses++;
    });
  };

  const deadline = performance.now() + p.connectTimeoutMs;
  const { conns, errors, errorSamples } = await openMany(p.url, p.conns, p.connectConcurrency, deadline, setup);
  post({ type: 'ready', opened: conns.length, errors, errorSamples });

  const go = await recv();
  if (go.type === 'go' && conns.length > 0) {
    winStart = toLocal(go.tStart);
    winEnd = toLocal(go.tEnd);
    const goLocal = toLocal(go.tGo);
    const period = 1000 / p.rate;
    // Connection j of this worker is global connection (p.firstIndex + j * p.stride);
    // the global connections' start offsets are spread evenly over one period.
    const n = conns.length;
    const offsets = new Float64Array(n);
    for (let j = 0; j < n; j++) offsets[j] = ((p.firstIndex + j * p.stride) * period) / p.totalConns;
    const seqs = new Uint32Array(n);
    const pos = new Float64Array(n * 2);
    for (let j = 0; j < n; j++) {
      pos[2 * j] = Math.random() * 100;
      pos[2 * j + 1] = Math.random() * 100;
    }
    let idx = 0;
    let round = 0;
    await new Promise((resolve) => {
      const pump = () => {
        const now = performance.now();
        if (now >= winEnd) return resolve();
        for (;;) {
          const due = goLocal + round * period + offsets[idx];
          if (due > now || due >= winEnd) break;
          const ws = conns[idx];
          if (ws.readyState === WebSocket.OPEN) {
            pos[2 * idx] += Math.random() - 0.5;
            pos[2 * idx + 1] += Math.random() - 0.5;
            const msg = JSON.stringify({
              type: 'move',
              x: Math.round(pos[2 * idx] * 100) / 100,
              y: Math.round(pos[2 * idx + 1] * 100) / 100,
              z: 0,
              seq: ++seqs[idx],
              t: Date.now(),
            });
            const sent = performance.now();
            if (due >= winStart) lag.addMs(sent - due);
            ws._fifo.push({ sent, len: msg.length });
            inflight++;
            sentTotal++;
            if (sent >= winStart && sent < winEnd) sentInWindow++;
            ws.send(msg);
          }
          idx++;
          if (idx === n) {
            idx = 0;
            round++;
          }
        }
        const nextDue = goLocal + round * period + offsets[idx];
        setTimeout(pump, Math.max(0, nextDue - performance.now()));
      };
      setTimeout(pump, Math.max(0, goLocal - performance.now()));
    });
    const drainEnd = performance.now() + p.drainMs;
    while (inflight > 0 && performance.now() < drainEnd) await sleep(5);
  }
  post({
    type: 'result',
    sentInWindow,
    recvInWindow,
    answeredOfWindow,
    sentTotal,
    recvTotal,
    unanswered: Math.max(0, inflight),
    mismatches,
    unexpectedCloses,
    hist: hist.toJSON(),
    lag: lag.toJSON(),
  });
  await recv(); // 'close'
  closing = true;
  await closeAll(conns, 3000);
  post({ type: 'closed' });
}

async function workerConnections(p, post, recv) {
  // Phase 1: idle connections (measured first, so that the proxy's heap has not
  // been grown by the handshake churn: the RSS delta is then the marginal cost).
  const idle = await recv();
  let conns = [];
  let idleErrors = 0;
  let idleSamples = [];
  let unexpectedCloses = 0;
  let closing = false;
  if (idle.type === 'idle_open') {
    const deadline = performance.now() + p.phaseTimeoutMs;
    const r = await openMany(p.url, p.idle, p.connectConcurrency, deadline, (ws) => {
      ws.on('close', () => {
        if (!closing) unexpectedCloses++;
      });
      ws.on('error', () => {});
    });
    conns = r.conns;
    idleErrors = r.errors;
    idleSamples = r.errorSamples;
  }
  post({ type: 'idle_ready', opened: conns.length, errors: idleErrors, errorSamples: idleSamples });
  await recv(); // 'idle_close'
  const stillOpen = conns.filter((ws) => ws.readyState === WebSocket.OPEN).length;
  closing = true;
  await closeAll(conns, 5000);
  conns = [];
  post({ type: 'idle_closed', stillOpen, unexpectedCloses });

  // Phase 2: handshake churn: open, close, open the next, `concurrency` at a time.
  const go = await recv();
  const hsHist = new Hist();
  let ok = 0;
  let errors = 0;
  const errorSamples = [];
  if (go.type === 'hs_go') {
    const deadline = performance.now() + p.phaseTimeoutMs;
    await new Promise((resolve) => {
      let launched = 0;
      let active = 0;
      let finished = false;
      const finish = () => {
        if (finished) return;
        finished = true;
        clearTimeout(timer);
        resolve();
      };
      const timer = setTimeout(() => {
        if (errorSamples.length < 5) errorSamples.push('handshake phase deadline reached');
        finish();
      }, Math.max(0, deadline - performance.now()));
      const launch = () => {
        while (!finished && active < p.concurrency && launched < p.handshakes && performance.now() < deadline) {
          launched++;
          active++;
          const t0 = performance.now();
          const ws = new WebSocket(p.url, CLIENT_OPTS);
          let done = false;
          let opened = false;
          const release = () => {
            if (done) return;
            done = true;
            active--;
            if (active === 0 && (launched >= p.handshakes || performance.now() >= deadline)) finish();
            else launch();
          };
          ws.on('open', () => {
            opened = true;
            hsHist.addMs(performance.now() - t0);
            ok++;
            ws.close(1000);
          });
          ws.on('error', (err) => {
            if (!opened) errors++; // a failed handshake; errors after open are not counted
            if (errorSamples.length < 5) errorSamples.push(String(err && err.message));
          });
          ws.on('close', release);
        }
      };
      if (p.handshakes > 0) launch();
      else finish();
    });
  }
  post({ type: 'hs_result', ok, errors, errorSamples, hist: hsHist.toJSON() });
  // Stay alive until the main thread has taken its hs_end sample and terminates us:
  // a thread that has exited no longer shows up in the per-thread CPU breakdown.
  await recv();
}

// ---------------------------------------------------------------------------
// Main thread
// ---------------------------------------------------------------------------
const DEFAULTS = {
  throughput: { conns: 100, inflight: 10, size: 64, mode: 'binary', warmup: 1, duration: 5, drain: 2 },
  tick: { conns: 1000, rate: 20, warmup: 1, duration: 10, drain: 3 },
  connections: { handshakes: 5000, concurrency: 100, idle: 2000, settle: 1, hold: 1 },
  probe: {},
};

function parseArgs(argv) {
  const scenario = argv[2];
  if (!scenario || !(scenario in DEFAULTS)) {
    throw new Error(`usage: loadgen.js <${Object.keys(DEFAULTS).join('|')}> --url ws://127.0.0.1:PORT [options]`);
  }
  const o = {
    scenario,
    url: null,
    threads: 1,
    connectConcurrency: 100,
    connectTimeout: 30,
    phaseTimeout: 60,
    sync: false,
    timeout: null,
    ...DEFAULTS[scenario],
  };
  const numeric = new Set([
    'threads', 'connectConcurrency', 'connectTimeout', 'phaseTimeout', 'timeout', 'conns', 'inflight', 'size',
    'warmup', 'duration', 'drain', 'rate', 'handshakes', 'concurrency', 'idle', 'settle', 'hold',
  ]);
  for (let i = 3; i < argv.length; i++) {
    const a = argv[i];
    if (!a.startsWith('--')) throw new Error(`unexpected argument ${a}`);
    const key = a.slice(2).replace(/-([a-z])/g, (_, c) => c.toUpperCase());
    if (key === 'sync') {
      o.sync = true;
      continue;
    }
    if (!(key in o)) throw new Error(`unknown option ${a}`);
    if (i + 1 >= argv.length) throw new Error(`missing value for ${a}`);
    const v = argv[++i];
    if (numeric.has(key)) {
      const n = Number(v);
      if (!Number.isFinite(n) || n < 0) throw new Error(`bad number for ${a}: ${v}`);
      o[key] = n;
    } else o[key] = v;
  }
  if (!o.url) throw new Error('--url is required');
  checkLoopbackUrl(o.url);
  if (o.mode !== undefined && o.mode !== 'binary' && o.mode !== 'text') throw new Error('--mode must be binary or text');
  o.threads = Math.max(1, Math.floor(o.threads));
  return o;
}

function mark(name) {
  process.stderr.write(`@@mark ${name} ${nowAbs().toFixed(3)}\n`);
}

// Stdin line reader used for --sync acknowledgements from the driver.
let stdinLines = [];
let stdinWaiter = null;
let stdinEnded = false;
function setupStdin() {
  let buf = '';
  process.stdin.setEncoding('utf8');
  process.stdin.on('data', (d) => {
    buf += d;
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      stdinLines.push(buf.slice(0, i));
      buf = buf.slice(i + 1);
    }
    if (stdinWaiter && stdinLines.length) {
      const w = stdinWaiter;
      stdinWaiter = null;
      w(true);
    }
  });
  process.stdin.on('end', () => {
    stdinEnded = true;
    if (stdinWaiter) {
      const w = stdinWaiter;
      stdinWaiter = null;
      w(false);
    }
  });
}

async function syncMark(o, name) {
  mark(name);
  if (!o.sync) return;
  if (stdinLines.length) {
    stdinLines.shift();
    return;
  }
  if (stdinEnded) return;
  await Promise.race([
    new Promise((r) => (stdinWaiter = r)),
    sleep(5000),
  ]);
  stdinWaiter = null;
  stdinLines.shift();
}

function splitEven(total, parts, i) {
  return Math.floor(total / parts) + (i < total % parts ? 1 : 0);
}

class Pool {
  constructor(o, perWorker) {
    this.workers = [];
    this.queues = [];
    this.waiters = [];
    this.exited = 0;
    for (let i = 0; i < o.threads; i++) {
      const w = new Worker(__filename, { workerData: perWorker(i) });
      this.queues.push([]);
      this.waiters.push(null);
      w.on('message', (m) => this._deliver(i, m));
      w.on('error', (e) => this._deliver(i, { type: 'error', message: String(e && e.stack) }));
      w.on('exit', () => {
        this.exited++;
        this._deliver(i, { type: 'exit' });
      });
      this.workers.push(w);
    }
  }
  _deliver(i, m) {
    if (this.waiters[i]) {
      const w = this.waiters[i];
      this.waiters[i] = null;
      w(m);
    } else this.queues[i].push(m);
  }
  recv(i) {
    if (this.queues[i].length) return Promise.resolve(this.queues[i].shift());
    return new Promise((r) => (this.waiters[i] = r));
  }
  async recvAll(type) {
    const out = [];
    for (let i = 0; i < this.workers.length; i++) {
      for (;;) {
        const m = await this.recv(i);
        if (m.type === 'error') throw new Error(`worker ${i} failed: ${m.message}`);
        if (m.type === 'exit') throw new Error(`worker ${i} exited early (waiting for ${type})`);
        if (m.type === type) {
          out.push(m);
          break;
        }
      }
    }
    return out;
  }
  sendAll(m) {
    for (const w of this.workers) w.postMessage(m);
  }
  async terminate() {
    await Promise.all(this.workers.map((w) => w.terminate().catch(() => {})));
  }
}

const sum = (arr, k) => arr.reduce((s, x) => s + (x[k] || 0), 0);

async function runThroughput(o) {
  const pool = new Pool(o, (i) => ({
    scenario: 'throughput',
    url: o.url,
    conns: splitEven(o.conns, o.threads, i),
    inflight: o.inflight,
    size: o.size,
    mode: o.mode,
    connectConcurrency: Math.max(1, Math.ceil(o.connectConcurrency / o.threads)),
    connectTimeoutMs: o.connectTimeout * 1000,
    drainMs: o.drain * 1000,
  }));
  const ready = await pool.recvAll('ready');
  const opened = sum(ready, 'opened');
  const tGo = nowAbs() + 50;
  const tStart = tGo + o.warmup * 1000;
  const tEnd = tStart + o.duration * 1000;
  pool.sendAll({ type: 'go', tGo, tStart, tEnd });
  await sleep(tStart - nowAbs());
  mark('window_start');
  await sleep(tEnd - nowAbs());
  mark('window_end');
  const res = await pool.recvAll('result');
  pool.sendAll({ type: 'close' });
  await pool.recvAll('closed');
  await pool.terminate();
  const echoes = sum(res, 'echoesInWindow');
  const hist = Hist.merge(res.map((r) => r.hist));
  return {
    scenario: 'throughput',
    params: { conns: o.conns, inflight: o.inflight, size: o.size, mode: o.mode, warmup_s: o.warmup, duration_s: o.duration, threads: o.threads },
    connections_opened: opened,
    connect_errors: sum(ready, 'errors'),
    connect_error_samples: ready.flatMap((r) => r.errorSamples).slice(0, 5),
    window_s: (tEnd - tStart) / 1000,
    echoes,
    echoes_per_s: echoes / ((tEnd - tStart) / 1000),
    echoes_total: sum(res, 'echoesTotal'),
    unanswered: sum(res, 'unanswered'),
    mismatches: sum(res, 'mismatches'),
    unexpected_closes: sum(res, 'unexpectedCloses'),
    latency_ms: hist.summaryMs(),
  };
}

async function runTick(o) {
  const pool = new Pool(o, (i) => ({
    scenario: 'tick',
    url: o.url,
    conns: splitEven(o.conns, o.threads, i),
    // global index of this worker's j-th connection = firstIndex + j*stride (round robin)
    firstIndex: i,
    stride: o.threads,
    totalConns: o.conns,
    rate: o.rate,
    connectConcurrency: Math.max(1, Math.ceil(o.connectConcurrency / o.threads)),
    connectTimeoutMs: o.connectTimeout * 1000,
    drainMs: o.drain * 1000,
  }));
  const ready = await pool.recvAll('ready');
  const opened = sum(ready, 'opened');
  const tGo = nowAbs() + 50;
  const tStart = tGo + o.warmup * 1000;
  const tEnd = tStart + o.duration * 1000;
  pool.sendAll({ type: 'go', tGo, tStart, tEnd });
  await sleep(tStart - nowAbs());
  mark('window_start');
  await sleep(tEnd - nowAbs());
  mark('window_end');
  const res = await pool.recvAll('result');
  pool.sendAll({ type: 'close' });
  await pool.recvAll('closed');
  await pool.terminate();
  const win = (tEnd - tStart) / 1000;
  const hist = Hist.merge(res.map((r) => r.hist));
  const lag = Hist.merge(res.map((r) => r.lag));
  const sent = sum(res, 'sentInWindow');
  const recvd = sum(res, 'recvInWindow');
  const offered = o.conns * o.rate;
  return {
    scenario: 'tick',
    params: { conns: o.conns, rate_hz: o.rate, warmup_s: o.warmup, duration_s: o.duration, threads: o.threads },
    connections_opened: opened,
    connect_errors: sum(ready, 'errors'),
    connect_error_samples: ready.flatMap((r) => r.errorSamples).slice(0, 5),
    window_s: win,
    offered_per_s: offered,
    sent_in_window: sent,
    sent_per_s: sent / win,
    echoes: recvd,
    echoes_per_s: recvd / win,
    achieved_ratio: recvd / win / offered,
    answered_of_window: sum(res, 'answeredOfWindow'),
    unanswered: sum(res, 'unanswered'),
    mismatches: sum(res, 'mismatches'),
    unexpected_closes: sum(res, 'unexpectedCloses'),
    latency_ms: hist.summaryMs(),
    send_lag_ms: lag.summaryMs(),
  };
}

async function runConnections(o) {
  const pool = new Pool(o, (i) => ({
    scenario: 'connections',
    url: o.url,
    handshakes: splitEven(o.handshakes, o.threads, i),
    concurrency: Math.max(1, splitEven(o.concurrency, o.threads, i)),
    idle: splitEven(o.idle, o.threads, i),
    connectConcurrency: Math.max(1, Math.ceil(o.connectConcurrency / o.threads)),
    phaseTimeoutMs: o.phaseTimeout * 1000,
  }));
  // Idle connections: RSS sampled (by the driver) before and after opening them.
  await sleep(o.settle * 1000);
  await syncMark(o, 'idle_before');
  const t2 = nowAbs();
  pool.sendAll({ type: 'idle_open' });
  const idle = await pool.recvAll('idle_ready');
  const t3 = nowAbs();
  const opened = sum(idle, 'opened');
  await sleep(o.settle * 1000);
  await syncMark(o, 'idle_after');
  await sleep(o.hold * 1000);
  mark('idle_end');
  pool.sendAll({ type: 'idle_close' });
  const closed = await pool.recvAll('idle_closed');
  await sleep(o.settle * 1000);

  // Handshake churn.
  mark('hs_start');
  const t0 = nowAbs();
  pool.sendAll({ type: 'hs_go' });
  const hs = await pool.recvAll('hs_result');
  const t1 = nowAbs();
  mark('hs_end');
  await pool.terminate();
  const hsHist = Hist.merge(hs.map((r) => r.hist));
  const ok = sum(hs, 'ok');
  return {
    scenario: 'connections',
    params: { handshakes: o.handshakes, concurrency: o.concurrency, idle: o.idle, threads: o.threads },
    handshakes_ok: ok,
    handshake_errors: sum(hs, 'errors'),
    handshake_error_samples: hs.flatMap((r) => r.errorSamples).slice(0, 5),
    handshake_window_s: (t1 - t0) / 1000,
    handshakes_per_s: ok / ((t1 - t0) / 1000),
    handshake_latency_ms: hsHist.summaryMs(),
    idle_opened: opened,
    idle_errors: sum(idle, 'errors'),
    idle_error_samples: idle.flatMap((r) => r.errorSamples).slice(0, 5),
    idle_open_s: (t3 - t2) / 1000,
    idle_still_open_at_end: sum(closed, 'stillOpen'),
    idle_unexpected_closes: sum(closed, 'unexpectedCloses'),
  };
}

function runProbe(o) {
  return new Promise((resolve) => {
    const result = { scenario: 'probe', ok: false, checks: [] };
    const ws = new WebSocket(o.url, CLIENT_OPTS);
    const big = Buffer.alloc(70000);
    for (let i = 0; i < big.length; i++) big[i] = (i * 31) & 0xff;
    const expect = [
      { data: Buffer.from('probe-text-\u00e9\u4e2d'), binary: false, name: 'text' },
      { data: Buffer.from([0, 1, 2, 253, 254, 255]), binary: true, name: 'binary' },
      { data: big, binary: true, name: 'binary-70k' },
    ];
    const timer = setTimeout(() => {
      result.error = 'probe timed out';
      ws.terminate();
      resolve(result);
    }, 5000);
    ws.on('open', () => {
      for (const e of expect) ws.send(e.data, { binary: e.binary });
    });
    let i = 0;
    ws.on('message', (data, isBinary) => {
      const e = expect[i++];
      const ok = isBinary === e.binary && Buffer.compare(data, e.data) === 0;
      result.checks.push({ name: e.name, ok });
      if (i === expect.length) {
        clearTimeout(timer);
        result.ok = result.checks.every((c) => c.ok);
        if (!result.ok) result.error = 'echo did not match what was sent';
        ws.close(1000);
        ws.once('close', () => resolve(result));
        setTimeout(() => resolve(result), 1000);
      }
    });
    ws.on('error', (err) => {
      clearTimeout(timer);
      result.error = String(err && err.message);
      resolve(result);
    });
  });
}

function hardLimitSeconds(o) {
  switch (o.scenario) {
    case 'probe':
      return 10;
    case 'throughput':
    case 'tick':
      return o.connectTimeout + o.warmup + o.duration + o.drain + 20;
    case 'connections':
      return 2 * o.phaseTimeout + 2 * o.settle + o.hold + 30;
    default:
      return 60;
  }
}

async function main() {
  let o;
  try {
    o = parseArgs(process.argv);
  } catch (e) {
    process.stderr.write(`${e.message}\n`);
    process.exit(2);
  }
  if (o.sync) setupStdin();
  const limit = o.timeout || hardLimitSeconds(o);
  setTimeout(() => {
    process.stdout.write(JSON.stringify({ scenario: o.scenario, error: `hard time limit of ${limit}s reached` }) + '\n');
    process.exit(3);
  }, limit * 1000);
  const cpu0 = process.cpuUsage();
  const t0 = nowAbs();
  let result;
  try {
    if (o.scenario === 'probe') result = await runProbe(o);
    else if (o.scenario === 'throughput') result = await runThroughput(o);
    else if (o.scenario === 'tick') result = await runTick(o);
    else result = await runConnections(o);
  } catch (e) {
    result = { scenario: o.scenario, error: String(e && e.stack ? e.stack : e) };
  }
  if (!result.error && (result.connections_opened === 0 || (result.handshakes_ok === 0 && !result.idle_opened))) {
    result.error = 'no connection could be opened';
  }
  const cpu = process.cpuUsage(cpu0);
  result.generator = {
    pid: process.pid,
    threads: o.threads,
    wall_s: (nowAbs() - t0) / 1000,
    cpu_s: (cpu.user + cpu.system) / 1e6,
    node: process.version,
  };
  process.stdout.write(JSON.stringify(result) + '\n', () => process.exit(result.error ? 1 : 0));
}

if (isMainThread) {
  main();
} else {
  workerMain().catch((e) => {
    parentPort.postMessage({ type: 'error', message: String(e && e.stack) });
    process.exit(1);
  });
}
