"""Threadline: a self-hosted backend for multi-user AI agent chat."""

from threadline.api.app import create_app
from threadline.settings import Settings

__all__ = ["Settings", "create_app"]
