"""Sign-in with an external OIDC provider's tokens: verification against the issuer's published
keys, and the user behind each issuer and subject, created on first use.

Model and invariants:
- A token is routed here when its (unverified) `iss` is not Threadline's own; it must then be
  from a configured issuer, signed with an algorithm that issuer allows (asymmetric only, so
  `none` and HS256 "signed" with the public key are refused before any key is looked at), by a
  key of the issuer's key set, for one of its audiences, unexpired.
- Key sets are fetched with httpx off the request path's critical section: one fetch at a time
  per issuer (others wait for it), each with a deadline. A token naming an unknown `kid`
  refetches at most once per `jwks_min_refresh_seconds` (key rotation works; forged kids cannot
  make us hammer the issuer).
- The same issuer and subject are the same user forever: `external_identities` has them as its
  primary key, and the first sign-in inserts the user and the identity in one transaction;
  whichever process loses that race rolls back and reads the winner's user.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

import httpx
import jwt
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from threadline.auth.issuers import TrustedIssuer
from threadline.auth.service import normalize_email
from threadline.auth.tokens import TokenClaims
from threadline.errors import AuthError, InvalidInputError, ThreadlineError
from threadline.plans import PlanBook
from threadline.store.accounts import AccountStore
from threadline.store.db import read_transaction

logger = logging.getLogger(__name__)
LOCAL_ISSUER = "threadline"  # the `iss` of tokens Threadline issues itself (auth/tokens.py)
_MAX_SUBJECT_CHARS = 255


class IdentityProviderUnavailableError(ThreadlineError):
    """The issuer's keys could not be fetched; the client may retry."""

    code = "identity_provider_unavailable"
    http_status = 503

    def __init__(self, issuer: str, reason: str) -> None:
        super().__init__(f"Cannot fetch the signing keys of {issuer}: {reason}")
        self.issuer = issuer


class JWKSCache:
    """The key set of one issuer, fetched when first needed and on unknown key ids."""

    def __init__(
        self,
        issuer: TrustedIssuer,
        http: httpx.AsyncClient,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._issuer = issuer
        self._http = http
        self._clock = clock
        self._keys: dict[str | None, jwt.PyJWK] = {}
        self._fetched_at: float | None = None
        self._lock = asyncio.Lock()

    async def load(self) -> None:
        """Fetch the key set now (a process may warm its cache before taking traffic)."""
        async with self._lock:
            await self._refresh()

    async def key(self, kid: str | None) -> jwt.PyJWK:
        found = self._lookup(kid)
        if found is not None and not self._stale():
            return found
        async with self._lock:
            found = self._lookup(kid)
            if found is not None and not self._stale():
                return found  # fetched by the request we waited for
            if found is None and not self._may_refresh():
                raise AuthError("The token is signed by an unknown key", code="token_unknown_key")
            await self._refresh()
        found = self._lookup(kid)
        if found is None:
            raise AuthError("The token is signed by an unknown key", code="token_unknown_key")
        return found

    def _lookup(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))  # a single unnamed key may sign without kid
        return self._keys.get(kid)

    def _stale(self) -> bool:
        return self._fetched_at is None or (
            self._clock() - self._fetched_at >= self._issuer.jwks_cache_seconds
        )

    def _may_refresh(self) -> bool:
        return self._fetched_at is None or (
            self._clock() - self._fetched_at >= self._issuer.jwks_min_refresh_seconds
        )

    async def _refresh(self) -> None:
        try:
            async with asyncio.timeout(self._issuer.http_timeout_seconds):
                url = self._issuer.jwks_url or await self._discover()
                document = await self._get_json(url)
            key_set = jwt.PyJWKSet.from_dict(document)
        except (httpx.HTTPError, TimeoutError, ValueError, jwt.PyJWTError) as exc:
            if self._keys:  # keep the old keys: an outage of the issuer is not a key rotation
                logger.warning("Refreshing the keys of %s failed: %s", self._issuer.issuer, exc)
                self._fetched_at = self._clock()
                return
            raise IdentityProviderUnavailableError(self._issuer.issuer, str(exc)) from exc
        self._keys = {key.key_id: key for key in key_set.keys}
        self._fetched_at = self._clock()

    async def _discover(self) -> str:
        document = await self._get_json(self._issuer.discovery_url)
        url = document.get("jwks_uri")
        if not isinstance(url, str):
            raise ValueError("the discovery document has no jwks_uri")
        return url

    async def _get_json(self, url: str) -> dict[str, object]:
        response = await self._http.get(url, timeout=self._issuer.http_timeout_seconds)
        response.raise_for_status()
        document = response.json()
        if not isinstance(document, dict):
            raise ValueError(f"{url} did not return a JSON object")
        return document


class ExternalIdentity:
    """Verifies external tokens and maps them to Threadline users."""

    def __init__(
        self,
        issuers: list[TrustedIssuer],
        *,
        engine: AsyncEngine,
        accounts: AccountStore,
        plans: PlanBook,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self._http = http or httpx.AsyncClient(follow_redirects=False)
        self._issuers = {issuer.issuer: issuer for issuer in issuers}
        self._caches = {
            name: JWKSCache(issuer, self._http) for name, issuer in self._issuers.items()
        }
        self._engine = engine
        self._accounts = accounts
        self._plans = plans

    def cache(self, issuer: str) -> JWKSCache:
        return self._caches[issuer]

    async def aclose(self) -> None:
        await self._http.aclose()

    @staticmethod
    def is_external(token: str) -> bool:
        """Whether the token claims an issuer other than Threadline itself (unverified)."""
        try:
            payload = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            return False
        return payload.get("iss") != LOCAL_ISSUER

    async def validate(self, token: str) -> TokenClaims:
        issuer, payload = await self._verify(token)
        subject = payload.get(issuer.user_claim)
        if not isinstance(subject, str) or not subject or len(subject) > _MAX_SUBJECT_CHARS:
            raise AuthError(
                f"The token has no usable {issuer.user_claim!r} claim", code="token_invalid"
            )
        user_id = await self._user_for(issuer, subject, payload)
        jti = payload.get("jti")
        if not isinstance(jti, str) or not jti or len(jti) > 64:
            # Revocation (sign-out) needs an id; a token without one is known by its hash.
            jti = "sha256:" + hashlib.sha256(token.encode()).hexdigest()[:48]
        exp = payload["exp"]
        try:
            if not isinstance(exp, int | float):
                raise TypeError("exp is not a number")
            expires_at = datetime.fromtimestamp(exp, UTC)
        except (OverflowError, ValueError, OSError, TypeError) as exc:
            raise AuthError("The token is invalid", code="token_invalid") from exc
        return TokenClaims(user_id=user_id, jti=jti, expires_at=expires_at)

    async def _verify(self, token: str) -> tuple[TrustedIssuer, dict[str, object]]:
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise AuthError("The token is invalid", code="token_invalid") from exc
        issuer = self._issuers.get(str(unverified.get("iss")))
        if issuer is None:
            raise AuthError("The token's issuer is not trusted", code="token_wrong_issuer")
        algorithm = header.get("alg")
        if algorithm not in issuer.algorithms:
            raise AuthError(
                f"Tokens of this issuer must be signed with {', '.join(issuer.algorithms)}",
                code="token_algorithm_not_allowed",
            )
        kid = header.get("kid")
        key = await self._caches[issuer.issuer].key(kid if isinstance(kid, str) else None)
        if key.algorithm_name != algorithm:
            raise AuthError("The token's algorithm does not fit its key", code="token_invalid")
        return issuer, self._decode(token, key, issuer, str(algorithm))

    @staticmethod
    def _decode(
        token: str, key: jwt.PyJWK, issuer: TrustedIssuer, algorithm: str
    ) -> dict[str, object]:
        try:
            payload: dict[str, object] = jwt.decode(
                token,
                key.key,
                algorithms=[algorithm],
                audience=issuer.audiences,
                issuer=issuer.issuer,
                leeway=issuer.leeway_seconds,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise AuthError("The token has expired; sign in again", code="token_expired") from exc
        except jwt.InvalidAudienceError as exc:
            raise AuthError(
                "The token is not meant for this API (audience)", code="token_wrong_audience"
            ) from exc
        except jwt.InvalidIssuerError as exc:
            raise AuthError("The token's issuer is not trusted", code="token_wrong_issuer") from exc
        except jwt.PyJWTError as exc:
            raise AuthError("The token is invalid", code="token_invalid") from exc
        return payload

    async def _user_for(
        self, issuer: TrustedIssuer, subject: str, payload: dict[str, object]
    ) -> str:
        plan = self._claimed_plan(issuer, payload)
        async with read_transaction(self._engine) as conn:
            found = await self._accounts.find_external(conn, issuer=issuer.issuer, subject=subject)
        if found is None:
            return await self._provision(issuer, subject, payload, plan)
        user_id, stored_plan = found
        if plan is not None and plan != stored_plan:
            async with self._engine.begin() as conn:
                await self._accounts.set_plan(conn, user_id, plan)
        return user_id

    async def _provision(
        self,
        issuer: TrustedIssuer,
        subject: str,
        payload: dict[str, object],
        plan: str | None,
    ) -> str:
        email = _claimed_email(issuer, payload)
        try:
            async with self._engine.begin() as conn:
                user_id = await self._accounts.provision_external(
                    conn, issuer=issuer.issuer, subject=subject, email=email, plan=plan
                )
            logger.info("Provisioned user %s for a new subject of %s", user_id, issuer.issuer)
            return user_id
        except IntegrityError:
            pass  # another request or process provisioned this identity first
        async with read_transaction(self._engine) as conn:
            found = await self._accounts.find_external(conn, issuer=issuer.issuer, subject=subject)
        if found is None:  # pragma: no cover - the conflicting row is committed by now
            raise AuthError("Signing in failed; try again", code="token_invalid")
        return found[0]

    def _claimed_plan(self, issuer: TrustedIssuer, payload: dict[str, object]) -> str | None:
        if issuer.plan_claim is None:
            return None
        plan = payload.get(issuer.plan_claim)
        if not isinstance(plan, str):
            return None
        if not self._plans.knows(plan):
            logger.warning("Ignoring unknown plan %r claimed by a token of %s", plan, issuer.issuer)
            return None
        return plan


def _claimed_email(issuer: TrustedIssuer, payload: dict[str, object]) -> str | None:
    if issuer.email_claim is None:
        return None
    email = payload.get(issuer.email_claim)
    if not isinstance(email, str):
        return None
    try:
        return normalize_email(email)
    except InvalidInputError:
        return None
