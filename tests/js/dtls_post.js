// One CoAP POST over DTLS-PSK with node-dtls-client (a TypeScript DTLS stack), for
// tests/test_interop_dtls_stacks.py:  node dtls_post.js PORT IDENTITY KEY SUITE PAYLOAD_HEX
// Prints one JSON line: {"code": "2.04", "suite": ...} or {"error": ...}; exits 0 only on an answer.
"use strict";
const { dtls } = require("node-dtls-client");

const [port, identity, key, suite, payloadHex] = process.argv.slice(2);
const payload = Buffer.from(payloadHex, "hex");

// a confirmable POST /telemetry, Content-Format 60 (application/cbor), CoAP by hand (RFC 7252 §3)
const mid = Math.floor(Math.random() * 0xffff);
const token = Buffer.from([0x5a, 0x17]);
const request = Buffer.concat([
  Buffer.from([0x40 | token.length, 0x02, mid >> 8, mid & 0xff]), token,
  Buffer.from([0xb9]), Buffer.from("telemetry"),   // Uri-Path (11), length 9
  Buffer.from([0x11, 60]),                          // Content-Format (12 = 11 + 1), length 1: 60
  Buffer.from([0xff]), payload,
]);

function done(result, code) {
  process.stdout.write(JSON.stringify(result) + "\n");
  process.exit(code);
}

const socket = dtls.createSocket({
  type: "udp4", address: "127.0.0.1", port: Number(port),
  psk: { [identity]: key }, ciphers: [suite], timeout: 90000,
});
socket.on("connected", () => socket.send(request));
socket.on("error", (e) => done({ error: String(e && e.message || e) }, 2));
socket.on("message", (msg) => {
  const tkl = msg[0] & 0x0f;
  if (msg.readUInt16BE(2) !== mid || !msg.subarray(4, 4 + tkl).equals(token)) return;
  const c = msg[1];
  done({ code: `${c >> 5}.${String(c & 0x1f).padStart(2, "0")}`, suite }, 0);
});
setTimeout(() => done({ error: "no answer within 120 s" }, 3), 120000);
