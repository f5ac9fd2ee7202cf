// One load process of `benchmarks/realtime_load.py --client js`: its share
// of the pairs, driven by the stock socket.io-client (package-lock.json pins
// it), so that the figures do not depend on our own Python client.
//
// It talks to the Python side in JSON lines: stdin brings the spec, then
// {"start": <wall-clock ms>}, then {"close": true}; stdout answers
// {"ready": {...}} once every socket has had its sync_complete, and
// {"done": {...}} with the raw results once the window and the drain are
// over. Errors go to stderr and end the process with status 1.
//
// The spec: pairs [{n, sender: [url, token], listeners: [[url, token]...],
// recipientId, chatId, setupSeq, devices (a send's devices list, or null)}],
// bystanders [[url, token]...], pairCount (all processes' pairs), rate (all
// processes' messages a second), seconds, drain, payloadBytes, byChat,
// connectConcurrency, connectTimeout (seconds), acknowledge (each receiving
// socket sends message_delivered for each message it gets). Message m (0, 1, 2... over
// all processes) is due at start + m / rate and belongs to pair m % pairCount:
// one timetable whatever the acks do (open loop).
//
// Per message: no crypto, no JSON of our own (socket.io-client encodes the
// packet as any client's emit does), a few array writes. The encryptedPayload
// carries the sequence number and the scheduled send time (wall-clock ms),
// so that the receiving socket measures the delivery latency by itself and
// counts lost and duplicated messages; out-of-order is counted on the
// server's per-chat seq, as the Python client does.

import { randomBytes } from "node:crypto";
import { performance } from "node:perf_hooks";
import { createInterface } from "node:readline";
import { io } from "socket.io-client";

const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();

async function hear() {
  const { value, done } = await lines.next();
  if (done) {
    throw new Error("stdin closed before the coordinator's next word");
  }
  return JSON.parse(value);
}

function tell(message) {
  process.stdout.write(JSON.stringify(message) + "\n");
}

// Wall-clock milliseconds with the monotonic clock's resolution: the Python
// side names the start as a wall-clock instant, the one clock both share.
const wallNow = () => performance.timeOrigin + performance.now();
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const round = (ms) => Math.round(ms * 1000) / 1000;  // µs are enough, and shorten the JSON

const spec = await hear();
const { pairs, pairCount, rate, seconds } = spec;
const total = Math.floor(rate * seconds);
// Every socket of the pair but the sending one gets each message.
const fan = pairs.length ? pairs[0].listeners.length : 1;
const slot = new Map(pairs.map((pair, i) => [pair.n, i]));  // pair number -> index in pairs

// -- what comes back -----------------------------------------------------------

const ackedAt = new Float64Array(total);  // wall ms of message m's ack, 0 if none
const arrivedAt = new Float64Array(total * fan);  // [m * fan + k]: at listener k of its pair
const ackErrors = {};
const otherEvents = {};
const deliveryMs = [];
let nAcked = 0, nFailed = 0, nDelivered = 0, inWindow = 0;
let duplicated = 0, lower = 0, gaps = 0, setupSeen = 0;
let windowEnd = Infinity;

function countOthers(socket) {
  socket.onAny((name) => {
    if (name !== "new_message" && name !== "authenticated" && name !== "sync_complete") {
      otherEvents[name] = (otherEvents[name] ?? 0) + 1;
    }
  });
}

// With spec.acknowledge, a message is acknowledged as a real client does
// once it has it (message_delivered; no ack asked for): every one, the
// catch-up's included, so that the receiver's delivered mark moves.
function acknowledge(socket, message) {
  if (spec.acknowledge) {
    socket.emit("message_delivered", { messageId: message.id, chatId: message.chatId });
  }
}

// Listener k of a pair: records each message once, and the server's seq order.
function listen(socket, pair, k) {
  const lastSeq = new Map([[pair.chatId, pair.setupSeq]]);
  socket.on("new_message", ({ message }) => {
    const now = wallNow();
    const payload = message.encryptedPayload;
    if (typeof payload.seq !== "number") {
      setupSeen += 1;  // the chat's first message, in the catch-up
      acknowledge(socket, message);
      return;
    }
    const at = payload.seq * fan + k;
    if (arrivedAt[at] !== 0) {
      duplicated += 1;
      return;
    }
    arrivedAt[at] = now;
    nDelivered += 1;
    acknowledge(socket, message);
    deliveryMs.push(round(now - payload.t));
    if (now <= windowEnd) {
      inWindow += 1;
    }
    const previous = lastSeq.get(message.chatId) ?? 0;
    if (message.seq <= previous) {
      lower += 1;
    } else {
      if (message.seq > previous + 1) {
        gaps += 1;
      }
      lastSeq.set(message.chatId, message.seq);
    }
  });
}

// -- connecting ----------------------------------------------------------------

// One socket, resolved once its catch-up is over (sync_complete), or null
// with the reason in failures. forceNew: one connection per socket, as
// separate clients have (io() would share one Manager per URL otherwise);
// no reconnection: a dropped socket is counted, not hidden.
function connect([url, token], prepare, failures) {
  return new Promise((resolve) => {
    const socket = io(url, {
      transports: ["websocket"], auth: { token }, forceNew: true, reconnection: false,
    });
    prepare(socket);  // before the catch-up's events arrive
    const timer = setTimeout(() => {
      failures.push("timed out");
      socket.disconnect();
      resolve(null);
    }, spec.connectTimeout * 1000);
    socket.once("sync_complete", () => {
      clearTimeout(timer);
      resolve(socket);
    });
    socket.once("connect_error", (err) => {
      clearTimeout(timer);
      failures.push(`connect_error: ${err.message} (${err.data?.code ?? "no code"})`);
      resolve(null);
    });
  });
}

// [address, prepare] each, connectConcurrency handshakes at a time.
async function connectAll(plan, failures) {
  const sockets = new Array(plan.length).fill(null);
  let next = 0;
  async function oneByOne() {
    while (next < plan.length) {
      const n = next++;
      sockets[n] = await connect(plan[n][0], plan[n][1], failures);
    }
  }
  await Promise.all(Array.from({ length: Math.min(spec.connectConcurrency, plan.length) }, oneByOne));
  return sockets;
}

const failures = [];
const connectStarted = performance.now();
const plan = [
  ...pairs.map((pair) => [pair.sender, countOthers]),
  ...pairs.flatMap((pair) => pair.listeners.map((address, k) => [address, (socket) => {
    countOthers(socket);
    listen(socket, pair, k);
  }])),
  ...spec.bystanders.map((address) => [address, countOthers]),
];
const sockets = await connectAll(plan, failures);
const senders = sockets.slice(0, pairs.length);

// -- the messages --------------------------------------------------------------

// encryptedPayload: {"v":2,"seq":m,"t":<due>,"nonce":...,"encryptedMessage":...}
// of payloadBytes bytes of JSON exactly (when that is more than the fields
// take): the filler is cut to what m's and t's digits leave.
const nonce = randomBytes(24).toString("base64");
const filler = randomBytes(Math.ceil(spec.payloadBytes * 3 / 4) + 3).toString("base64");
const fixed = JSON.stringify({ v: 2, seq: 0, t: 0, nonce, encryptedMessage: "" }).length - 2;

function payloadOf(m, t) {
  const room = spec.payloadBytes - fixed - String(m).length - String(t).length;
  return { v: 2, seq: m, t, nonce, encryptedMessage: filler.slice(0, Math.max(0, room)) };
}

const heads = pairs.map((pair) => ({
  ...(spec.byChat ? { chatId: pair.chatId } : { recipientId: pair.recipientId }),
  ...(pair.devices ? { devices: pair.devices } : {}),
}));
const sample = JSON.stringify(payloadOf(total - 1, round(wallNow()))).length;

tell({
  ready: {
    sockets: sockets.filter((s) => s !== null).length, failures: failures.slice(0, 5),
    connectSeconds: (performance.now() - connectStarted) / 1000, setupSeen, payloadBytes: sample,
  },
});

const { start } = await hear();
const startPerf = performance.now() + (start - wallNow());  // the same instant, on our clock
windowEnd = start + seconds * 1000;
const schedule = [];
for (let m = 0; m < total; m++) {
  if (slot.has(m % pairCount)) {
    schedule.push(m);
  }
}
const lagMs = [];
let sent = 0;

function onAck(m, answer) {
  if (answer?.success) {
    ackedAt[m] = wallNow();
    nAcked += 1;
  } else {
    nFailed += 1;
    const code = String(answer?.code);
    ackErrors[code] = (ackErrors[code] ?? 0) + 1;
  }
}

// Sends what is due, then sleeps until the next one; when behind, hands the
// event loop back every 64 sends so that what arrived is read meanwhile.
function run() {
  return new Promise((resolve) => {
    let i = 0;
    function pump() {
      for (let burst = 0; i < schedule.length; burst++) {
        const m = schedule[i];
        const due = startPerf + m * 1000 / rate;
        const now = performance.now();
        if (due > now) {
          setTimeout(pump, due - now);
          return;
        }
        if (burst === 64) {
          setImmediate(pump);
          return;
        }
        const n = slot.get(m % pairCount);
        const sender = senders[n];
        if (sender !== null) {
          const data = { ...heads[n], encryptedPayload: payloadOf(m, round(start + m * 1000 / rate)),
                         clientMessageId: String(m) };
          sender.emit("send_message", data, (answer) => onAck(m, answer));
          sent += 1;
        }
        lagMs.push(round(now - due));
        i += 1;
      }
      resolve();
    }
    pump();
  });
}

await sleep(Math.max(0, startPerf - performance.now()));
const cpuStart = process.cpuUsage();
await run();
await sleep(Math.max(0, windowEnd - wallNow()));
const cpu = process.cpuUsage(cpuStart);

const drainUntil = performance.now() + spec.drain * 1000;
while (performance.now() < drainUntil && (nAcked + nFailed < sent || nDelivered < fan * nAcked)) {
  await sleep(50);
}

// One ack latency per message, one delivery latency per (message, listener),
// and "all": when the last of a message's listeners had it (all of them did).
const ackMs = [];
const allMs = [];
for (const m of schedule) {
  const due = start + m * 1000 / rate;
  if (ackedAt[m] !== 0) {
    ackMs.push(round(ackedAt[m] - due));
  }
  let last = 0;
  let got = 0;
  for (let k = 0; k < fan; k++) {
    const at = arrivedAt[m * fan + k];
    if (at !== 0) {
      got += 1;
      last = Math.max(last, at);
    }
  }
  if (got === fan) {
    allMs.push(round(last - due));
  }
}
tell({
  done: {
    sent, acked: nAcked, failed: nFailed, fan, delivered: nDelivered, in_window: inWindow,
    all_ms: allMs, duplicated, lower, gaps, ack_errors: ackErrors, ack_ms: ackMs,
    delivery_ms: deliveryMs, lag_ms: lagMs, cpu: (cpu.user + cpu.system) / 1e6,
    dropped: sockets.filter((s) => s !== null && !s.connected).length,
    other_events: otherEvents,
  },
});

await hear();  // close: the coordinator has read the servers' figures
for (const socket of sockets) {
  socket?.disconnect();
}
process.exit(0);
