"""The auth service: create users, authenticate them, validate and revoke their tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from threadline.auth.emails import EMAIL
from threadline.auth.passwords import Passwords
from threadline.auth.revocation import RevocationList
from threadline.auth.tokens import IssuedToken, TokenClaims, TokenCodec
from threadline.context import UserContext
from threadline.errors import AuthError, ConflictError, ForbiddenError, InvalidInputError
from threadline.store.accounts import AccountState, AccountStore, Standing
from threadline.store.db import ping, read_transaction
from threadline.store.users import User, UserStore

if TYPE_CHECKING:
    from threadline.auth.oidc import ExternalIdentity
    from threadline.auth.service_keys import ServiceKeyAuth

_SERVICE_KEY_START = "key_"  # auth/service_keys.py: a key is `key_<ulid>.<secret>`
MIN_PASSWORD_CHARS = 8
MAX_PASSWORD_CHARS = 256


def normalize_email(email: str) -> str:
    normalized = email.strip().lower()
    if len(normalized) > 320 or "\x00" in normalized or not EMAIL.match(normalized):
        raise InvalidInputError("Not a valid email address", code="invalid_email", field="email")
    return normalized


def check_password(password: str) -> str:
    if not MIN_PASSWORD_CHARS <= len(password) <= MAX_PASSWORD_CHARS:
        raise InvalidInputError(
            f"The password must be {MIN_PASSWORD_CHARS} to {MAX_PASSWORD_CHARS} characters",
            code="invalid_password",
            field="password",
        )
    return password


@dataclass(frozen=True, slots=True)
class AuthHealth:
    database: bool
    revocations: bool


class AuthService:
    def __init__(
        self,
        *,
        engine: AsyncEngine,
        users: UserStore,
        passwords: Passwords,
        tokens: TokenCodec,
        revocations: RevocationList,
        external: ExternalIdentity | None = None,
        service_keys: ServiceKeyAuth | None = None,
        password_auth: bool = True,
    ) -> None:
        self._engine = engine
        self._users = users
        self._accounts = AccountStore()
        self._passwords = passwords
        self._tokens = tokens
        self._revocations = revocations
        self._external = external
        self._service_keys = service_keys
        self._password_auth = password_auth

    def _check_password_auth(self) -> None:
        if not self._password_auth:
            raise ForbiddenError(
                "Password sign-in is turned off; sign in with your identity provider",
                code="password_auth_disabled",
            )

    async def register(self, *, email: str, password: str) -> User:
        self._check_password_auth()
        email = normalize_email(email)
        password_hash = await self._passwords.hash(check_password(password))
        async with self._engine.begin() as conn:
            return await self._users.create(conn, email=email, password_hash=password_hash)

    async def authenticate(self, *, email: str, password: str) -> IssuedToken:
        """Issue a token. An unknown email and a wrong password fail with different codes,
        as the API promises; both take the same time (one argon2 verification)."""
        self._check_password_auth()
        try:
            email = normalize_email(email)
        except InvalidInputError:
            email = ""  # cannot have an account; still verify once below, for even timing
        async with read_transaction(self._engine) as conn:
            found = await self._users.find_credentials(conn, email=email) if email else None
        valid = await self._passwords.verify(found.password_hash if found else None, password)
        if found is None:
            raise AuthError("No account with this email", code="unknown_user")
        if not valid:
            raise AuthError("Wrong password", code="wrong_password")
        return self._tokens.issue(found.user.id)

    async def validate(self, token: str, *, act_as: str | None = None) -> TokenClaims:
        """The token's claims, once its signature, expiry, revocation and its user's account
        are checked (`verify`, then `check_account` in a read transaction of its own)."""
        claims = await self.verify(token, act_as=act_as)
        async with read_transaction(self._engine) as conn:
            await self.check_account(conn, claims)
        return claims

    async def verify(self, token: str, *, act_as: str | None = None) -> TokenClaims:
        """The token's own checks (signature, expiry, issuer) and, with Redis, its revocation;
        not yet its account, nor a revocation list kept in the database: `check_account` reads
        those in the transaction the request uses anyway. (A Redis lookup is done here, before
        any database connection is taken, so a slow Redis holds none.)

        The token is Threadline's own, an external issuer's (`auth/oidc.py`), or a service
        key acting for the user `act_as` (`auth/service_keys.py`, which checks the key and
        the user it acts for at once)."""
        if token.startswith(_SERVICE_KEY_START) and self._service_keys is not None:
            return await self._service_keys.validate(token, act_as=act_as)
        if act_as is not None:
            raise ForbiddenError(
                "Only a service key may act for another user", code="act_as_not_allowed"
            )
        if self._external is not None and self._external.is_external(token):
            claims = await self._external.validate(token)
        else:
            claims = self._tokens.decode(token)
        if not self._revocations.in_database:
            await self._check_not_revoked(claims)
        return claims

    async def _check_not_revoked(
        self, claims: TokenClaims, conn: AsyncConnection | None = None
    ) -> None:
        if await self._revocations.is_revoked(claims.jti, conn=conn):
            raise AuthError("The token was revoked (signed out)", code="token_revoked")

    async def check_account(
        self, conn: AsyncConnection, claims: TokenClaims, *, lock: bool = False
    ) -> Standing:
        """Within `conn`'s transaction: the token is not revoked (a list kept in the database;
        `verify` checked one in Redis) and its account exists and is enabled. Returns the
        account's standing (`lock`: under the user's row lock). A well-signed token of an
        account that no longer exists (the database was reset, the signing key kept) is
        `token_user_not_found`, on every endpoint."""
        if claims.service_key_id is None and self._revocations.in_database:
            await self._check_not_revoked(claims, conn)
        standing = await self._accounts.standing(conn, claims.user_id, lock=lock)
        if standing.state is AccountState.MISSING:
            raise AuthError(
                "The token's account does not exist (any more); sign up or sign in again",
                code="token_user_not_found",
            )
        if standing.state is AccountState.DISABLED:
            raise ForbiddenError("The account is disabled", code="user_disabled")
        return standing

    async def logout(self, claims: TokenClaims) -> None:
        if claims.service_key_id is not None:
            raise ConflictError(
                "A service key is not signed out; revoke it with `threadline admin keys revoke`",
                code="service_key_logout",
            )
        await self._revocations.revoke(claims.jti, expires_at=claims.expires_at)

    async def me(self, ctx: UserContext) -> User:
        async with read_transaction(self._engine) as conn:
            return await self._users.get(conn, ctx)

    async def health(self) -> AuthHealth:
        database = revocations = True
        try:
            await ping(self._engine)
        except Exception:
            database = False
        try:
            await self._revocations.is_revoked("health-check")
        except Exception:
            revocations = False
        return AuthHealth(database=database, revocations=revocations)
