// One CoAP POST over DTLS-PSK with node-coap-client (CoAP on node-dtls-client 1.x), for
// tests/test_interop_dtls_stacks.py:  node coap_post.js PORT IDENTITY KEY JSON_PAYLOAD
// (node-coap-client always sends Content-Format 50, application/json: the reading is JSON.)
// Prints one JSON line: {"code": "2.04"} or {"error": ...}; exits 0 only on an answer.
"use strict";
const { CoapClient } = require("node-coap-client");

const [port, identity, key, json] = process.argv.slice(2);

function done(result, code) {
  process.stdout.write(JSON.stringify(result) + "\n");
  process.exit(code);
}

setTimeout(() => done({ error: "no answer within 120 s" }, 3), 120000);
CoapClient.setSecurityParams("127.0.0.1", { psk: { [identity]: key } });
CoapClient.request(`coaps://127.0.0.1:${port}/telemetry`, "post", Buffer.from(json), { keepAlive: false })
  .then((r) => done({ code: `${r.code.major}.${String(r.code.minor).padStart(2, "0")}` }, 0))
  .catch((e) => done({ error: String(e && e.message || e) }, 2));
