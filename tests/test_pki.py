"""The federation CA and TLS helpers work against real TLS servers (invariant 4)."""

import contextlib
import http.server
import ssl
import stat
import threading
import time

import httpx
import pytest
import uvicorn
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from voxgrid.pki import (
    CertPaths,
    certificate_info,
    client_ssl_context,
    create_ca,
    issue_certificate,
    load_ca,
    server_ssl_kwargs,
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    ca = create_ca(root / "ca")
    other_ca = create_ca(root / "other-ca", common_name="someone else's CA")
    return {
        "root": root,
        "ca": ca,
        "other_ca": other_ca,
        "server": issue_certificate(ca, root / "certs", "node-a", ["127.0.0.1", "localhost"]),
        "other_host": issue_certificate(ca, root / "certs", "node-b", ["other-host"]),
        "client": issue_certificate(ca, root / "certs", "scientist", ["scientist.local"], client=True),
    }


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"hello over tls"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # keep test output clean
        pass


@contextlib.contextmanager
def tls_server(cert: CertPaths, require_client_cert_from: CertPaths | None = None):
    """A real HTTPS server on 127.0.0.1:<free port>, serving ``cert``; yields the port."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    kwargs = server_ssl_kwargs(cert)
    context.load_cert_chain(kwargs["ssl_certfile"], kwargs["ssl_keyfile"])
    if require_client_cert_from is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(str(require_client_cert_from.cert))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def get(url, ca_cert, client_cert=None):
    return httpx.get(url, verify=client_ssl_context(ca_cert, client_cert), timeout=5)


def test_client_trusting_the_ca_reaches_the_server_by_ip_and_name(pki):
    with tls_server(pki["server"]) as port:
        for host in ("127.0.0.1", "localhost"):
            response = get(f"https://{host}:{port}/", pki["ca"].cert)
            assert response.status_code == 200 and response.text == "hello over tls"


def test_client_trusting_another_ca_is_refused(pki):
    with tls_server(pki["server"]) as port:
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            get(f"https://127.0.0.1:{port}/", pki["other_ca"].cert)


@pytest.mark.parametrize("host, reason", [("localhost", "Hostname mismatch"), ("127.0.0.1", "IP address mismatch")])
def test_certificate_for_another_host_is_refused(pki, host, reason):
    with tls_server(pki["other_host"]) as port:
        with pytest.raises(httpx.ConnectError, match=reason):
            get(f"https://{host}:{port}/", pki["ca"].cert)


def test_client_context_trusts_only_the_federation_ca(pki):
    context = client_ssl_context(pki["ca"].cert)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert [c["subject"] for c in context.get_ca_certs()] == [((("commonName", "voxgrid federation CA"),),)]


def test_mutual_tls_with_a_client_certificate(pki):
    with tls_server(pki["server"], require_client_cert_from=pki["ca"]) as port:
        url = f"https://127.0.0.1:{port}/"
        assert get(url, pki["ca"].cert, client_cert=pki["client"]).status_code == 200
        with pytest.raises(httpx.HTTPError):
            get(url, pki["ca"].cert)  # no client certificate


def test_uvicorn_serves_https_with_server_ssl_kwargs(pki):
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"uvicorn ok"})

    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off",
                            **server_ssl_kwargs(pki["server"]))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        assert get(f"https://localhost:{port}/", pki["ca"].cert).text == "uvicorn ok"
    finally:
        server.should_exit = True
        thread.join(10)


def test_private_keys_are_owner_only(pki, tmp_path):
    for paths in (pki["ca"], pki["server"]):
        assert stat.S_IMODE(paths.key.stat().st_mode) == 0o600
    # Re-issuing over a key that had loose permissions tightens them.
    loose = tmp_path / "node-c.key"
    loose.write_text("old")
    loose.chmod(0o644)
    issued = issue_certificate(pki["ca"], tmp_path, "node-c", ["10.0.0.3"])
    assert issued.key == loose and stat.S_IMODE(loose.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in loose.read_bytes()


def test_certificates_carry_the_expected_extensions(pki):
    ca = x509.load_pem_x509_certificate(pki["ca"].cert.read_bytes())
    leaf = x509.load_pem_x509_certificate(pki["server"].cert.read_bytes())
    leaf.verify_directly_issued_by(ca)
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    client_eku = x509.load_pem_x509_certificate(pki["client"].cert.read_bytes()).extensions
    assert ExtendedKeyUsageOID.CLIENT_AUTH in client_eku.get_extension_for_class(x509.ExtendedKeyUsage).value
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert leaf.not_valid_after_utc <= ca.not_valid_after_utc


def test_certificate_info(pki):
    info = certificate_info(pki["server"].cert)
    assert info["subject_cn"] == "node-a" and info["issuer_cn"] == "voxgrid federation CA"
    assert info["sans"] == ["127.0.0.1", "localhost"] and info["is_ca"] is False
    assert info["not_valid_after"].startswith(("20", "21")) and "T" in info["not_valid_after"]
    assert len(info["fingerprint_sha256"]) == 64
    assert certificate_info(pki["ca"].cert)["is_ca"] is True


@pytest.mark.parametrize("name", ["", "../evil", "-node", "node a", "a" * 64, "node/1", ".hidden"])
def test_invalid_names_are_refused(pki, tmp_path, name):
    with pytest.raises(ValueError, match="certificate name"):
        issue_certificate(pki["ca"], tmp_path, name, ["localhost"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("hosts", [[], ["bad host"], ["-x.example"], ["a..b"]])
def test_invalid_hosts_are_refused(pki, tmp_path, hosts):
    with pytest.raises(ValueError, match="hosts|host "):
        issue_certificate(pki["ca"], tmp_path, "node-d", hosts)


def test_load_ca_and_refusal_to_overwrite(pki, tmp_path):
    assert load_ca(pki["root"] / "ca") == pki["ca"]
    with pytest.raises(FileExistsError):
        create_ca(pki["root"] / "ca")
    (tmp_path / "ca.crt").write_text("x")
    with pytest.raises(FileNotFoundError, match="ca.key"):
        load_ca(tmp_path)
    with pytest.raises(ValueError, match="not the private key"):
        issue_certificate(CertPaths(pki["ca"].cert, pki["other_ca"].key), tmp_path, "node-e", ["localhost"])
