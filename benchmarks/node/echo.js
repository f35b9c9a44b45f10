#!/usr/bin/env node
// WebSocket echo backend for the Atlas benchmark harness.
//
//   node echo.js --port 9001 [--host 127.0.0.1] [--max-lifetime 1800]
//
// Echoes every message back on the same connection, text as text and binary
// as binary.  Prints one JSON line {"event":"listening","port":N,"pid":N} on
// stdout once it accepts connections.  It stops by itself when its stdin is
// closed (i.e. when the driver that started it goes away) or after
// --max-lifetime seconds, whichever comes first.
'use strict';

const { WebSocketServer } = require('ws');

function parseArgs(argv) {
  const out = { host: '127.0.0.1', port: 0, maxLifetime: 1800, watchStdin: true };
  for (let i = 2; i < argv.length; i++) {
    const a = argv[i];
    const next = () => {
      if (i + 1 >= argv.length) throw new Error(`missing value for ${a}`);
      return argv[++i];
    };
    if (a === '--port') out.port = Number(next());
    else if (a === '--host') out.host = next();
    else if (a === '--max-lifetime') out.maxLifetime = Number(next());
    else if (a === '--no-stdin-watch') out.watchStdin = false;
    else throw new Error(`unknown argument ${a}`);
  }
  return out;
}

const args = parseArgs(process.argv);
if (args.host !== '127.0.0.1' && args.host !== 'localhost' && args.host !== '::1') {
  // The harness only ever serves on loopback.
  console.error(`refusing to listen on non-loopback host ${args.host}`);
  process.exit(2);
}

let connections = 0;
let messages = 0;

const wss = new WebSocketServer({
  host: args.host,
  port: args.port,
  backlog: 4096,
  perMessageDeflate: false,
  clientTracking: false,
  skipUTF8Validation: true, // fixture: the proxy and the client are the ones under test
  maxPayload: 16 * 1024 * 1024,
});

wss.on('connection', (ws) => {
  connections++;
  ws.on('message', (data, isBinary) => {
    messages++;
    ws.send(data, { binary: isBinary });
  });
  ws.on('error', () => {});
  ws.on('close', () => { connections--; });
});

wss.on('listening', () => {
  const addr = wss.address();
  process.stdout.write(JSON.stringify({ event: 'listening', port: addr.port, pid: process.pid }) + '\n');
});

wss.on('error', (err) => {
  console.error(`echo backend error: ${err.message}`);
  process.exit(1);
});

function shutdown(code) {
  process.exit(code);
}

process.on('SIGTERM', () => shutdown(0));
process.on('SIGINT', () => shutdown(0));

if (args.maxLifetime > 0) {
  setTimeout(() => {
    console.error(`echo backend: max lifetime ${args.maxLifetime}s reached, exiting`);
    shutdown(0);
  }, args.maxLifetime * 1000).unref();
}

if (args.watchStdin) {
  // When the driver dies its end of our stdin pipe closes: stop then.
  process.stdin.on('data', () => {});
  process.stdin.on('end', () => shutdown(0));
  process.stdin.on('error', () => shutdown(0));
  process.stdin.resume();
}
