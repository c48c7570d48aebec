"""The configured model providers, and how an agent's model string picks one.

A model string is `"<provider>:<model>"`, e.g. `"openai:gpt-4o-mini"` or
`"anthropic:claude-sonnet-4-6"`. The demo provider also answers to a bare `"demo"`, so the
smallest example agent needs no key at all.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AsyncExitStack
from types import MappingProxyType
from typing import Protocol, runtime_checkable

from threadline.errors import ThreadlineError
from threadline.llm.types import ModelProvider

DEMO = "demo"
OPENAI = "openai"
ANTHROPIC = "anthropic"

# The setting that turns each vendor on, named in errors so the fix is one line away.
_KEY_SETTINGS = {OPENAI: "OPENAI_API_KEY", ANTHROPIC: "ANTHROPIC_API_KEY"}


class UnknownModelError(ThreadlineError):
    """An agent names a model whose provider is unknown or not configured."""

    code = "unknown_model"

    def __init__(self, message: str, *, model: str) -> None:
        super().__init__(message)
        self.model = model


@runtime_checkable
class _Closable(Protocol):
    async def aclose(self) -> None: ...


class ProviderSet:
    """Providers by name, resolving model strings to a provider and the vendor's model name."""

    def __init__(self, providers: Mapping[str, ModelProvider]) -> None:
        self._providers = MappingProxyType(dict(providers))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._providers))

    def resolve(self, model: str) -> tuple[ModelProvider, str]:
        """Split `"<provider>:<model>"` and find the provider.

        Raises:
            UnknownModelError: the string has no provider prefix, or names a provider that is
                not configured; the message says which setting to add.
        """
        prefix, separator, model_name = model.partition(":")
        if prefix == DEMO:
            return self._provider(DEMO, model), model_name or DEMO
        if not separator or not prefix or not model_name:
            raise UnknownModelError(
                f"Model {model!r} must be written as '<provider>:<model>', "
                "e.g. 'openai:gpt-4o-mini' or 'anthropic:claude-sonnet-4-6'",
                model=model,
            )
        return self._provider(prefix, model), model_name

    async def aclose(self) -> None:
        """Close every provider that holds connections, even if one of them fails to close."""
        async with AsyncExitStack() as stack:
            for provider in self._providers.values():
                if isinstance(provider, _Closable):
                    stack.push_async_callback(provider.aclose)

    def _provider(self, name: str, model: str) -> ModelProvider:
        provider = self._providers.get(name)
        if provider is not None:
            return provider
        setting = _KEY_SETTINGS.get(name)
        if setting is not None:
            message = (
                f"Model {model!r} needs the {name} provider, which is not configured: set {setting}"
            )
        else:
            configured = ", ".join(self.names) or "none"
            message = (
                f"Model {model!r} names an unknown provider {name!r} (configured: {configured})"
            )
        raise UnknownModelError(message, model=model)


def build_providers(
    *,
    openai_api_key: str | None,
    openai_base_url: str | None,
    anthropic_api_key: str | None,
    anthropic_base_url: str | None,
    demo: ModelProvider,
) -> ProviderSet:
    """Build the providers whose credentials are given; the demo provider is always there."""
    # The SDKs are imported only when configured: together they add ~50 MB to every process.
    providers: dict[str, ModelProvider] = {DEMO: demo}
    if openai_api_key:
        from threadline.llm.openai import OpenAIProvider

        providers[OPENAI] = OpenAIProvider(openai_api_key, base_url=openai_base_url)
    if anthropic_api_key:
        from threadline.llm.anthropic import AnthropicProvider

        providers[ANTHROPIC] = AnthropicProvider(anthropic_api_key, base_url=anthropic_base_url)
    return ProviderSet(providers)
