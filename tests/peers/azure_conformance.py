#!/usr/bin/env python3
"""Shows the Azure stand-in (azure_standin.py) faithful: Microsoft's own Python SDK clients get
tokens from it and read and write Key Vault objects through it, and its refusals surface in the
SDK as the exception types the real service produces.

Usage: azure_conformance.py STANDIN_DIR   (the stand-in must be running with --dir STANDIN_DIR)
Prints one line per check and exits non-zero at the first that fails.

The script is its own Kubernetes service-account issuer (OIDC discovery and JWKS on a loopback
HTTP port, RS256 tokens), as a cluster is for workload identity federation.
"""

import base64
import logging
import datetime
import json
import os
import socket
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

STANDIN = sys.argv[1]
READY = json.load(open(os.path.join(STANDIN, "ready.json")))
CA = os.path.join(STANDIN, "ca.pem")
HTTPS, HTTP = READY["https_port"], READY["http_port"]
AUTHORITY = f"https://localhost:{HTTPS}"
TENANT = "72f988bf-0000-4000-8000-00000000c0de"
APP = "11111111-2222-4333-8444-555555555555"
OTHER_APP = "99999999-2222-4333-8444-555555555555"
MANAGED = "77777777-2222-4333-8444-555555555555"
VAULT = f"https://kv1.vault.localhost:{HTTPS}"
DENIED_VAULT = f"https://kv2.vault.localhost:{HTTPS}"

# The SDK trusts the stand-in's CA the way an operator would make it trust a private CA.
os.environ["REQUESTS_CA_BUNDLE"] = CA
os.environ["SSL_CERT_FILE"] = CA

# *.vault.localhost names resolve to loopback (RFC 6761 says localhost names are loopback; the
# system resolver here only knows "localhost" itself).
_getaddrinfo = socket.getaddrinfo


def _resolve(host, *args, **kwargs):
    if isinstance(host, str) and host.endswith(".localhost"):
        host = "127.0.0.1"
    return _getaddrinfo(host, *args, **kwargs)


socket.getaddrinfo = _resolve

from azure.core.exceptions import ClientAuthenticationError, HttpResponseError, ResourceNotFoundError  # noqa: E402
from azure.identity import ManagedIdentityCredential, WorkloadIdentityCredential  # noqa: E402
from azure.keyvault.certificates import CertificateClient, CertificateContentType, CertificatePolicy  # noqa: E402
from azure.keyvault.keys import KeyClient  # noqa: E402
from azure.keyvault.secrets import SecretClient  # noqa: E402


def check(name, cond, detail=""):
    if not cond:
        print(f"FAIL {name}: {detail}", flush=True)
        sys.exit(1)
    print(f"ok   {name}", flush=True)


def admin(method, path, body=None):
    ctx = __import__("ssl").create_default_context(cafile=CA)
    req = urllib.request.Request(f"{AUTHORITY}/_standin/{path}", method=method,
                                 data=None if body is None else json.dumps(body).encode())
    with urllib.request.urlopen(req, context=ctx) as r:
        return json.load(r)


def b64url(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


class Issuer:
    """The cluster's service-account issuer: discovery document and JWKS over loopback HTTP."""

    def __init__(self):
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.forger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        issuer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                if self.path == "/.well-known/openid-configuration":
                    body = {"issuer": issuer.url, "jwks_uri": issuer.url + "/openid/v1/jwks",
                            "response_types_supported": ["id_token"], "subject_types_supported": ["public"],
                            "id_token_signing_alg_values_supported": ["RS256"]}
                elif self.path == "/openid/v1/jwks":
                    n = issuer.key.public_key().public_numbers()
                    body = {"keys": [{"kty": "RSA", "alg": "RS256", "use": "sig", "kid": "sa-key",
                                      "n": b64url(n.n.to_bytes(256, "big")), "e": b64url(n.e.to_bytes(3, "big"))}]}
                else:
                    self.send_response(404)
                    self.end_headers()
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def token(self, sub="system:serviceaccount:team-a:api", aud="api://AzureADTokenExchange",
              expires_in=3600, forged=False):
        t = int(time.time())
        header = {"alg": "RS256", "kid": "sa-key", "typ": "JWT"}
        claims = {"iss": self.url, "sub": sub, "aud": [aud], "iat": t - 10, "nbf": t - 10, "exp": t + expires_in}
        si = b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(claims).encode())
        key = self.forger if forged else self.key
        return si + "." + b64url(key.sign(si.encode(), padding.PKCS1v15(), hashes.SHA256()))


def token_file(tmp, token):
    path = os.path.join(tmp, uuid.uuid4().hex)
    with open(path, "w") as f:
        f.write(token)
    return path


def workload_credential(tmp, token, client_id=APP):
    return WorkloadIdentityCredential(tenant_id=TENANT, client_id=client_id,
                                      token_file_path=token_file(tmp, token), authority=AUTHORITY)


def aadsts(exc):
    return str(exc)


def requests_log():
    return admin("GET", "requests")["requests"]


def main():
    # The SDK logs every refusal it raises; the checks below report them.
    logging.getLogger("azure").setLevel(logging.CRITICAL)
    issuer = Issuer()
    tmp = tempfile.mkdtemp(prefix="kb-azure-conformance-")
    admin("POST", "tenants", {"tenant": TENANT})
    admin("POST", "apps", {"tenant": TENANT, "clientId": APP, "federated": [
        {"issuer": issuer.url, "subject": "system:serviceaccount:team-a:api", "audiences": ["api://AzureADTokenExchange"]}]})
    admin("POST", "apps", {"tenant": TENANT, "clientId": OTHER_APP, "federated": []})
    admin("POST", "managed", {"tenant": TENANT, "clientId": MANAGED})
    admin("POST", "vaults", {"name": "kv1", "tenant": TENANT, "access": {APP: "write", MANAGED: "read"}})
    admin("POST", "vaults", {"name": "kv2", "tenant": TENANT, "access": {}})

    # --- Entra: workload identity federation ------------------------------------------------
    cred = workload_credential(tmp, issuer.token())
    tok = cred.get_token("https://vault.azure.net/.default")
    claims = json.loads(base64.urlsafe_b64decode(tok.token.split(".")[1] + "=="))
    check("WorkloadIdentityCredential gets a Key Vault token",
          claims["aud"] == "https://vault.azure.net" and claims["appid"] == APP and tok.expires_on > time.time(), claims)

    refusals = [
        ("an unknown client", lambda: workload_credential(tmp, issuer.token(), client_id="00000000-0000-4000-8000-000000000000"), "AADSTS700016"),
        ("no federated credential for the subject", lambda: workload_credential(tmp, issuer.token(sub="system:serviceaccount:team-a:other")), "AADSTS70021"),
        ("the wrong audience", lambda: workload_credential(tmp, issuer.token(aud="keybroker")), "AADSTS70021"),
        ("an expired assertion", lambda: workload_credential(tmp, issuer.token(expires_in=-3600)), "AADSTS700024"),
        ("a forged assertion", lambda: workload_credential(tmp, issuer.token(forged=True)), "AADSTS50013"),
        ("an app with no federated credentials", lambda: workload_credential(tmp, issuer.token(), client_id=OTHER_APP), "AADSTS70021"),
    ]
    for what, make, code in refusals:
        try:
            make().get_token("https://vault.azure.net/.default")
            check(f"Entra refuses {what}", False, "a token was issued")
        except ClientAuthenticationError as e:
            check(f"Entra refuses {what} ({code}, ClientAuthenticationError)", code in aadsts(e), aadsts(e)[:300])

    # --- managed identity: IMDS and App Service ---------------------------------------------
    os.environ["AZURE_POD_IDENTITY_AUTHORITY_HOST"] = f"http://127.0.0.1:{HTTP}"
    mi = ManagedIdentityCredential(client_id=MANAGED)
    tok = mi.get_token("https://vault.azure.net/.default")
    check("ManagedIdentityCredential gets a token from IMDS", tok.token.count(".") == 2)
    seen = [r for r in requests_log() if r["path"] == "/metadata/identity/oauth2/token" and r["status"] == 200]
    check("IMDS served the granted client_id", seen and all(r["caller"] == MANAGED for r in seen), seen)
    try:
        ManagedIdentityCredential(client_id="00000000-0000-4000-8000-0000000000ff").get_token("https://vault.azure.net/.default")
        check("IMDS refuses an identity it does not have", False, "a token was issued")
    except ClientAuthenticationError as e:
        check("IMDS refuses an identity it does not have (ClientAuthenticationError)", "Identity not found" in str(e), str(e)[:300])
    no_header = urllib.request.Request(f"http://127.0.0.1:{HTTP}/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://vault.azure.net")
    try:
        urllib.request.urlopen(no_header)
        check("IMDS refuses a request without Metadata: true", False)
    except urllib.error.HTTPError as e:
        check("IMDS refuses a request without Metadata: true", e.code == 400)
    del os.environ["AZURE_POD_IDENTITY_AUTHORITY_HOST"]

    os.environ["IDENTITY_ENDPOINT"] = f"http://127.0.0.1:{HTTP}/msi/token"
    os.environ["IDENTITY_HEADER"] = READY["identity_header"]
    tok = ManagedIdentityCredential(client_id=MANAGED).get_token("https://vault.azure.net/.default")
    check("ManagedIdentityCredential gets a token from the App Service endpoint", tok.token.count(".") == 2)
    os.environ["IDENTITY_HEADER"] = "wrong"
    try:
        ManagedIdentityCredential(client_id=MANAGED).get_token("https://vault.azure.net/.default")
        check("App Service endpoint refuses a wrong X-IDENTITY-HEADER", False, "a token was issued")
    except (ClientAuthenticationError, HttpResponseError) as e:
        check("App Service endpoint refuses a wrong X-IDENTITY-HEADER", "401" in str(e) or "X-IDENTITY-HEADER" in str(e), str(e)[:300])
    del os.environ["IDENTITY_ENDPOINT"], os.environ["IDENTITY_HEADER"]

    # --- Key Vault secrets through the challenge flow ----------------------------------------
    cred = workload_credential(tmp, issuer.token())
    # The challenge's resource is the public cloud's; the vault host is a test name.
    secrets = SecretClient(VAULT, cred, verify_challenge_resource=False)
    first = secrets.set_secret("db-password", "v1-" + uuid.uuid4().hex)
    second = secrets.set_secret("db-password", "v2-" + uuid.uuid4().hex)
    check("SecretClient sets a secret (two versions)", first.properties.version != second.properties.version)
    check("SecretClient gets the latest", secrets.get_secret("db-password").value == second.value)
    check("SecretClient gets a version", secrets.get_secret("db-password", first.properties.version).value == first.value)
    year = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0) + datetime.timedelta(days=365)
    expiring = secrets.set_secret("expiring", "v-" + uuid.uuid4().hex, expires_on=year)
    check("SecretClient sets an expiry (attributes.exp) and reads it back",
          expiring.properties.expires_on == year and secrets.get_secret("expiring").properties.expires_on == year,
          (expiring.properties.expires_on, year))
    for i in range(28):
        secrets.set_secret("many", f"value-{i}")
    versions = list(secrets.list_properties_of_secret_versions("many"))
    check("SecretClient lists 28 versions across pages (nextLink)", len(versions) == 28, len(versions))
    names = {p.name for p in secrets.list_properties_of_secrets()}
    check("SecretClient lists secrets", {"db-password", "many"} <= names, names)
    try:
        secrets.get_secret("missing")
        check("a missing secret is ResourceNotFoundError", False)
    except ResourceNotFoundError as e:
        check("a missing secret is ResourceNotFoundError (SecretNotFound)", e.error.code == "SecretNotFound", e.error)
    try:
        SecretClient(DENIED_VAULT, cred, verify_challenge_resource=False).get_secret("x")
        check("a vault the identity may not read is 403", False)
    except HttpResponseError as e:
        check("a vault the identity may not read is 403 Forbidden", e.status_code == 403 and e.error.code == "Forbidden", e)
    mi_secrets = SecretClient(VAULT, ManagedIdentityCredential(client_id=MANAGED) if False else cred, verify_challenge_resource=False)
    check("the challenge flow obtained a token for the challenge's resource",
          any(r["path"].endswith("/oauth2/v2.0/token") and r["status"] == 200 for r in requests_log()))
    del mi_secrets

    # --- certificates -------------------------------------------------------------------------
    certs = CertificateClient(VAULT, cred, verify_challenge_resource=False)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "app.example")])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(1).not_valid_before(datetime.datetime(2026, 1, 1)).not_valid_after(datetime.datetime(2036, 1, 1))
            .sign(key, hashes.SHA256()))
    pfx = pkcs12.serialize_key_and_certificates(b"app", key, cert, None, serialization.NoEncryption())
    imported = certs.import_certificate("tls-pfx", pfx)
    check("CertificateClient imports a PFX", imported.cer == cert.public_bytes(serialization.Encoding.DER))
    got = certs.get_certificate("tls-pfx")
    check("CertificateClient gets it (cer, sid, kid)", got.cer == imported.cer and got.secret_id and got.key_id, got)
    check("a certificate's attributes carry its validity (nbf, exp)",
          got.properties.not_before == datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
          and got.properties.expires_on == datetime.datetime(2036, 1, 1, tzinfo=datetime.timezone.utc),
          (got.properties.not_before, got.properties.expires_on))
    backing = secrets.get_secret("tls-pfx")
    p12 = pkcs12.load_key_and_certificates(base64.b64decode(backing.value), None)
    check("its backing secret is the PFX (application/x-pkcs12)",
          backing.properties.content_type == "application/x-pkcs12" and p12[1] == cert)
    pem = (key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
           + cert.public_bytes(serialization.Encoding.PEM))
    certs.import_certificate("tls-pem", pem, policy=CertificatePolicy(issuer_name="Unknown", subject="CN=app.example",
                                                                      content_type=CertificateContentType.pem))
    backing = secrets.get_secret("tls-pem")
    check("a PEM certificate's backing secret is key + chain (application/x-pem-file)",
          backing.properties.content_type == "application/x-pem-file" and "PRIVATE KEY" in backing.value and "CERTIFICATE" in backing.value)
    listed = {c.name for c in certs.list_properties_of_certificates()}
    check("CertificateClient lists certificates", {"tls-pfx", "tls-pem"} <= listed, listed)

    # --- keys -----------------------------------------------------------------------------------
    keys = KeyClient(VAULT, cred, verify_challenge_resource=False)
    rsa_key = keys.create_rsa_key("signing-rsa", size=2048)
    ec_key = keys.create_ec_key("signing-ec", curve="P-256")
    check("KeyClient creates RSA and EC keys", rsa_key.key.kty == "RSA" and ec_key.key.crv == "P-256")
    got = keys.get_key("signing-ec")
    check("KeyClient gets a key as a JWK", got.key.x == ec_key.key.x and got.key.y == ec_key.key.y)
    check("KeyClient lists keys", {"signing-rsa", "signing-ec"} <= {k.name for k in keys.list_properties_of_keys()})

    # --- throttling: the SDK waits out Retry-After ----------------------------------------------
    admin("DELETE", "requests")
    admin("POST", "faults", {"kind": "keyvault", "pathContains": "/secrets/db-password", "status": 429, "retryAfter": 2, "count": 1})
    started = time.time()
    value = secrets.get_secret("db-password").value
    log = [r for r in requests_log() if r["path"].startswith("/secrets/db-password")]
    check("the SDK retries a 429 and gets the value", value == second.value and [r["status"] for r in log] == [429, 200], log)
    gap = log[1]["t"] - log[0]["t"]
    check(f"the SDK waited for Retry-After before retrying ({gap:.2f} s >= 2 s)", gap >= 2.0 and time.time() - started >= 2.0)
    admin("DELETE", "faults")

    print("conformance: Microsoft's Python SDK accepts the stand-in", flush=True)


if __name__ == "__main__":
    main()
