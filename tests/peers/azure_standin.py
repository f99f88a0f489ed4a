#!/usr/bin/env python3
"""A stand-in for Microsoft Entra ID and Azure Key Vault, for keybroker's tests.

No Entra or Key Vault emulator can be installed here, so the test suite brings this one. It is
written from Microsoft's public REST documentation (wire shapes, parameter names, error codes)
and shown faithful by tests/azure_conformance.py, which drives it with Microsoft's own Python
SDK (azure-identity, azure-keyvault-secrets/-certificates/-keys).

One process, two listeners on --bind (default 127.0.0.1):
  HTTPS (certificate from a CA generated at start, written to DIR/ca.pem):
    Entra ID   POST /{tenant}/oauth2/v2.0/token (client credentials with a client assertion:
               workload identity federation), GET /{tenant}/v2.0/.well-known/openid-configuration,
               GET /common/discovery/instance, GET /{tenant}/discovery/v2.0/keys
    Key Vault  any other path, the vault chosen by the first label of the Host header
               (kv1.vault.azure.net and kv1.vault.localhost both name vault "kv1")
    admin      /_standin/... (JSON; set up tenants, apps, vaults, objects, faults; read the
               request log)
  HTTP (plain, as the real endpoints are):
    IMDS                      GET /metadata/identity/oauth2/token   (header Metadata: true)
    App Service managed id.   GET /msi/token                        (header X-IDENTITY-HEADER)

Started as: azure_standin.py --dir DIR [--token-lifetime SECONDS] [--issuer-ca PEM]. When both listeners are up it
writes DIR/ready.json: {"https_port": N, "http_port": M, "identity_header": "..."}.

Deliberate differences from the real service, all configuration rather than protocol:
  - a federated credential's issuer may be plain http on loopback (a test's issuer), and an
    https issuer's certificate may chain to --issuer-ca (a test cluster's own CA);
  - the Key Vault resource in challenges and token audiences is --kv-resource
    (default https://vault.azure.net), whatever the vault's host name.
"""

import argparse
import base64
import datetime
import hashlib
import json
import os
import ssl
import subprocess
import tempfile
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
PAGE_SIZE = 25  # Key Vault's default page size for list operations


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def int_b64url(n: int) -> str:
    return b64url(n.to_bytes((n.bit_length() + 7) // 8, "big"))


def now() -> int:
    return int(time.time())


class Refusal(Exception):
    """An HTTP error response: status, JSON body, extra headers."""

    def __init__(self, status, body, headers=None):
        super().__init__(status)
        self.status, self.body, self.headers = status, body, headers or {}


def entra_error(status, error, code, message):
    trace = str(uuid.uuid4())
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
    return Refusal(
        status,
        {
            "error": error,
            "error_description": f"AADSTS{code}: {message}\r\nTrace ID: {trace}\r\n"
            f"Correlation ID: {trace}\r\nTimestamp: {stamp}",
            "error_codes": [code],
            "timestamp": stamp,
            "trace_id": trace,
            "correlation_id": trace,
            "error_uri": f"https://login.microsoftonline.com/error?code={code}",
        },
    )


def kv_error(status, code, message, inner=None, headers=None):
    err = {"code": code, "message": message}
    if inner:
        err["innererror"] = {"code": inner}
    return Refusal(status, {"error": err}, headers)


class Keys:
    """The TLS CA, the server certificate, the token signing key and a certificate issuer for
    Key Vault certificates."""

    def __init__(self, directory, names):
        self.tls_ca_key = ec.generate_private_key(ec.SECP256R1())
        self.tls_ca = self._ca("keybroker test Azure stand-in CA", self.tls_ca_key)
        self.tls_key = ec.generate_private_key(ec.SECP256R1())
        sans = [x509.DNSName(n) for n in names] + [
            x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))
        ]
        self.tls_cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "azure stand-in")]))
            .issuer_name(self.tls_ca.subject)
            .public_key(self.tls_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=1))
            .not_valid_after(datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self.tls_ca_key, hashes.SHA256())
        )
        pem = lambda c: c.public_bytes(serialization.Encoding.PEM)
        with open(os.path.join(directory, "ca.pem"), "wb") as f:
            f.write(pem(self.tls_ca))
        self.cert_file = os.path.join(directory, "server.pem")
        with open(self.cert_file, "wb") as f:
            f.write(pem(self.tls_cert) + pem(self.tls_ca))
            f.write(
                self.tls_key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        self.signing_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = hashlib.sha256(
            self.signing_key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        ).hexdigest()[:16]
        self.issuing_ca_key = ec.generate_private_key(ec.SECP256R1())
        self.issuing_ca = self._ca("keybroker test issuing CA", self.issuing_ca_key)

    @staticmethod
    def _ca(name, key):
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=1))
            .not_valid_after(datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )

    def sign_jwt(self, claims):
        header = {"typ": "JWT", "alg": "RS256", "kid": self.kid, "x5t": self.kid}
        signing_input = b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(claims).encode())
        sig = self.signing_key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + b64url(sig)

    def verify_own_jwt(self, token):
        """Claims of an access token this stand-in issued, or None."""
        try:
            head, body, sig = token.split(".")
            self.signing_key.public_key().verify(
                b64url_decode(sig), f"{head}.{body}".encode(), padding.PKCS1v15(), hashes.SHA256()
            )
            return json.loads(b64url_decode(body))
        except Exception:
            return None

    def jwks(self):
        pub = self.signing_key.public_key().public_numbers()
        return {
            "keys": [
                {"kty": "RSA", "use": "sig", "kid": self.kid, "x5t": self.kid,
                 "n": int_b64url(pub.n), "e": int_b64url(pub.e)}
            ]
        }

    def issue_certificate(self, subject, key_kind):
        """A leaf certificate (and its key) signed by the issuing CA."""
        key = (
            rsa.generate_private_key(public_exponent=65537, key_size=2048)
            if key_kind == "rsa"
            else ec.generate_private_key(ec.SECP256R1())
        )
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(self.issuing_ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=1))
            .not_valid_after(datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=365))
            .sign(self.issuing_ca_key, hashes.SHA256())
        )
        return key, [cert, self.issuing_ca]


def pem_bundle(key, chain):
    """Key Vault's PEM form of a certificate's secret: PKCS#8 private key, then the chain."""
    out = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    for c in chain:
        out += c.public_bytes(serialization.Encoding.PEM)
    return out.decode()


def pfx_bundle(key, chain):
    """Key Vault's PFX form: PKCS#12 with an empty password, SHA-1 3DES bags and a SHA-1 MAC, as
    Key Vault exports it (cryptography refuses an empty password, so the openssl tool does it)."""
    with tempfile.TemporaryDirectory() as d:  # openssl reads its -in file twice
        path = os.path.join(d, "bundle.pem")
        with open(path, "w") as f:
            f.write(pem_bundle(key, chain))
        out = subprocess.run(
            ["openssl", "pkcs12", "-export", "-in", path, "-passout", "pass:",
             "-keypbe", "PBE-SHA1-3DES", "-certpbe", "PBE-SHA1-3DES", "-macalg", "sha1"],
            capture_output=True, check=True,
        ).stdout
    return base64.b64encode(out).decode()


class Vault:
    def __init__(self, name, tenant):
        self.name, self.tenant = name, tenant
        self.access = {}  # principal (client id) -> "read" | "write"
        self.secrets = {}  # name -> [version dicts], oldest first
        self.certificates = {}
        self.keys = {}


class State:
    def __init__(self, args, keys):
        self.lock = threading.RLock()
        self.args, self.keys = args, keys
        self.tenants = set()
        self.apps = {}  # client id -> {"tenant", "federated": [...], "oid"}
        self.managed = {}  # client id -> {"system": bool, "oid"}
        self.vaults = {}
        self.faults = []
        self.log = []
        self.oidc_cache = {}  # issuer -> (fetched_at, jwks)
        self.identity_header = uuid.uuid4().hex
        self.connections = 0  # connections accepted (TLS handshakes on the HTTPS listener)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: State = None
    plain_http = False
    # TCP_NODELAY, and each reply in one write (_send): a reply split in two small writes
    # waits for the client's delayed ACK (~40 ms per request), which no real service does and
    # which would swamp every latency figure measured against this stand-in.
    disable_nagle_algorithm = True

    def log_message(self, fmt, *args):  # the request log is kept in memory, not on stderr
        pass

    def setup(self):
        super().setup()
        with self.state.lock:
            self.state.connections += 1
            self.conn_id = self.state.connections
        self.conn_requests = 0

    # ---- plumbing -------------------------------------------------------------------------
    def _body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status, body, headers=None):
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        if body is not None:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        # end_headers() would write the headers on their own; one write instead.
        self._headers_buffer.append(b"\r\n")
        reply = b"".join(self._headers_buffer) + data
        self._headers_buffer = []
        self.wfile.write(reply)

    def _handle(self, method):
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]")
        body = self._body()
        self.conn_requests += 1
        # Which connection carried the request, whether it was the connection's first (a new
        # TCP + TLS setup), whether TLS resumed a session, and who the client said it was.
        resumed = getattr(self.connection, "session_reused", None)
        entry = {"t": time.time(), "method": method, "path": url.path, "host": host,
                 "kind": None, "caller": None, "status": None, "conn": self.conn_id,
                 "newConn": self.conn_requests == 1, "tlsResumed": resumed,
                 "userAgent": self.headers.get("User-Agent")}
        try:
            status, resp, headers = self._route(method, url.path, query, host, body, entry)
        except Refusal as r:
            status, resp, headers = r.status, r.body, r.headers
        except Exception as e:  # a bug in the stand-in: say so loudly
            status, resp, headers = 500, {"error": {"code": "StandinBug", "message": repr(e)}}, {}
            print(f"stand-in bug on {method} {self.path}: {e!r}", file=sys.stderr, flush=True)
        entry["status"] = status
        # Logged before the answer goes out, so a client that has its answer finds it logged.
        entry["answered"] = None
        if entry["kind"] != "admin":
            with self.state.lock:
                self.state.log.append(entry)
        self._send(status, resp, headers)
        # When the answer left: a client cannot act on it sooner.
        entry["answered"] = time.time()

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_PUT(self):
        self._handle("PUT")

    def do_PATCH(self):
        self._handle("PATCH")

    def do_DELETE(self):
        self._handle("DELETE")

    def _base(self):
        return f"https://{self.headers.get('Host')}"

    def _authority(self):
        """The Entra authority Key Vault challenges point at (this process unless --authority)."""
        return self.state.args.authority or f"https://localhost:{self.server.server_address[1]}"

    def _fault(self, entry):
        """Applies the first matching injected fault (latency, or an error response)."""
        with self.state.lock:
            for f in self.state.faults:
                if f.get("kind") and f["kind"] != entry["kind"]:
                    continue
                if f.get("pathContains") and f["pathContains"] not in entry["path"]:
                    continue
                if f.get("until") and time.time() >= f["until"]:
                    continue
                if f.get("count") is not None:
                    if f["count"] <= 0:
                        continue
                    f["count"] -= 1
                break
            else:
                return
        if f.get("latencyMs"):
            time.sleep(f["latencyMs"] / 1000)
        status = f.get("status")
        if not status:
            return
        headers = {}
        if f.get("retryAfter") is not None:
            headers["Retry-After"] = str(f["retryAfter"])
        if entry["kind"] == "entra":
            raise Refusal(status, {"error": "temporarily_unavailable",
                                   "error_description": "AADSTS50196: injected fault"}, headers)
        code = "Throttled" if status == 429 else "InternalServerError"
        raise kv_error(status, code, "Request was not processed (injected fault).", headers=headers)

    # ---- routing --------------------------------------------------------------------------
    def _route(self, method, path, query, host, body, entry):
        parts = [urllib.parse.unquote(p) for p in path.strip("/").split("/") if p]
        if self.plain_http:
            entry["kind"] = "managed-identity"
            self._fault(entry)
            if parts == ["metadata", "identity", "oauth2", "token"] and method == "GET":
                return self._imds(query, entry)
            if parts == ["msi", "token"] and method == "GET":
                return self._app_service(query, entry)
            raise Refusal(404, {"error": "not_found"})
        if parts[:1] == ["_standin"]:
            entry["kind"] = "admin"
            return self._admin(method, parts[1:], query, json.loads(body or b"null"))
        if len(parts) >= 2 and parts[1] in ("oauth2", "v2.0", "discovery") or parts[:2] == ["common", "discovery"]:
            entry["kind"] = "entra"
            self._fault(entry)
            return self._entra(method, parts, query, body, entry)
        entry["kind"] = "keyvault"
        self._fault(entry)
        return self._keyvault(method, parts, query, host, body, entry)

    # ---- Entra ID ---------------------------------------------------------------------------
    def _entra(self, method, parts, query, body, entry):
        st = self.state
        base = self._base()
        if parts[:3] == ["common", "discovery", "instance"]:
            h = urllib.parse.urlsplit(base).netloc
            return 200, {
                "tenant_discovery_endpoint": f"{base}/common/v2.0/.well-known/openid-configuration",
                "api-version": "1.1",
                "metadata": [{"preferred_network": h, "preferred_cache": h, "aliases": [h]}],
            }, {}
        tenant = parts[0]
        if parts[1:] == ["v2.0", ".well-known", "openid-configuration"]:
            return 200, {
                "token_endpoint": f"{base}/{tenant}/oauth2/v2.0/token",
                "authorization_endpoint": f"{base}/{tenant}/oauth2/v2.0/authorize",
                "device_authorization_endpoint": f"{base}/{tenant}/oauth2/v2.0/devicecode",
                "issuer": f"{base}/{tenant}/v2.0",
                "jwks_uri": f"{base}/{tenant}/discovery/v2.0/keys",
                "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
                "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
                "scopes_supported": ["openid", "profile", "email", "offline_access"],
                "tenant_region_scope": None,
            }, {}
        if parts[1:] == ["discovery", "v2.0", "keys"]:
            return 200, st.keys.jwks(), {}
        if parts[1:] != ["oauth2", "v2.0", "token"] or method != "POST":
            raise Refusal(404, {"error": "not_found"})
        form = dict(urllib.parse.parse_qsl(body.decode()))
        client_id = form.get("client_id", "")
        entry["caller"] = client_id
        with st.lock:
            known_tenant = tenant in st.tenants
            app = st.apps.get(client_id)
        if not known_tenant:
            raise entra_error(400, "invalid_request", 90002, f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud.")
        if form.get("grant_type") != "client_credentials":
            raise entra_error(400, "unsupported_grant_type", 70003, "The app requested an unsupported grant type.")
        if not app or app["tenant"] != tenant:
            raise entra_error(400, "unauthorized_client", 700016, f"Application with identifier '{client_id}' was not found in the directory '{tenant}'. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You may have sent your authentication request to the wrong tenant.")
        if form.get("client_assertion_type") != ASSERTION_TYPE or not form.get("client_assertion"):
            raise entra_error(400, "invalid_request", 900144, "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.")
        claims = self._check_assertion(app, form["client_assertion"])
        scope = form.get("scope", "")
        resource = scope.split(" ")[0]
        if resource.endswith("/.default"):
            resource = resource[: -len("/.default")]
        else:
            raise entra_error(400, "invalid_scope", 1002012, f"The provided value for scope {scope} is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI).")
        token, lifetime = self._access_token(tenant, client_id, app["oid"], resource)
        entry["subject"] = claims.get("sub")
        return 200, {"token_type": "Bearer", "expires_in": lifetime, "ext_expires_in": lifetime,
                     "access_token": token}, {}

    def _check_assertion(self, app, assertion):
        try:
            head_b64, body_b64, sig_b64 = assertion.split(".")
            header = json.loads(b64url_decode(head_b64))
            claims = json.loads(b64url_decode(body_b64))
        except Exception:
            raise entra_error(400, "invalid_request", 50027, "JWT token is invalid or malformed.")
        iss, sub = claims.get("iss"), claims.get("sub")
        aud = claims.get("aud")
        auds = aud if isinstance(aud, list) else [aud]
        match = [f for f in app["federated"]
                 if f["issuer"] == iss and f["subject"] == sub and any(a in f["audiences"] for a in auds)]
        if not match:
            raise entra_error(400, "invalid_client", 70021, f"No matching federated identity record found for presented assertion. Assertion Issuer: '{iss}'. Assertion Subject: '{sub}'. Assertion Audience: '{','.join(map(str, auds))}'.")
        jwks = self._issuer_keys(iss)
        if jwks is None:
            raise entra_error(400, "invalid_client", 50166, f"Request to External OIDC endpoint failed. Issuer: '{iss}'.")
        key = next((k for k in jwks.get("keys", []) if k.get("kid") == header.get("kid")), None)
        if key is None or header.get("alg") != "RS256":
            raise entra_error(401, "invalid_client", 50013, "Assertion failed signature validation. [Reason - The key was not found., Thumbprint of key used by client: '" + str(header.get("kid")) + "']")
        pub = rsa.RSAPublicNumbers(
            int.from_bytes(b64url_decode(key["e"]), "big"), int.from_bytes(b64url_decode(key["n"]), "big")
        ).public_key()
        try:
            pub.verify(b64url_decode(sig_b64), f"{head_b64}.{body_b64}".encode(), padding.PKCS1v15(), hashes.SHA256())
        except Exception:
            raise entra_error(401, "invalid_client", 50013, "Assertion failed signature validation. [Reason - The provided signature value did not match the expected signature value.]")
        t = now()
        skew = 300  # Entra allows five minutes of clock skew
        if claims.get("exp", 0) + skew < t or claims.get("nbf", 0) - skew > t:
            raise entra_error(400, "invalid_client", 700024, "Client assertion is not within its valid time range. Ensure that the assertion's 'exp' and 'nbf' are within the allowed range.")
        return claims

    def _issuer_keys(self, iss):
        st = self.state
        with st.lock:
            cached = st.oidc_cache.get(iss)
        if cached and time.time() - cached[0] < 60:
            return cached[1]
        u = urllib.parse.urlsplit(iss)
        if u.scheme != "https" and not (u.scheme == "http" and u.hostname in ("127.0.0.1", "localhost")):
            return None
        # As Entra does: the issuer's discovery document, then the keys it points at.
        ctx = ssl.create_default_context(cafile=st.args.issuer_ca) if st.args.issuer_ca else None
        try:
            with urllib.request.urlopen(iss.rstrip("/") + "/.well-known/openid-configuration",
                                        timeout=5, context=ctx) as r:
                conf = json.load(r)
            with urllib.request.urlopen(conf["jwks_uri"], timeout=5, context=ctx) as r:
                jwks = json.load(r)
        except Exception:
            return None
        with st.lock:
            st.oidc_cache[iss] = (time.time(), jwks)
        return jwks

    def _access_token(self, tenant, client_id, oid, resource):
        lifetime = self.state.args.token_lifetime
        t = now()
        claims = {"aud": resource, "iss": f"https://sts.windows.net/{tenant}/", "iat": t, "nbf": t,
                  "exp": t + lifetime, "appid": client_id, "azp": client_id, "oid": oid, "sub": oid,
                  "tid": tenant, "ver": "1.0", "uti": uuid.uuid4().hex}
        return self.state.keys.sign_jwt(claims), lifetime

    # ---- managed identity -------------------------------------------------------------------
    def _managed_token(self, query, entry, api_versions):
        if query.get("api-version") not in api_versions:
            raise Refusal(400, {"error": "invalid_request", "error_description": "Invalid or missing api-version"})
        resource = query.get("resource", "").rstrip("/")
        if resource.endswith("/.default"):
            resource = resource[: -len("/.default")]
        if not resource:
            raise Refusal(400, {"error": "invalid_request", "error_description": "Required query variable 'resource' is missing"})
        st = self.state
        with st.lock:
            cid = query.get("client_id")
            if cid:
                ident = st.managed.get(cid)
            else:
                systems = [(k, v) for k, v in st.managed.items() if v["system"]]
                cid, ident = systems[0] if len(systems) == 1 else (None, None)
        entry["caller"] = cid
        if ident is None:
            raise Refusal(400, {"error": "invalid_request", "error_description": "Identity not found"})
        tenant = ident["tenant"]
        token, lifetime = self._access_token(tenant, cid, ident["oid"], resource)
        return cid, resource, token, lifetime

    def _imds(self, query, entry):
        if self.headers.get("Metadata", "").lower() != "true":
            raise Refusal(400, {"error": "invalid_request", "error_description": "Required metadata header not specified"})
        cid, resource, token, lifetime = self._managed_token(query, entry, ("2018-02-01", "2019-08-01"))
        t = now()
        return 200, {"access_token": token, "client_id": cid, "expires_in": str(lifetime),
                     "expires_on": str(t + lifetime), "ext_expires_in": str(lifetime),
                     "not_before": str(t), "resource": resource, "token_type": "Bearer"}, {}

    def _app_service(self, query, entry):
        if self.headers.get("X-IDENTITY-HEADER") != self.state.identity_header:
            raise Refusal(401, {"statusCode": 401, "message": "X-IDENTITY-HEADER is missing or not valid"})
        cid, resource, token, lifetime = self._managed_token(query, entry, ("2019-08-01",))
        return 200, {"access_token": token, "expires_on": str(now() + lifetime), "resource": resource,
                     "token_type": "Bearer", "client_id": cid}, {}

    # ---- Key Vault --------------------------------------------------------------------------
    def _keyvault(self, method, parts, query, host, body, entry):
        st = self.state
        vault_name = host.split(".")[0]
        with st.lock:
            vault = st.vaults.get(vault_name)
        entry["vault"] = vault_name
        if vault is None:
            raise Refusal(404, {"error": {"code": "VaultNotFound", "message": f"No vault is served at host {host!r}."}})
        resource = st.args.kv_resource
        challenge = {"WWW-Authenticate": f'Bearer authorization="{self._authority()}/{vault.tenant}", resource="{resource}"'}
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            raise kv_error(401, "Unauthorized", "AKV10000: Request is missing a Bearer or PoP token.", headers=challenge)
        claims = st.keys.verify_own_jwt(auth[len("Bearer "):])
        if claims is None:
            raise kv_error(401, "Unauthorized", "AKV10032: Invalid issuer or signature.", headers=challenge)
        entry["caller"] = claims.get("appid")
        if claims.get("exp", 0) < now():
            raise kv_error(401, "Unauthorized", "AKV10022: Token is expired.", headers=challenge)
        if claims.get("aud", "").rstrip("/") != resource.rstrip("/"):
            raise kv_error(401, "Unauthorized", f"AKV10022: Invalid audience. Expected {resource}, found: {claims.get('aud')}.", headers=challenge)
        if claims.get("tid") != vault.tenant:
            raise kv_error(401, "Unauthorized", "AKV10032: Invalid issuer. Expected one of the vault's tenant.", headers=challenge)
        if "api-version" not in query:
            raise kv_error(400, "BadParameter", "The 'api-version' query parameter is missing.")
        writes = method in ("PUT", "POST", "PATCH", "DELETE")
        grant = vault.access.get(claims.get("appid"))
        if grant is None or (writes and grant != "write"):
            kind = parts[0] if parts else "secrets"
            op = "set" if writes else ("list" if (len(parts) == 1 or parts[-1] == "versions") else "get")
            raise kv_error(403, "Forbidden", f"The user, group or application 'appid={claims.get('appid')};oid={claims.get('oid')}' does not have {kind} {op} permission on key vault '{vault.name};location=westus'. For help resolving this issue, please see https://go.microsoft.com/fwlink/?linkid=2125287", inner="AccessDenied")
        base = self._base()
        if not parts or parts[0] not in ("secrets", "certificates", "keys"):
            raise kv_error(404, "NotFound", "The requested resource was not found.")
        coll = parts[0]
        store = {"secrets": vault.secrets, "certificates": vault.certificates, "keys": vault.keys}[coll]
        not_found = {"secrets": "SecretNotFound", "certificates": "CertificateNotFound", "keys": "KeyNotFound"}[coll]
        label = {"secrets": "secret", "certificates": "certificate", "keys": "key"}[coll]
        with st.lock:
            if len(parts) == 1 and method == "GET":
                items = [self._props(coll, versions[-1], base) for versions in store.values()]
                return 200, self._page(items, query, f"{base}/{coll}"), {}
            name = parts[1]
            if len(parts) == 2 and method == "PUT" and coll == "secrets":
                return 200, self._add_secret(vault, name, json.loads(body), base), {}
            if len(parts) == 3 and parts[2] == "import" and method == "POST" and coll == "certificates":
                return 200, self._import_certificate(vault, name, json.loads(body), base), {}
            if len(parts) == 3 and parts[2] == "create" and method == "POST" and coll == "keys":
                return 200, self._create_key(vault, name, json.loads(body), base), {}
            versions = store.get(name)
            if not versions:
                raise kv_error(404, not_found, f"A {label} with (name/id) {name} was not found in this key vault. If you recently deleted this {label} you may be able to recover it using the correct recovery command. For help resolving this issue, please see https://go.microsoft.com/fwlink/?linkid=2125182")
            if len(parts) == 3 and parts[2] == "versions" and method == "GET":
                items = [self._props(coll, v, base) for v in versions]
                return 200, self._page(items, query, f"{base}/{coll}/{name}/versions"), {}
            if method != "GET" or len(parts) > 3:
                raise kv_error(405, "MethodNotAllowed", "The method is not allowed on this resource.")
            version = parts[2] if len(parts) == 3 else None
            v = versions[-1] if not version else next((x for x in versions if x["version"] == version), None)
            if v is None:
                raise kv_error(404, not_found, f"A {label} with (name/id) {name}/{version} was not found in this key vault. If you recently deleted this {label} you may be able to recover it using the correct recovery command. For help resolving this issue, please see https://go.microsoft.com/fwlink/?linkid=2125182")
            bundle = self._bundle(coll, v, base)
            out_type = query.get("outContentType")
            if coll == "secrets" and out_type:
                bundle = self._convert(bundle, out_type)
            return 200, bundle, {}

    @staticmethod
    def _convert(bundle, out_type):
        """A secret in another content type (outContentType): Key Vault converts a PKCS#12
        certificate secret to PEM (private key, then the chain); nothing else converts."""
        if out_type != "application/x-pem-file" or bundle.get("contentType") not in ("application/x-pkcs12", "application/x-pem-file"):
            raise kv_error(400, "BadParameter", f"Conversion to '{out_type}' is not supported for this secret.")
        if bundle["contentType"] == "application/x-pkcs12":
            key, leaf, extra = pkcs12.load_key_and_certificates(base64.b64decode(bundle["value"]), None)
            bundle = dict(bundle, value=pem_bundle(key, [leaf] + list(extra)), contentType=out_type)
        return bundle

    @staticmethod
    def _page(items, query, link_base):
        start = int(query.get("$skiptoken") or 0)
        size = min(int(query.get("maxresults") or PAGE_SIZE), PAGE_SIZE)
        page = {"value": items[start : start + size], "nextLink": None}
        if start + size < len(items):
            q = urllib.parse.urlencode({"api-version": query["api-version"], "$skiptoken": start + size, "maxresults": size})
            page["nextLink"] = f"{link_base}?{q}"
        return page

    @staticmethod
    def _attributes(v):
        a = {"enabled": True, "created": v["created"], "updated": v["created"],
             "recoveryLevel": "Recoverable+Purgeable", "recoverableDays": 90}
        # Activation and expiry (NumericDate): set on a secret by its writer, and on a
        # certificate (and its managed secret and key) from the certificate's validity.
        for k in ("nbf", "exp"):
            if v.get(k) is not None:
                a[k] = v[k]
        return a

    def _props(self, coll, v, base):
        p = {"id": f"{base}/{coll}/{v['name']}/{v['version']}", "attributes": self._attributes(v), "tags": {}}
        if coll == "secrets":
            p["contentType"] = v.get("contentType")
            if v.get("managed"):
                p["managed"] = True
        if coll == "certificates":
            p["x5t"] = v["x5t"]
        if coll == "keys":
            p["kid"] = p.pop("id")
        return p

    def _bundle(self, coll, v, base):
        b = self._props(coll, v, base)
        if coll == "secrets":
            b["value"] = v["value"]
            if v.get("managed"):
                b["kid"] = f"{base}/keys/{v['name']}/{v['version']}"
        elif coll == "certificates":
            b.update({"kid": f"{base}/keys/{v['name']}/{v['version']}",
                      "sid": f"{base}/secrets/{v['name']}/{v['version']}",
                      "cer": v["cer"], "policy": v["policy"]})
        else:
            b["key"] = dict(v["jwk"], kid=b.pop("kid"))
        return b

    def _add_secret(self, vault, name, req, base, managed=False, version=None):
        if not isinstance(req, dict) or not isinstance(req.get("value"), str):
            raise kv_error(400, "BadParameter", "Property 'value' is required.")
        attrs = req.get("attributes") or {}
        v = {"name": name, "version": version or uuid.uuid4().hex, "value": req["value"],
             "contentType": req.get("contentType"), "created": now(), "managed": managed,
             "nbf": attrs.get("nbf"), "exp": attrs.get("exp")}
        vault.secrets.setdefault(name, []).append(v)
        return self._bundle("secrets", v, base)

    def _import_certificate(self, vault, name, req, base):
        value, pwd = req.get("value", ""), req.get("pwd") or None
        try:
            # "value" is base64 of either a PFX or a PEM text (key and certificates).
            data = value.encode() if value.lstrip().startswith("-----BEGIN") else base64.b64decode(value)
            if data.lstrip().startswith(b"-----BEGIN"):
                key = serialization.load_pem_private_key(data, pwd.encode() if pwd else None)
                chain = x509.load_pem_x509_certificates(data)
            else:
                key, leaf, extra = pkcs12.load_key_and_certificates(data, pwd.encode() if pwd else None)
                chain = [leaf] + list(extra)
        except Exception:
            raise kv_error(400, "BadParameter", "The specified PEM X.509 certificate content is in an unexpected format. Please check if certificate is in valid PEM format.")
        ctype = ((req.get("policy") or {}).get("secret_props") or {}).get("contentType") or "application/x-pkcs12"
        return self._store_certificate(vault, name, key, chain, ctype, base)

    def _store_certificate(self, vault, name, key, chain, ctype, base):
        version = uuid.uuid4().hex
        der = chain[0].public_bytes(serialization.Encoding.DER)
        validity = {"nbf": int(chain[0].not_valid_before_utc.timestamp()),
                    "exp": int(chain[0].not_valid_after_utc.timestamp())}
        secret_value = pem_bundle(key, chain) if ctype == "application/x-pem-file" else pfx_bundle(key, chain)
        self._add_secret(vault, name, {"value": secret_value, "contentType": ctype, "attributes": validity},
                         base, managed=True, version=version)
        policy = {"id": f"{base}/certificates/{name}/policy",
                  "key_props": {"exportable": True, "kty": "RSA" if isinstance(key, rsa.RSAPrivateKey) else "EC", "reuse_key": False},
                  "secret_props": {"contentType": ctype},
                  "x509_props": {"subject": chain[0].subject.rfc4514_string(), "validity_months": 12},
                  "issuer": {"name": "Unknown"}, "attributes": {"enabled": True}}
        v = {"name": name, "version": version, "created": now(), "cer": base64.b64encode(der).decode(),
             "x5t": b64url(hashlib.sha1(der).digest()), "policy": policy, **validity}
        vault.certificates.setdefault(name, []).append(v)
        vault.keys.setdefault(name, []).append({"name": name, "version": version, "created": now(),
                                                 "jwk": jwk_of(key.public_key()), **validity})
        return self._bundle("certificates", v, base)

    def _create_key(self, vault, name, req, base):
        kty = (req or {}).get("kty", "")
        if kty in ("RSA", "RSA-HSM"):
            key = rsa.generate_private_key(public_exponent=65537, key_size=int(req.get("key_size") or 2048))
        elif kty in ("EC", "EC-HSM"):
            curve = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1(), "P-521": ec.SECP521R1()}.get(req.get("crv") or "P-256")
            if curve is None:
                raise kv_error(400, "BadParameter", "The specified curve is not supported.")
            key = ec.generate_private_key(curve)
        else:
            raise kv_error(400, "BadParameter", "Property 'kty' is required and must be RSA or EC.")
        v = {"name": name, "version": uuid.uuid4().hex, "created": now(), "jwk": jwk_of(key.public_key())}
        vault.keys.setdefault(name, []).append(v)
        return self._bundle("keys", v, base)

    # ---- admin ------------------------------------------------------------------------------
    def _admin(self, method, parts, query, req):
        st = self.state
        base = "https://" + (self.headers.get("X-Vault-Host") or "localhost")
        with st.lock:
            if parts == ["tenants"] and method == "POST":
                st.tenants.add(req["tenant"])
                return 200, {}, {}
            if parts == ["apps"] and method == "POST":
                st.apps[req["clientId"]] = {"tenant": req["tenant"], "federated": req.get("federated", []),
                                            "oid": req.get("objectId") or str(uuid.uuid4())}
                return 200, {"objectId": st.apps[req["clientId"]]["oid"]}, {}
            if parts == ["managed"] and method == "POST":
                st.managed[req["clientId"]] = {"tenant": req["tenant"], "system": bool(req.get("system")),
                                               "oid": str(uuid.uuid4())}
                return 200, {}, {}
            if parts == ["vaults"] and method == "POST":
                v = st.vaults.setdefault(req["name"], Vault(req["name"], req["tenant"]))
                v.access.update(req.get("access", {}))
                return 200, {}, {}
            if len(parts) == 4 and parts[0] == "vaults" and method == "POST":
                vault = st.vaults[parts[1]]
                if parts[2] == "secrets":
                    return 200, self._add_secret(vault, parts[3], req, base), {}
                if parts[2] == "certificates":
                    key, chain = st.keys.issue_certificate(req.get("subject", parts[3]), req.get("key", "rsa"))
                    return 200, self._store_certificate(vault, parts[3], key, chain, req.get("contentType", "application/x-pkcs12"), base), {}
                if parts[2] == "keys":
                    return 200, self._create_key(vault, parts[3], req, base), {}
            if parts == ["faults"] and method == "POST":
                f = dict(req)
                if f.get("seconds"):
                    f["until"] = time.time() + f.pop("seconds")
                st.faults.append(f)
                return 200, {}, {}
            if parts == ["faults"] and method == "DELETE":
                st.faults.clear()
                return 200, {}, {}
            if parts == ["requests"] and method == "GET":
                return 200, {"requests": [dict(e) for e in st.log], "connections": st.connections}, {}
            if parts == ["requests"] and method == "DELETE":
                st.log.clear()
                return 200, {}, {}
            if parts == ["issuer-ca"] and method == "GET":
                return 200, {"pem": st.keys.issuing_ca.public_bytes(serialization.Encoding.PEM).decode()}, {}
        raise Refusal(404, {"error": f"no admin route {method} /{'/'.join(parts)}"})


def jwk_of(pub):
    if isinstance(pub, rsa.RSAPublicKey):
        n = pub.public_numbers()
        return {"kty": "RSA", "key_ops": ["encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey"],
                "n": int_b64url(n.n), "e": int_b64url(n.e)}
    n = pub.public_numbers()
    crv = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}[pub.curve.name]
    size = (pub.curve.key_size + 7) // 8
    return {"kty": "EC", "key_ops": ["sign", "verify"], "crv": crv,
            "x": b64url(n.x.to_bytes(size, "big")), "y": b64url(n.y.to_bytes(size, "big"))}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", required=True, help="where ca.pem and ready.json are written")
    ap.add_argument("--https-port", type=int, default=0)
    ap.add_argument("--http-port", type=int, default=0)
    ap.add_argument("--bind", default="127.0.0.1")
    ap.add_argument("--token-lifetime", type=int, default=3599, help="access token lifetime, seconds")
    ap.add_argument("--kv-resource", default="https://vault.azure.net")
    ap.add_argument("--authority", help="authority host named in Key Vault challenges (default: this process as https://localhost:PORT)")
    ap.add_argument("--issuer-ca", help="CA bundle trusted for https issuers' discovery and keys (default: the system's)")
    ap.add_argument("--name", action="append", default=[], help="extra DNS names for the certificate")
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    names = ["localhost", "*.vault.localhost", "*.vault.azure.net", "login.microsoftonline.com"] + args.name
    keys = Keys(args.dir, names)
    state = State(args, keys)

    class Tls(Handler):
        pass

    class Plain(Handler):
        plain_http = True

    Tls.state = Plain.state = state
    https = ThreadingHTTPServer((args.bind, args.https_port), Tls)
    https.daemon_threads = True
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(keys.cert_file)
    # The handshake happens in each connection's thread, so a client that never completes it
    # cannot stall the accept loop.
    https.socket = ctx.wrap_socket(https.socket, server_side=True, do_handshake_on_connect=False)
    http = ThreadingHTTPServer((args.bind, args.http_port), Plain)
    http.daemon_threads = True
    threading.Thread(target=http.serve_forever, daemon=True).start()
    ready = {"https_port": https.server_address[1], "http_port": http.server_address[1],
             "identity_header": state.identity_header}
    tmp = os.path.join(args.dir, "ready.json.tmp")
    with open(tmp, "w") as f:
        json.dump(ready, f)
    os.rename(tmp, os.path.join(args.dir, "ready.json"))
    try:
        https.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
