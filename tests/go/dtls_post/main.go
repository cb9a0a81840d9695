// One CoAP POST over DTLS-PSK with pion/dtls v2 (Go; Debian's golang-github-pion-dtls.v2-dev), for
// tests/test_interop_dtls_stacks.py, built in GOPATH mode against /usr/share/gocode:
//
//	dtls_post PORT IDENTITY KEY SUITE PAYLOAD_HEX
//
// Prints one JSON line: {"code": "2.04", "suite": ...} or {"error": ...}; exits 0 only on an answer.
package main

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"strconv"
	"time"

	"github.com/pion/dtls/v2"
)

var suites = map[string]dtls.CipherSuiteID{
	"TLS_PSK_WITH_AES_128_CCM_8":      dtls.TLS_PSK_WITH_AES_128_CCM_8,
	"TLS_PSK_WITH_AES_128_CCM":        dtls.TLS_PSK_WITH_AES_128_CCM,
	"TLS_PSK_WITH_AES_128_GCM_SHA256": dtls.TLS_PSK_WITH_AES_128_GCM_SHA256,
}

func done(result map[string]string, code int) {
	out, _ := json.Marshal(result)
	fmt.Println(string(out))
	os.Exit(code)
}

func main() {
	port, _ := strconv.Atoi(os.Args[1])
	identity, key, suite := os.Args[2], []byte(os.Args[3]), os.Args[4]
	payload, _ := hex.DecodeString(os.Args[5])
	id, ok := suites[suite]
	if !ok {
		done(map[string]string{"error": "unknown suite " + suite}, 2)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	conn, err := dtls.DialWithContext(ctx, "udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: port}, &dtls.Config{
		PSK:                  func([]byte) ([]byte, error) { return key, nil },
		PSKIdentityHint:      []byte(identity),
		CipherSuites:         []dtls.CipherSuiteID{id},
		ExtendedMasterSecret: dtls.RequireExtendedMasterSecret,
	})
	if err != nil {
		done(map[string]string{"error": err.Error()}, 2)
	}
	defer conn.Close()
	// a confirmable POST /telemetry, Content-Format 60 (application/cbor), CoAP by hand (RFC 7252 §3)
	mid := uint16(time.Now().UnixNano())
	token := []byte{0x5a, 0x17}
	request := []byte{0x40 | byte(len(token)), 0x02, byte(mid >> 8), byte(mid)}
	request = append(request, token...)
	request = append(request, 0xb9)
	request = append(request, "telemetry"...)
	request = append(request, 0x11, 60, 0xff)
	request = append(request, payload...)
	if _, err := conn.Write(request); err != nil {
		done(map[string]string{"error": err.Error()}, 2)
	}
	buf := make([]byte, 1500)
	_ = conn.SetReadDeadline(time.Now().Add(120 * time.Second))
	for {
		n, err := conn.Read(buf)
		if err != nil {
			done(map[string]string{"error": err.Error()}, 3)
		}
		msg := buf[:n]
		if n < 4+len(token) || uint16(msg[2])<<8|uint16(msg[3]) != mid {
			continue
		}
		c := msg[1]
		done(map[string]string{"code": fmt.Sprintf("%d.%02d", c>>5, c&0x1f), "suite": suite}, 0)
	}
}
