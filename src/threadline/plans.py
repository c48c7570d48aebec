"""Plans: named sets of per-user limits, configured in the settings (`THREADLINE_PLANS`).

A user's plan is the one the admin CLI set (`threadline admin users set-plan`) or the one the
identity token's plan claim names (kept on the user, so it applies to every request of theirs).
A user with no plan gets `default_plan` when that is set, else the deployment-wide limits
(`messages_per_minute`, `max_active_runs_per_user`, no token or thread limit): nothing changes
for a deployment that configures no plans.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field


class PlanLimits(BaseModel):
    """The limits of one plan. `None` means unlimited."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    messages_per_minute: int = Field(ge=1)
    """Messages the user may post per minute (HTTP and WebSocket together)."""
    concurrent_runs: int = Field(ge=1)
    """Runs of the user executing at once; more wait in the queue (the deployment's
    `max_concurrent_runs_per_user` is the ceiling)."""
    active_runs: int = Field(ge=1)
    """Queued plus running runs; beyond it a new run is refused."""
    tokens_per_day: int | None = Field(default=None, ge=1)
    """Model tokens (input plus output) per UTC day; a run that crosses it stops."""
    max_threads: int | None = Field(default=None, ge=1)
    """Threads the user may have (archived ones count, deleted ones do not)."""


DEFAULT_PLANS: dict[str, PlanLimits] = {
    "free": PlanLimits(
        messages_per_minute=10,
        concurrent_runs=1,
        active_runs=2,
        tokens_per_day=50_000,
        max_threads=20,
    ),
    "pro": PlanLimits(
        messages_per_minute=60,
        concurrent_runs=4,
        active_runs=20,
        tokens_per_day=2_000_000,
        max_threads=1_000,
    ),
    "enterprise": PlanLimits(messages_per_minute=600, concurrent_runs=16, active_runs=200),
}


@dataclass(frozen=True, slots=True)
class UserPlan:
    name: str | None
    """None: the user is on no plan (the deployment-wide limits apply)."""
    limits: PlanLimits


class PlanBook:
    """Resolves a user's stored plan name to its limits."""

    def __init__(
        self, plans: dict[str, PlanLimits], *, default_plan: str | None, fallback: PlanLimits
    ) -> None:
        if default_plan is not None and default_plan not in plans:
            raise ValueError(f"default plan {default_plan!r} is not one of the plans")
        self._plans = dict(plans)
        self._default = default_plan
        self._fallback = fallback

    @property
    def names(self) -> list[str]:
        return sorted(self._plans)

    def knows(self, name: str) -> bool:
        return name in self._plans

    def resolve(self, name: str | None) -> UserPlan:
        """The plan of a user whose stored plan is `name` (an unknown name, say a plan removed
        from the settings, falls back like no plan)."""
        if name is not None and name in self._plans:
            return UserPlan(name, self._plans[name])
        if self._default is not None:
            return UserPlan(self._default, self._plans[self._default])
        return UserPlan(None, self._fallback)
