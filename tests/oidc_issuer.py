"""A loopback OIDC issuer for tests: keys generated here (RSA, EC P-256, Ed25519), a discovery
document and a JWKS served over real HTTP, tokens signed like a provider signs them, key
rotation, and forgeries (`none`, HS256 keyed with the public key)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

AUDIENCE = "threadline-api"


@dataclass
class SigningKey:
    kid: str
    alg: str
    private: Any

    def public_jwk(self) -> dict[str, Any]:
        public = self.private.public_key()
        exporter = {"RS256": RSAAlgorithm, "ES256": ECAlgorithm, "EdDSA": OKPAlgorithm}[self.alg]
        jwk: dict[str, Any] = exporter.to_jwk(public, as_dict=True)
        return {**jwk, "kid": self.kid, "alg": self.alg, "use": "sig"}

    def public_pem(self) -> bytes:
        return bytes(
            self.private.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )


def new_key(alg: str = "RS256") -> SigningKey:
    if alg == "RS256":
        private: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif alg == "ES256":
        private = ec.generate_private_key(ec.SECP256R1())
    else:
        private = ed25519.Ed25519PrivateKey.generate()
    return SigningKey(kid=f"{alg.lower()}-{uuid.uuid4().hex[:8]}", alg=alg, private=private)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class LoopbackIssuer:
    url: str = ""
    keys: list[SigningKey] = field(default_factory=list)
    jwks_requests: int = 0

    @property
    def issuer(self) -> str:
        return self.url

    def settings(self, **overrides: Any) -> dict[str, Any]:
        """One entry of THREADLINE_OIDC_ISSUERS for this issuer (discovery, no JWKS URL)."""
        return {
            "issuer": self.issuer,
            "audience": AUDIENCE,
            "algorithms": ["RS256", "ES256", "EdDSA"],
            "email_claim": "email",
            "plan_claim": "plan",
            **overrides,
        }

    def claims(self, subject: str, **extra: Any) -> dict[str, Any]:
        now = int(time.time())
        return {
            "iss": self.issuer,
            "sub": subject,
            "aud": AUDIENCE,
            "iat": now,
            "exp": now + 300,
            "jti": uuid.uuid4().hex,
            **extra,
        }

    def token(self, subject: str, *, key: SigningKey | None = None, **extra: Any) -> str:
        key = key or self.keys[0]
        return jwt.encode(
            self.claims(subject, **extra), key.private, algorithm=key.alg, headers={"kid": key.kid}
        )

    def forged_none(self, subject: str) -> str:
        header = _b64(json.dumps({"alg": "none", "typ": "JWT", "kid": self.keys[0].kid}).encode())
        body = _b64(json.dumps(self.claims(subject)).encode())
        return f"{header}.{body}."

    def forged_hs256_with_public_key(self, subject: str) -> str:
        """The classic key-confusion forgery: HMAC keyed with the issuer's public PEM."""
        key = self.keys[0]
        header = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": key.kid}).encode())
        body = _b64(json.dumps(self.claims(subject)).encode())
        signature = hmac.new(key.public_pem(), f"{header}.{body}".encode(), hashlib.sha256)
        return f"{header}.{body}.{_b64(signature.digest())}"

    def rotate(self, alg: str = "RS256") -> SigningKey:
        """Publish a new key in place of every old one."""
        key = new_key(alg)
        self.keys = [key]
        return key

    def jwks(self) -> dict[str, Any]:
        return {"keys": [key.public_jwk() for key in self.keys]}


def _handler(issuer: LoopbackIssuer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            if self.path == "/.well-known/openid-configuration":
                body = {"issuer": issuer.issuer, "jwks_uri": f"{issuer.url}/jwks"}
            elif self.path == "/jwks":
                issuer.jwks_requests += 1
                body = issuer.jwks()
            else:
                self.send_error(404)
                return
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

    return Handler


@contextmanager
def loopback_issuer(*algorithms: str) -> Iterator[LoopbackIssuer]:
    issuer = LoopbackIssuer(keys=[new_key(alg) for alg in (algorithms or ("RS256",))])
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(issuer))
    issuer.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield issuer
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
