// A reading POSTed to /telemetry over DTLS 1.2 with PSK, on Bouncy Castle's own DTLS stack (Debian's
// libbctls-java: org.bouncycastle.tls, its DTLSClientProtocol and PSKTlsClient on the BC crypto
// provider) -- an independent client stack for corem's engine (tests/test_interop_dtls_stacks.py).
//
//   java -cp bctls.jar:bcprov.jar:bcutil.jar:. BcDtlsPost PORT IDENTITY KEY SUITE PAYLOAD_HEX
//
// Prints one JSON line: {"code": "2.04", "suite": "<the suite the handshake chose>"} or {"error": ...}.

import java.net.DatagramSocket;
import java.net.InetAddress;
import java.nio.charset.StandardCharsets;
import java.security.SecureRandom;
import java.util.Map;

import org.bouncycastle.tls.BasicTlsPSKIdentity;
import org.bouncycastle.tls.CipherSuite;
import org.bouncycastle.tls.DTLSClientProtocol;
import org.bouncycastle.tls.DTLSTransport;
import org.bouncycastle.tls.PSKTlsClient;
import org.bouncycastle.tls.ProtocolVersion;
import org.bouncycastle.tls.UDPTransport;
import org.bouncycastle.tls.crypto.impl.bc.BcTlsCrypto;

public class BcDtlsPost {
    static final Map<String, Integer> SUITES = Map.of(
        "TLS_PSK_WITH_AES_128_CCM_8", CipherSuite.TLS_PSK_WITH_AES_128_CCM_8,
        "TLS_PSK_WITH_AES_128_CCM", CipherSuite.TLS_PSK_WITH_AES_128_CCM,
        "TLS_PSK_WITH_AES_128_GCM_SHA256", CipherSuite.TLS_PSK_WITH_AES_128_GCM_SHA256);

    static void done(String json, int code) {
        System.out.println(json);
        System.exit(code);
    }

    /** `s` as a JSON string (control characters as \\uXXXX: an exception's text may span lines). */
    static String quoted(String s) {
        StringBuilder b = new StringBuilder("\"");
        for (char ch : s.toCharArray()) {
            if (ch == '"' || ch == '\\') b.append('\\').append(ch);
            else if (ch < 0x20) b.append(String.format("\\u%04x", (int) ch));
            else b.append(ch);
        }
        return b.append('"').toString();
    }

    public static void main(String[] args) throws Exception {
        int port = Integer.parseInt(args[0]);
        String identity = args[1];
        byte[] key = args[2].getBytes(StandardCharsets.UTF_8);
        String suite = args[3];
        byte[] payload = java.util.HexFormat.of().parseHex(args[4]);  // (HexFormat: JDK 17 and later)
        Integer id = SUITES.get(suite);
        if (id == null) done("{\"error\": " + quoted("unknown suite " + suite) + "}", 2);
        int[] offered = {id};
        int[] chosen = {-1};

        DatagramSocket socket = new DatagramSocket();
        socket.connect(InetAddress.getLoopbackAddress(), port);
        PSKTlsClient client = new PSKTlsClient(new BcTlsCrypto(new SecureRandom()),
                new BasicTlsPSKIdentity(identity, key)) {
            @Override
            protected ProtocolVersion[] getSupportedVersions() {
                return ProtocolVersion.DTLSv12.only();
            }

            @Override
            protected int[] getSupportedCipherSuites() {
                return offered;
            }

            @Override
            public void notifySelectedCipherSuite(int selected) {
                super.notifySelectedCipherSuite(selected);
                chosen[0] = selected;
            }
        };
        DTLSTransport dtls;
        try {
            dtls = new DTLSClientProtocol().connect(client, new UDPTransport(socket, 1500));
        } catch (Exception e) {
            done("{\"error\": " + quoted(String.valueOf(e)) + "}", 2);
            return;
        }
        String name = SUITES.entrySet().stream().filter(s -> s.getValue() == chosen[0]).map(Map.Entry::getKey)
                .findFirst().orElse(String.valueOf(chosen[0]));

        // CON POST /telemetry, Content-Format 60 (CBOR), a 2-byte token
        int mid = (int) (System.nanoTime() & 0xffff);
        byte[] path = "telemetry".getBytes(StandardCharsets.US_ASCII);
        byte[] head = {0x42, 0x02, (byte) (mid >> 8), (byte) mid, 0x5a, 0x17, (byte) (0xb0 | path.length)};
        byte[] request = new byte[head.length + path.length + 3 + payload.length];
        System.arraycopy(head, 0, request, 0, head.length);
        System.arraycopy(path, 0, request, head.length, path.length);
        int at = head.length + path.length;
        request[at] = 0x11;  // Content-Format (12 = 11 + 1), one byte
        request[at + 1] = 60;
        request[at + 2] = (byte) 0xff;
        System.arraycopy(payload, 0, request, at + 3, payload.length);
        // The answer: piggybacked on the ACK, or -- a commit slower than the server's piggyback
        // timeout, on a loaded machine -- an empty ACK and then a separate response (matched by the
        // token, and acknowledged); the request goes again every 3 s until it is acknowledged.
        dtls.send(request, 0, request.length);
        long sent = System.currentTimeMillis(), deadline = sent + 120_000;
        boolean acked = false;
        byte[] buf = new byte[1500];
        while (System.currentTimeMillis() < deadline) {
            if (!acked && System.currentTimeMillis() - sent > 3000) {
                dtls.send(request, 0, request.length);
                sent = System.currentTimeMillis();
            }
            int n = dtls.receive(buf, 0, buf.length, 1000);
            if (n < 4) continue;
            int type = (buf[0] >> 4) & 3, tkl = buf[0] & 15, c = buf[1] & 0xff;
            int got = (buf[2] & 0xff) << 8 | (buf[3] & 0xff);
            if (type == 2 && got == mid && c == 0) {  // the empty ACK: the answer comes separately
                acked = true;
                continue;
            }
            boolean ours = type == 2 ? got == mid : tkl == 2 && n >= 6 && buf[4] == 0x5a && buf[5] == 0x17;
            if (!ours || c == 0) continue;
            if (type == 0) dtls.send(new byte[] {0x60, 0, buf[2], buf[3]}, 0, 4);  // a separate CON: its ACK
            dtls.close();
            done(String.format("{\"code\": \"%d.%02d\", \"suite\": %s}", c >> 5, c & 0x1f, quoted(name)), 0);
        }
        done("{\"error\": \"no answer in 120 s\"}", 3);
    }
}
