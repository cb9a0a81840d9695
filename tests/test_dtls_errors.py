"""Handshake failure reasons: Mbed TLS error codes as documented names, read from the exception."""

from __future__ import annotations

import pytest
from mbedtls.exceptions import TLSError

from corem.dtls.errors import NAMES, reason


@pytest.mark.parametrize("code,name", [
    (0x7180, "bad_mac"), (0x6C80, "unknown_identity"), (0x7080, "feature_unavailable"),
    (0x6E80, "bad_protocol_version"), (0x6E00, "bad_hs_new_session_ticket"), (0x2700, "certificate_not_trusted"),
    (0x2180 + 0x62, "certificate_invalid_format"),  # X.509 + ASN.1: named by its high-level part
])
def test_codes_have_names(code, name):
    assert reason(TLSError(err=code)) == name


def test_the_code_is_read_from_the_exception_never_from_its_text():
    assert reason(ValueError("failed with -0x7180")) == "other"
    assert reason(TLSError(err=0x1234)) == "other"  # no Mbed TLS SSL or X.509 error: bounded labels


def test_every_name_is_a_metric_label():
    assert all(n.replace("_", "").isalnum() and n.islower() for n in NAMES.values())
    assert len(set(NAMES.values())) == len(NAMES)  # one code, one name
