"""The trusted external identity providers (OIDC issuers), as configured in the settings."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

AsymmetricAlgorithm = Literal["RS256", "ES256", "EdDSA"]
_RS256: list[AsymmetricAlgorithm] = ["RS256"]


class TrustedIssuer(BaseModel):
    """One OIDC issuer whose access or ID tokens sign users in (`THREADLINE_OIDC_ISSUERS`, a
    JSON list of these)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    issuer: str
    """Exactly the token's `iss` (for example `https://tenant.eu.auth0.com/`)."""
    audience: str | list[str]
    """The token's `aud` must name (one of) these: the API identifier or client id."""
    jwks_url: str | None = None
    """Where the signing keys are; when unset, read from the issuer's OIDC discovery document
    (`<issuer>/.well-known/openid-configuration`)."""
    algorithms: list[AsymmetricAlgorithm] = Field(default_factory=lambda: list(_RS256))
    """Accepted signature algorithms. Asymmetric only: a shared-secret algorithm would let
    anyone holding the public key forge tokens."""
    user_claim: str = "sub"
    """The claim that names the user; the same issuer and value are the same user forever."""
    email_claim: str | None = None
    """A claim holding the user's email, stored on first sign-in (for example `email`)."""
    plan_claim: str | None = None
    """A claim naming the user's plan (one of `THREADLINE_PLANS`), applied on every sign-in."""
    leeway_seconds: int = Field(default=30, ge=0, le=600)
    """Clock skew tolerated on `exp`, `nbf` and `iat`."""
    http_timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    """Deadline of each fetch of the discovery document or the key set."""
    jwks_cache_seconds: float = Field(default=3600.0, ge=1)
    """How long a fetched key set is used before it is fetched again."""
    jwks_min_refresh_seconds: float = Field(default=30.0, ge=0)
    """Least time between two fetches caused by unknown key ids: forged `kid`s cannot make
    Threadline hammer the issuer."""

    @field_validator("algorithms")
    @classmethod
    def _some_algorithm(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one algorithm is needed")
        return value

    @property
    def audiences(self) -> list[str]:
        return [self.audience] if isinstance(self.audience, str) else list(self.audience)

    @property
    def discovery_url(self) -> str:
        return self.issuer.rstrip("/") + "/.well-known/openid-configuration"
