"""`twistproxy dev-certs DIR [NAME ...]`: throwaway certificates for trying TLS locally.

Writes a fresh CA (`ca.pem`, its key is never written, so it can sign nothing else)
and, for each NAME, `NAME.pem` and `NAME.key` signed by it, valid for NAME, `*.NAME`,
localhost, 127.0.0.1 and ::1. The default names are the ones etc/examples/tls-edge.toml
uses. Never for production: anyone who trusts `ca.pem` trusts these certificates.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_NAMES = ("example.com", "example.org")
VALID_DAYS = 365


def _alt_names(name: str) -> list[x509.GeneralName]:
    try:
        names = [x509.IPAddress(ipaddress.ip_address(name))]
    except ValueError:
        names = [x509.DNSName(name), x509.DNSName(f"*.{name}")]
    for extra in ("localhost", "127.0.0.1", "::1"):
        if extra != name:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(extra)))
            except ValueError:
                names.append(x509.DNSName(extra))
    return names


def _certificate(subject: str, key, issuer: x509.Name, issuer_key, ca: bool,
                 alt_names=()) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(issuer)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None),
                              critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                              critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   issuer_key.public_key()), critical=False))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True,
            content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
    else:
        builder = (builder
                   .add_extension(x509.SubjectAlternativeName(list(alt_names)),
                                  critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                         ExtendedKeyUsageOID.CLIENT_AUTH]),
                                  critical=False))
    return builder.sign(issuer_key, hashes.SHA256())


def write_dev_certs(folder: str | os.PathLike, names=DEFAULT_NAMES,
                    force: bool = False) -> list[Path]:
    """Write ca.pem and NAME.pem/NAME.key for each name into `folder` (created);
    returns the paths written. FileExistsError if one exists and not `force`."""
    folder = Path(folder)
    targets = [folder / "ca.pem"]
    for name in names:
        targets += [folder / f"{name}.pem", folder / f"{name}.key"]
    if not force:
        for path in targets:
            if path.exists():
                raise FileExistsError(path)
    folder.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                            "twistproxy dev-certs throwaway CA")])
    ca = _certificate("twistproxy dev-certs throwaway CA", ca_key, ca_name, ca_key, True)
    targets[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for name in names:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(name, key, ca_name, ca_key, False, _alt_names(name))
        key_path = folder / f"{name}.key"
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        (folder / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return targets


def run_dev_certs(folder: str, names: list[str], force: bool) -> int:
    import sys
    names = names or list(DEFAULT_NAMES)
    for name in names:
        if not name or "/" in name or name.startswith(".") or "*" in name:
            print(f"{name!r}: not a host name (NAME.pem and *.NAME are made from it)",
                  file=sys.stderr)
            return 2
    try:
        write_dev_certs(folder, names, force)
    except FileExistsError as e:
        print(f"{e}: already exists (--force replaces it)", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{folder}: cannot write: {e.strerror or e}", file=sys.stderr)
        return 1
    ca = os.path.join(folder, "ca.pem")
    print(f"wrote throwaway certificates for local testing (valid {VALID_DAYS} days), "
          f"never for production:")
    print(f"  {ca}  the CA that signed them (its key was not kept): trust only this")
    for name in names:
        valid = ", ".join(str(n.value) for n in _alt_names(name))
        print(f"  {os.path.join(folder, name)}.pem and .key  for {valid}")
    first = os.path.abspath(os.path.join(folder, names[0]))
    print(f"""Use them in a listener (a relative path is from the configuration file's folder):
  tls = {{ cert = "{first}.pem", key = "{first}.key" }}
for an https:// backend serving one of them: ca_file = "{os.path.abspath(ca)}"
and let clients verify with the CA, e.g.
  curl --cacert {ca} --resolve {names[0]}:8443:127.0.0.1 https://{names[0]}:8443/""")
    return 0
