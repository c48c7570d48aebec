"""Live delivery, one part: `gateway` fans the bus's events out to this process's
connections, `streams` is the subscription hand-shake (ownership check, snapshot, replay, then
live) that every stream shares, `ws` is the WebSocket endpoint and `sse` the SSE one. The
protocol views (`api/protocols/`) are fed by the same `streams`."""
