"""Mbed TLS error codes as the names corem's metrics use (`corem_dtls_handshakes_failed_total{reason}`).

The code is read from the exception (python-mbedtls's `TLSError.err`), never from its text.
Mbed TLS adds a low-level module's code (< 0x80: ASN.1, bignum, ...) to a high-level one
(0x1000-0x7F80: X.509, SSL); the name is the high-level part's. Every SSL and X.509 error of
Mbed TLS 2.28 (include/mbedtls/ssl.h, x509.h) has a name, so the label set is bounded and
documented; anything else is `other`.
"""

from __future__ import annotations

CLOSE_NOTIFY = 0x7880  # MBEDTLS_ERR_SSL_PEER_CLOSE_NOTIFY

#: The names corem chose first (docs/operating.md) for the failures devices cause most.
_CHOSEN = {
    0x7180: "bad_mac",  # INVALID_MAC: a wrong key (the Finished message does not verify)
    0x6C80: "unknown_identity",  # UNKNOWN_IDENTITY: the PSK store said KeyError
    0x7780: "alert_received",  # FATAL_ALERT_MESSAGE
    0x7380: "no_cipher_in_common",  # NO_CIPHER_CHOSEN
    0x2700: "certificate_not_trusted",  # X509_CERT_VERIFY_FAILED
    0x7480: "no_client_certificate",
    0x7900: "bad_client_hello",  # BAD_HS_CLIENT_HELLO
    0x6E80: "bad_protocol_version",  # BAD_HS_PROTOCOL_VERSION
}

#: The rest of Mbed TLS 2.28's SSL errors: MBEDTLS_ERR_SSL_<NAME>, lower-cased.
_SSL = {
    0x7000: "crypto_in_progress", 0x7080: "feature_unavailable", 0x7100: "bad_input_data",
    0x7200: "invalid_record", 0x7280: "conn_eof", 0x7300: "unknown_cipher", 0x7400: "no_rng",
    0x7500: "certificate_too_large", 0x7580: "certificate_required", 0x7600: "private_key_required",
    0x7680: "ca_chain_required", 0x7700: "unexpected_message", 0x7800: "peer_verify_failed",
    0x7880: "peer_close_notify", 0x7980: "bad_hs_server_hello", 0x7A00: "bad_hs_certificate",
    0x7A80: "bad_hs_certificate_request", 0x7B00: "bad_hs_server_key_exchange",
    0x7B80: "bad_hs_server_hello_done", 0x7C00: "bad_hs_client_key_exchange",
    0x7C80: "bad_hs_client_key_exchange_rp", 0x7D00: "bad_hs_client_key_exchange_cs",
    0x7D80: "bad_hs_certificate_verify", 0x7E00: "bad_hs_change_cipher_spec", 0x7E80: "bad_hs_finished",
    0x7F00: "alloc_failed", 0x7F80: "hw_accel_failed", 0x6F80: "hw_accel_fallthrough",
    0x6F00: "compression_failed", 0x6E00: "bad_hs_new_session_ticket", 0x6D80: "session_ticket_expired",
    0x6D00: "pk_type_mismatch", 0x6C00: "internal_error", 0x6B80: "counter_wrapping",
    0x6B00: "waiting_server_hello_renego", 0x6A80: "hello_verify_required", 0x6A00: "buffer_too_small",
    0x6980: "no_usable_ciphersuite", 0x6900: "want_read", 0x6880: "want_write", 0x6800: "timeout",
    0x6780: "client_reconnect", 0x6700: "unexpected_record", 0x6680: "non_fatal",
    0x6600: "invalid_verify_hash", 0x6580: "continue_processing", 0x6500: "async_in_progress",
    0x6480: "early_message", 0x6000: "unexpected_cid", 0x5F00: "version_mismatch", 0x5E80: "bad_config",
    0x5E00: "cache_entry_not_found",
}

#: Mbed TLS 2.28's X.509 errors: certificate_<NAME> (MBEDTLS_ERR_X509_<NAME>), lower-cased.
_X509 = {
    0x2080: "feature_unavailable", 0x2100: "unknown_oid", 0x2180: "invalid_format", 0x2200: "invalid_version",
    0x2280: "invalid_serial", 0x2300: "invalid_alg", 0x2380: "invalid_name", 0x2400: "invalid_date",
    0x2480: "invalid_signature", 0x2500: "invalid_extensions", 0x2580: "unknown_version",
    0x2600: "unknown_sig_alg", 0x2680: "sig_mismatch", 0x2780: "unknown_format", 0x2800: "bad_input_data",
    0x2880: "alloc_failed", 0x2900: "file_io_error", 0x2980: "buffer_too_small", 0x3000: "fatal_error",
}

NAMES: dict[int, str] = {**_SSL, **{code: f"certificate_{name}" for code, name in _X509.items()}, **_CHOSEN}


def error_code(e: BaseException) -> int | None:
    """The Mbed TLS error code an exception carries (positive), or None."""
    err = getattr(e, "err", None)
    return abs(err) if isinstance(err, int) and not isinstance(err, bool) else None


def reason(e: BaseException) -> str:
    """The metric label for a failed handshake: the name of its Mbed TLS error, or `other`."""
    code = error_code(e)
    if code is None:
        return "other"
    return NAMES.get(code) or NAMES.get(code & ~0x7F) or "other"
