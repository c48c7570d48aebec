"""Signed, expiring bearer tokens (JWT, HS256). Each carries a `jti` so it can be revoked.

A client sends the same token with every request, and PyJWT's verification of it costs far
more than the HMAC itself (it prepares and inspects the key on every call: about 6 % of the
server's CPU at 32 users running agents). So `TokenCodec` keeps the claims of the tokens it
verified, most recently used last, a bounded number of them. A token's claims are a function of
the token's text and the secret alone, so a token seen before needs only its expiry checked
again; only a token whose signature, issuer and claims were verified gets in, so nothing can be
slipped into the cache. Revocation is not a property of the token and is checked by the caller
every time (`auth/service.py`).
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import jwt

from threadline.errors import AuthError
from threadline.ids import IdPrefix, is_valid_id

_ALGORITHM = "HS256"
_ISSUER = "threadline"
VERIFIED_TOKENS_KEPT = 4096
"""Verified tokens whose claims are kept (one per signed-in client, roughly)."""


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
    def __init__(
        self,
        secret: str,
        *,
        ttl_seconds: int,
        clock: Callable[[], float] = time.time,
        kept: int = VERIFIED_TOKENS_KEPT,
    ) -> None:
        if len(secret.encode()) < 32:
            # RFC 7518 wants an HS256 key at least as long as the hash: 256 bits.
            raise ValueError("token secret must be at least 32 bytes")
        self._secret = secret
        self._ttl = ttl_seconds
        self._clock = clock
        self._kept = kept
        self._verified: OrderedDict[str, TokenClaims] = OrderedDict()

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
        claims = self._verified.get(token)
        if claims is None:
            claims = self._verify(token)
            self._verified[token] = claims
            if len(self._verified) > self._kept:
                self._verified.popitem(last=False)
        elif claims.expires_at.timestamp() <= self._clock():  # PyJWT's own test of `exp`
            del self._verified[token]
            raise _expired()
        else:
            self._verified.move_to_end(token)
        return claims

    def _verify(self, token: str) -> TokenClaims:
        try:
            payload = jwt.decode(
                token,
                self._secret,
                algorithms=[_ALGORITHM],
                issuer=_ISSUER,
                options={"require": ["sub", "jti", "exp", "iss"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise _expired() from exc
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


def _expired() -> AuthError:
    return AuthError("The token has expired; sign in again", code="token_expired")
