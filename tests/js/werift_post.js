// One CoAP POST over DTLS with werift-dtls (TypeScript, WebRTC's DTLS: ECDHE with AES-128-GCM and
// certificates only, no PSK), for tests/test_interop_dtls_stacks.py:
//   node werift_post.js PORT CERT_PEM KEY_PKCS8_PEM PAYLOAD_HEX
// Prints one JSON line: {"code": "2.04"} or {"error": ...}; exits 0 only on an answer.
"use strict";
const fs = require("fs");
const { DtlsClient } = require("werift-dtls/lib/dtls/src");
const { UdpTransport } = require("werift-dtls/lib/common/src/transport");

const [port, certPath, keyPath, payloadHex] = process.argv.slice(2);

function done(result, code) {
  process.stdout.write(JSON.stringify(result) + "\n");
  process.exit(code);
}

setTimeout(() => done({ error: "no answer within 120 s" }, 3), 120000);

(async () => {
  const transport = await UdpTransport.init("udp4");
  transport.rinfo = { address: "127.0.0.1", port: Number(port) };  // where it sends
  const client = new DtlsClient({
    transport,
    cert: fs.readFileSync(certPath).toString(),
    key: fs.readFileSync(keyPath).toString(),
    signatureHash: { hash: 4, signature: 3 },  // SHA-256 with ECDSA (P-256 keys)
    extendedMasterSecret: true,
  });
  // a confirmable POST /telemetry, Content-Format 60 (application/cbor), CoAP by hand (RFC 7252 §3)
  const mid = Math.floor(Math.random() * 0xffff);
  const token = Buffer.from([0x5a, 0x17]);
  const request = Buffer.concat([
    Buffer.from([0x40 | token.length, 0x02, mid >> 8, mid & 0xff]), token,
    Buffer.from([0xb9]), Buffer.from("telemetry"),
    Buffer.from([0x11, 60]),
    Buffer.from([0xff]), Buffer.from(payloadHex, "hex"),
  ]);
  client.onConnect.subscribe(() => client.send(request));
  client.onError.subscribe((e) => done({ error: String((e && e.message) || e) }, 2));
  client.onData.subscribe((msg) => {
    if (msg.length < 4 || msg.readUInt16BE(2) !== mid) return;
    const c = msg[1];
    done({ code: `${c >> 5}.${String(c & 0x1f).padStart(2, "0")}` }, 0);
  });
  client.connect().catch((e) => done({ error: String((e && e.message) || e) }, 2));
})();
