// A Cyphr realtime client on the stock socket.io-client (4.x): the example
// of the client author's guide (docs/client-guide.rst), run by the tests
// (tests/test_docs_example.py) against a real server.
//
// It connects with a session token, prints the catch-up (acknowledging
// each message as delivered), sends one message once the catch-up is over,
// prints the server's ack, and disconnects.
//
//   npm ci --prefix docs/examples
//   CYPHR_SERVER=http://localhost:3001 CYPHR_TOKEN=<session token> \
//       node docs/examples/realtime-client.mjs bob "hello, Bob"
//
// The token comes from the environment, not the command line, where other
// users of the machine could read it. Exit status: 0 done, 1 refused or
// failed, 2 wrong usage.

import { randomUUID } from "node:crypto";
import { io } from "socket.io-client";

const server = process.env.CYPHR_SERVER ?? "http://localhost:3001";
const token = process.env.CYPHR_TOKEN;
const [recipient, text] = process.argv.slice(2);
if (!token || !recipient || text === undefined) {
  console.error("usage: CYPHR_TOKEN=<token> [CYPHR_SERVER=<url>] node realtime-client.mjs RECIPIENT TEXT");
  process.exit(2);
}

// How long an ack may take, and the whole run.
const ACK_TIMEOUT_MS = 10_000;
const RUN_TIMEOUT_MS = 30_000;

let failed = false;

function fail(why) {
  if (failed) {
    return; // what follows the first failure (acks cut short) says nothing new
  }
  failed = true;
  console.error(`error: ${why}`);
  process.exitCode = 1;
  socket.disconnect();
  clearTimeout(deadline);
}

// An event with an ack: resolves with the ack when it says success, and
// rejects with its code otherwise (or when none comes in time).
async function call(event, payload) {
  const ack = await socket.timeout(ACK_TIMEOUT_MS).emitWithAck(event, payload);
  if (!ack.success) {
    throw new Error(`${event} refused: ${ack.error} (${ack.code})`);
  }
  return ack;
}

// The token goes in the CONNECT packet's auth payload, never in the URL.
// This example exits on a drop; a real client keeps socket.io-client's
// reconnection on and catches up after each reconnection.
const socket = io(server, { auth: { token }, reconnection: false });
const deadline = setTimeout(() => fail("timed out"), RUN_TIMEOUT_MS);
// Acks still on their way when the message is sent: wait for them before leaving.
const receipts = [];

socket.on("connect_error", (err) => {
  // A refused token: err.data.code is INVALID_TOKEN, TOKEN_EXPIRED, TOKEN_REVOKED...
  fail(`connection refused: ${err.message} (${err.data?.code ?? "no code"})`);
});

socket.on("disconnect", (reason) => {
  if (reason === "io server disconnect") {
    fail("the server ended the session (logged out elsewhere, or the token was revoked)");
  }
});

socket.on("authenticated", ({ cyphrId }) => {
  console.log(`authenticated as ${cyphrId}`);
});

// During the catch-up, every message not yet acknowledged as delivered;
// afterwards, each new one as it comes. encryptedPayload is the sealed
// message of docs/encryption.rst, for the client to open.
socket.on("new_message", ({ message }) => {
  console.log(`new_message ${message.id} seq ${message.seq} in chat ${message.chatId} from ${message.senderId}`);
  receipts.push(
    call("message_delivered", { messageId: message.id, chatId: message.chatId })
      .then(() => console.log(`delivered ${message.id}`))
      .catch((err) => fail(err.message)),
  );
});

// The catch-up is over: the socket now gets only what is new.
socket.on("sync_complete", async ({ cursor }) => {
  console.log(`caught up, sync cursor ${cursor}`);
  try {
    const ack = await call("send_message", {
      recipientId: recipient,
      // A real client puts here the message sealed for every member
      // (docs/encryption.rst); the server stores it without looking inside.
      // This example sends an unsealed placeholder, marked as such.
      encryptedPayload: { example: "not sealed", text },
      // Resending with the same id after a lost ack cannot store it twice.
      clientMessageId: randomUUID(),
    });
    console.log(`sent ${ack.messageId} seq ${ack.seq} in chat ${ack.chatId}`);
    await Promise.all(receipts);
    clearTimeout(deadline);
    socket.disconnect();
  } catch (err) {
    fail(err.message);
  }
});
