"""The certificates the DTLS and TLS fuzz targets handshake with (fuzz_dtls_engine.py,
fuzz_tls_stream.py): a CA, a server and a device certificate on P-256, made once per process."""

from datetime import datetime, timedelta, timezone

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

Issued = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


def certificate(name: str, issuer: Issued | None, ca: bool) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject)
            .issuer_name(issuer[0].subject if issuer else subject)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca, None), critical=True)
            .sign(issuer[1] if issuer else key, hashes.SHA256()))
    return cert, key


CA = certificate("ca", None, True)
SERVER = certificate("server", CA, False)
DEVICE = certificate("device", CA, False)
DER = serialization.Encoding.DER
