"""`threadline chat`: a terminal client that shows an agent's steps live (rich)."""

from threadline.chat._session import run_chat

__all__ = ["run_chat"]
