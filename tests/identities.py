"""Test support: node identities (EC key + certificate) issued by a throwaway federation CA."""

from cryptography.hazmat.primitives import serialization

from voxgrid.pki import create_ca, issue_certificate


def issue_identities(root, names):
    """A fresh CA under ``root`` and one identity per name: ({name: (private key, cert PEM)}, CA cert PEM)."""
    ca = create_ca(root / "ca")
    ids = {}
    for name in names:
        paths = issue_certificate(ca, root / "nodes", name, ["localhost"])
        ids[name] = (serialization.load_pem_private_key(paths.key.read_bytes(), password=None),
                     paths.cert.read_bytes())
    return ids, ca.cert.read_bytes()
