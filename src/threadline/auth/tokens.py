"""Signed, expiring bearer tokens (JWT, HS256). Each carries a `jti` so it can be revoked."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import jwt

from threadline.errors import AuthError
from threadline.ids import IdPrefix, is_valid_id

_ALGORITHM = "HS256"
_ISSUER = "threadline"


@dataclass(frozen=True, slots=True)
class TokenClaims:
    user_id: str
    jti: str
    expires_at: datetime
    service_key_id: str | None = None
    """Set when a service key acts for the user (`auth/service_keys.py`)."""


@dataclass(frozen=True, slots=True)
class IssuedToken:
    token: str
    claims: TokenClaims
    expires_in: int


class TokenCodec:
    def __init__(self, secret: str, *, ttl_seconds: int) -> None:
        if len(secret.encode()) < 32:
            # RFC 7518 wants an HS256 key at least as long as the hash: 256 bits.
            raise ValueError("token secret must be at least 32 bytes")
        self._secret = secret
        self._ttl = ttl_seconds

    def issue(self, user_id: str, *, now: datetime | None = None) -> IssuedToken:
        now = now or datetime.now(UTC)
        expires_at = now + timedelta(seconds=self._ttl)
        claims = TokenClaims(user_id=user_id, jti=secrets.token_urlsafe(16), expires_at=expires_at)
        payload = {
            "sub": user_id,
            "jti": claims.jti,
            "iss": _ISSUER,
            "iat": int(now.timestamp()),
            "exp": int(expires_at.timestamp()),
        }
        token = jwt.encode(payload, self._secret, algorithm=_ALGORITHM)
        return IssuedToken(token=token, claims=claims, expires_in=self._ttl)

    def decode(self, token: str) -> TokenClaims:
        """Verify signature, issuer and expiry; each failure has its own error code."""
        try:
            payload = jwt.decode(
                token,
                self._secret,
                algorithms=[_ALGORITHM],
                issuer=_ISSUER,
                options={"require": ["sub", "jti", "exp", "iss"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise AuthError("The token has expired; sign in again", code="token_expired") from exc
        except jwt.InvalidTokenError as exc:
            raise AuthError("The token is invalid", code="token_invalid") from exc
        user_id, jti = payload["sub"], payload["jti"]
        if not is_valid_id(user_id, IdPrefix.USER) or not isinstance(jti, str):
            raise AuthError("The token is invalid", code="token_invalid")
        try:
            expires_at = datetime.fromtimestamp(payload["exp"], UTC)
        except (OverflowError, ValueError, OSError, TypeError) as exc:
            # Signed, but with an expiry no clock can hold (say 10**30): not a token we issued.
            raise AuthError("The token is invalid", code="token_invalid") from exc
        return TokenClaims(user_id=user_id, jti=jti, expires_at=expires_at)
