"""Front-end protocols as views of a thread's event log: AG-UI (`agui`) and the AI SDK UI
message stream (`aisdk`). Each adapter is a pure translator from Threadline's wire events (the
envelope of docs/events.md) to the protocol's events; it does no I/O and imports no FastAPI.
The routes feed them from the same subscription as the WebSocket and SSE (`api/live/streams.py`).
"""
