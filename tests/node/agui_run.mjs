// Two AG-UI runs on one thread with the unmodified @ag-ui/client HttpAgent, as its
// documentation shows. Prints JSON: the agent's messages after each run and the event types.
// Usage: node agui_run.mjs <base-url> <token> <thread-id> <agent>
import { HttpAgent } from "@ag-ui/client";

const [baseUrl, token, threadId, agentName] = process.argv.slice(2);
const agent = new HttpAgent({
  url: `${baseUrl}/v1/agui/${agentName}`,
  headers: { Authorization: `Bearer ${token}` },
  threadId,
});

const events = [];
const subscriber = { onEvent: ({ event }) => { events.push(event.type); } };
const runs = [];
for (const [id, content] of [["user-1", "What is 12*7?"], ["user-2", "And what is 5*5?"]]) {
  agent.addMessage({ id, role: "user", content });
  const { newMessages } = await agent.runAgent({}, subscriber);
  runs.push({
    newMessages: newMessages.map((m) => m.id),
    messages: structuredClone(agent.messages),
  });
}
console.log(JSON.stringify({ runs, events }));
