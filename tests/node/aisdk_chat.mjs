// The AI SDK's own client pieces against Threadline: DefaultChatTransport sends the chat and
// readUIMessageStream assembles the UIMessage; reconnectToStream resumes an active run.
// Prints JSON. Usage:
//   node aisdk_chat.mjs send <base-url> <token> <chat-id> <agent> <text>
//   node aisdk_chat.mjs resume <base-url> <token> <chat-id>
//   node aisdk_chat.mjs send-then-resume <base-url> <token> <chat-id> <agent> <text>
import { DefaultChatTransport, readUIMessageStream } from "ai";

const [mode, baseUrl, token, chatId, agent, text] = process.argv.slice(2);
const transport = new DefaultChatTransport({
  api: `${baseUrl}/v1/ai-sdk/chat`,
  headers: { Authorization: `Bearer ${token}` },
  body: { agent },
});

async function assemble(stream) {
  let last = null;
  for await (const message of readUIMessageStream({ stream })) last = message;
  return last;
}

const userMessage = { id: `user-${Date.now()}`, role: "user", parts: [{ type: "text", text }] };

async function send(abortSignal) {
  return transport.sendMessages({
    chatId,
    messages: [userMessage],
    trigger: "submit-message",
    messageId: undefined,
    abortSignal,
  });
}

async function resume() {
  const stream = await transport.reconnectToStream({ chatId });
  return stream === null ? null : await assemble(stream);
}

let output;
if (mode === "send") {
  output = { message: await assemble(await send(undefined)) };
} else if (mode === "resume") {
  output = { resumed: await resume() };
} else if (mode === "send-then-resume") {
  // Leave the first stream after its first part, as a reloaded page would, then resume.
  const abort = new AbortController();
  const stream = await send(abort.signal);
  const reader = stream.getReader();
  const first = await reader.read();
  abort.abort();
  await reader.cancel().catch(() => {});
  output = { first: first.value, resumed: await resume() };
} else {
  throw new Error(`unknown mode ${mode}`);
}
console.log(JSON.stringify(output));
