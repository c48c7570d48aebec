"""The auth service: create users, authenticate them, validate and revoke their tokens."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine

from threadline.auth.emails import EMAIL
from threadline.auth.passwords import Passwords
from threadline.auth.revocation import RevocationList
from threadline.auth.tokens import IssuedToken, TokenClaims, TokenCodec
from threadline.context import UserContext
from threadline.errors import AuthError, InvalidInputError
from threadline.store.db import ping, read_transaction
from threadline.store.users import User, UserStore

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
    ) -> None:
        self._engine = engine
        self._users = users
        self._passwords = passwords
        self._tokens = tokens
        self._revocations = revocations

    async def register(self, *, email: str, password: str) -> User:
        email = normalize_email(email)
        password_hash = await self._passwords.hash(check_password(password))
        async with self._engine.begin() as conn:
            return await self._users.create(conn, email=email, password_hash=password_hash)

    async def authenticate(self, *, email: str, password: str) -> IssuedToken:
        """Issue a token. An unknown email and a wrong password fail with different codes,
        as the API promises; both take the same time (one argon2 verification)."""
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

    async def validate(self, token: str) -> TokenClaims:
        """The token's claims, once its signature, expiry, revocation and its user's account
        are checked. A well-signed token of an account that no longer exists (the database
        was reset, the signing key kept) is `token_user_not_found`, on every endpoint."""
        claims = self._tokens.decode(token)
        if await self._revocations.is_revoked(claims.jti):
            raise AuthError("The token was revoked (signed out)", code="token_revoked")
        async with read_transaction(self._engine) as conn:
            known = await self._users.exists(conn, claims.user_id)
        if not known:
            raise AuthError(
                "The token's account does not exist (any more); sign up or sign in again",
                code="token_user_not_found",
            )
        return claims

    async def logout(self, claims: TokenClaims) -> None:
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
