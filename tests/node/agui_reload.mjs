// A reloaded AG-UI client catches up: an unmodified HttpAgent whose `connect` (the
// AbstractAgent hook that `connectAgent` calls) reads Threadline's thread replay, as
// docs/protocols.md shows. It remembers the last `metadata.threadline_seq` it saw and, on the
// second connect, resumes after it with Last-Event-ID. Prints JSON.
// Usage: node agui_reload.mjs <base-url> <token> <thread-id> [after-seq]
import { HttpAgent, runHttpRequest, transformHttpEventStream } from "@ag-ui/client";

const [baseUrl, token, threadId, after] = process.argv.slice(2);

class ThreadlineAgent extends HttpAgent {
  lastSeq = after ? Number(after) : undefined;

  connect() {
    const url = `${baseUrl}/v1/agui/threads/${encodeURIComponent(this.threadId)}/events?follow=false`;
    const headers = { ...this.headers, Accept: "text/event-stream" };
    if (this.lastSeq !== undefined) headers["Last-Event-ID"] = String(this.lastSeq);
    return transformHttpEventStream(
      runHttpRequest(() => fetch(url, { headers, signal: this.abortController.signal })),
    );
  }
}

const agent = new ThreadlineAgent({
  url: `${baseUrl}/v1/agui/demo`,
  headers: { Authorization: `Bearer ${token}` },
  threadId,
});
const seen = [];
const subscriber = {
  onEvent: ({ event }) => {
    seen.push(event.type);
    const seq = event.metadata?.threadline_seq;
    if (typeof seq === "number") agent.lastSeq = seq;
  },
};
await agent.connectAgent({}, subscriber);
console.log(JSON.stringify({ messages: agent.messages, lastSeq: agent.lastSeq, events: seen }));
