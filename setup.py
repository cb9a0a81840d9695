"""Builds the optional C parts (the decoder, the batched socket calls, the fast lane, the Kafka sink's
delivery tickets, the registry's index, DTLS record protection);
without them corem runs on Python alone."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "corem.codec._speedups",
            ["corem/codec/_speedups.c"],
            depends=["corem/codec/coap_options.h"],
            optional=True,
            extra_compile_args=["-O2", "-Wall"],
        ),
        Extension(
            "corem.bus._reports",
            ["corem/bus/_reports.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall"],
        ),
        Extension(
            "corem.net._sockets",
            ["corem/net/_sockets.c"],
            depends=["corem/net/udp_batch.h"],
            optional=True,
            extra_compile_args=["-O2", "-Wall"],
        ),
        Extension(
            "corem.fastlane._lane",
            ["corem/fastlane/_lane.c"],
            # (dtls_records.h: only the table of _records' capsule, read at run time: the DTLS records
            # are opened with _records' objects; libcrypto for OSCORE's AES-CCM, oscore.h: aead_ccm.h)
            depends=["corem/codec/coap_options.h", "corem/net/udp_batch.h", "corem/fastlane/fifomap.h",
                     "corem/fastlane/cbor_json.h", "corem/fastlane/lpp.h", "corem/fastlane/rules.h", "corem/fastlane/layouts.h", "corem/fastlane/senml.h", "corem/fastlane/pycodec.h", "corem/fastlane/dtls_sessions.h",
                     "corem/fastlane/drogue.h", "corem/fastlane/oscore.h", "corem/fastlane/proto.h",
                     "corem/dtls/engine/dtls_records.h", "corem/dtls/engine/aead_ccm.h"],
            libraries=["crypto"],
            optional=True,
            extra_compile_args=["-O2", "-Wall"],
        ),
        # the registry's compact hash index (corem/registry/compact.py's PyIndex is its Python twin)
        Extension(
            "corem.registry._index",
            ["corem/registry/_index.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall"],
        ),
        # DTLS record protection on the system's OpenSSL libcrypto (Debian: libssl-dev)
        Extension(
            "corem.dtls.engine._records",
            ["corem/dtls/engine/_records.c"],
            depends=["corem/dtls/engine/dtls_records.h", "corem/dtls/engine/aead_ccm.h"],
            libraries=["crypto"],
            optional=True,
            extra_compile_args=["-O2", "-Wall"],
        ),
        # the TLS 1.2 PRF on the same libcrypto (crypto.py's `prf` is its pure-Python twin)
        Extension(
            "corem.dtls.engine._prf",
            ["corem/dtls/engine/_prf.c"],
            depends=["corem/dtls/engine/hmac256.h"],
            libraries=["crypto"],
            optional=True,
            extra_compile_args=["-O2", "-Wall"],
        ),
        # the HelloVerifyRequest to a cookie-less ClientHello (engine.py `_hello` is its Python twin)
        Extension(
            "corem.dtls.engine._hello",
            ["corem/dtls/engine/_hello.c"],
            depends=["corem/dtls/engine/hmac256.h", "corem/dtls/engine/client_hello.h"],
            libraries=["crypto"],
            optional=True,
            extra_compile_args=["-O2", "-Wall"],
        ),
        # the offloaded DTLS sessions' keys as fingerprints (keyset.py `KeySetPy` is its twin)
        Extension(
            "corem.dtls._keyset",
            ["corem/dtls/_keyset.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall"],
        ),
        # the server's PSK flights (engine.py `_hello`'s ServerHello, the ClientKeyExchange..Finished
        # answer; connection.py's state machine is their Python twin)
        Extension(
            "corem.dtls.engine._flights",
            ["corem/dtls/engine/_flights.c"],
            depends=["corem/dtls/engine/hmac256.h", "corem/dtls/engine/client_hello.h",
                     "corem/dtls/engine/dtls_records.h", "corem/dtls/engine/aead_ccm.h"],
            libraries=["crypto"],
            optional=True,
            extra_compile_args=["-O2", "-Wall"],
        ),
    ]
)
