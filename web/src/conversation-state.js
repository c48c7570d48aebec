// What one open conversation shows, as a reducer over its history pages and live events, and
// the timeline derived from it. Every step is idempotent (messages by id, tool results by call
// id), so a replay after a reconnect, or a history page overlapping live events, changes
// nothing that is already there.

export const TERMINAL_FAILURES = new Set(['failed', 'cancelled', 'timed_out']);

export function initialConversation(threadId) {
  return {
    threadId,
    messages: [],
    loaded: false,
    olderCursor: null,
    runs: {},
    active: null,
    queued: 0,
    toolResults: {},
    toolStarts: {},
  };
}

function fromStored(message) {
  return {
    id: message.id,
    role: message.role,
    content: message.content,
    toolCalls: message.tool_calls || [],
    toolCallId: message.tool_call_id,
    runId: message.run_id,
    metadata: message.metadata || {},
    createdAt: message.created_at,
  };
}

function resultsOf(messages, toolResults) {
  const results = { ...toolResults };
  for (const m of messages) {
    if (m.role === 'tool' && m.toolCallId && !results[m.toolCallId]) {
      results[m.toolCallId] = {
        result: m.content,
        isError: Boolean(m.metadata.is_error),
        durationMs: m.metadata.duration_ms,
      };
    }
  }
  return results;
}

// A page of stored messages, newest first. `older` pages go before what is shown; the first
// page is the end of the conversation and replaces what it overlaps.
function mergeHistory(state, page, older) {
  const incoming = page.data.map(fromStored).reverse();
  const known = new Set(state.messages.map((m) => m.id));
  const ids = new Set(incoming.map((m) => m.id));
  let messages;
  if (older) {
    messages = [...incoming.filter((m) => !known.has(m.id)), ...state.messages];
  } else {
    // Live messages not in the page arrived after it was read: they stay at the end.
    messages = [...incoming, ...state.messages.filter((m) => !ids.has(m.id))];
  }
  return {
    ...state,
    messages,
    loaded: true,
    olderCursor: older || !state.loaded ? page.next_cursor : state.olderCursor,
    toolResults: resultsOf(incoming, state.toolResults),
  };
}

function setRun(state, id, changes) {
  const run = { id, ...(state.runs[id] || {}), ...changes };
  return { ...state, runs: { ...state.runs, [id]: run } };
}

function addMessage(state, message) {
  if (state.messages.some((m) => m.id === message.id)) return state;
  return { ...state, messages: [...state.messages, message] };
}

function applyEvent(state, event) {
  const data = event.data || {};
  const runId = event.run_id;
  const active = state.active && state.active.runId === runId ? state.active : null;
  switch (event.type) {
    case 'snapshot': {
      const run = event.active_run;
      const keep = run && state.active && state.active.runId === run.id ? state.active : null;
      return {
        ...state,
        queued: (event.queued_runs || []).length,
        active: run
          ? keep || { runId: run.id, agent: run.agent, status: run.status, thinking: '', text: '' }
          : null,
      };
    }
    case 'run_queued': {
      const next = setRun(state, runId, {
        status: 'queued',
        agent: data.agent,
        createdAt: event.ts,
      });
      if (state.active) return { ...next, queued: state.queued + 1 };
      return {
        ...next,
        active: { runId, agent: data.agent, status: 'queued', thinking: '', text: '' },
      };
    }
    case 'agent_started': {
      const next = setRun(state, runId, { status: 'running', agent: data.agent });
      const wasQueued = state.active && state.active.runId !== runId && state.queued > 0;
      return {
        ...next,
        queued: wasQueued ? state.queued - 1 : state.queued,
        active: { runId, agent: data.agent, status: 'running', thinking: '', text: '' },
      };
    }
    case 'agent_thinking':
      return active
        ? { ...state, active: { ...active, status: 'running', thinking: data.text } }
        : state;
    case 'message_delta':
      return active
        ? { ...state, active: { ...active, status: 'running', text: active.text + data.text } }
        : state;
    case 'message_created': {
      const next = addMessage(state, {
        id: data.message_id,
        role: data.role,
        content: data.content || '',
        toolCalls: data.tool_calls || [],
        runId,
        metadata: {},
        createdAt: event.ts,
      });
      if (active && data.role === 'assistant') return { ...next, active: { ...active, text: '' } };
      return next;
    }
    case 'tool_executing': {
      let next = { ...state, toolStarts: { ...state.toolStarts, [data.call_id]: event.ts } };
      if (active) next.active = { ...active, status: 'running', thinking: `Using ${data.tool}…` };
      const shown = state.messages.some((m) => m.toolCalls.some((c) => c.id === data.call_id));
      if (!shown) {
        next = addMessage(next, {
          id: `live-${data.call_id}`,
          role: 'assistant',
          content: '',
          toolCalls: [{ id: data.call_id, name: data.tool, arguments: data.arguments }],
          runId,
          metadata: {},
          createdAt: event.ts,
        });
      }
      return next;
    }
    case 'message_moved': {
      // A message queued behind a run moves after that run's output when its own run starts.
      const moved = state.messages.find((m) => m.id === data.message_id);
      if (!moved) return state;
      return { ...state, messages: [...state.messages.filter((m) => m !== moved), moved] };
    }
    case 'tool_completed':
      return {
        ...state,
        toolResults: {
          ...state.toolResults,
          [data.call_id]: {
            // An error's text is in `error`, a result's in `result`.
            result: data.is_error ? data.error : data.result,
            isError: Boolean(data.is_error),
            durationMs: data.duration_ms,
          },
        },
      };
    case 'agent_completed':
      return {
        ...setRun(state, runId, { status: 'completed' }),
        active: active ? null : state.active,
      };
    case 'agent_failed':
      return {
        ...setRun(state, runId, {
          status: data.code === 'run_timed_out' ? 'timed_out' : 'failed',
          error: data,
        }),
        active: active ? null : state.active,
      };
    case 'run_cancelled':
      return {
        ...setRun(state, runId, { status: 'cancelled', error: data }),
        active: active ? null : state.active,
      };
    default:
      return state;
  }
}

export function conversationReducer(state, action) {
  switch (action.type) {
    case 'history':
      return mergeHistory(state, action.page, action.older);
    case 'runs': {
      const runs = { ...state.runs };
      for (const run of action.runs) {
        runs[run.id] = {
          ...(runs[run.id] || {}),
          id: run.id,
          agent: run.agent,
          status:
            runs[run.id] && TERMINAL_FAILURES.has(runs[run.id].status)
              ? runs[run.id].status
              : run.status,
          error: run.error,
          createdAt: run.created_at,
        };
      }
      return { ...state, runs };
    }
    case 'event':
      return applyEvent(state, action.event);
    default:
      return state;
  }
}

// The rows the conversation shows, in order: user messages, answers, one card per tool call
// (with its result when it came), the outcome of every run that failed or was cancelled, and
// the live run (thinking, streamed text) at the end.
export function timeline(state) {
  const items = [];
  const lastOfRun = {};
  const labelled = new Set();
  // Each run's rows start with the name of the agent that ran (when known).
  const label = (runId) => {
    if (!runId || labelled.has(runId)) return;
    labelled.add(runId);
    const agent = state.runs[runId] && state.runs[runId].agent;
    if (agent) items.push({ kind: 'agent', key: `agent-${runId}`, agent });
  };
  for (const m of state.messages) {
    if (m.role === 'assistant') label(m.runId);
    const before = items.length;
    if (m.role === 'user') {
      items.push({ kind: 'user', key: m.id, content: m.content, createdAt: m.createdAt });
    } else if (m.role === 'assistant') {
      if (m.content)
        items.push({ kind: 'assistant', key: m.id, content: m.content, runId: m.runId });
      for (const call of m.toolCalls) {
        items.push({
          kind: 'tool',
          key: call.id,
          call,
          runId: m.runId,
          result: state.toolResults[call.id] || null,
          // A page that subscribed mid-call never saw tool_executing: the call's message
          // was written just before the tool started.
          startedAt: state.toolStarts[call.id] || m.createdAt || null,
          live: Boolean(state.active && state.active.runId === m.runId),
        });
      }
    }
    for (let i = before; i < items.length; i += 1) items[i].createdAt = m.createdAt;
    if (m.runId && items.length > before) lastOfRun[m.runId] = items.length;
  }
  const outcomes = Object.values(state.runs)
    .filter((run) => TERMINAL_FAILURES.has(run.status))
    .map((run) => ({ kind: 'outcome', key: `outcome-${run.id}`, run }));
  // Insert from the back so earlier indexes stay valid.
  const placed = outcomes.map((item) => {
    const { run } = item;
    let index = lastOfRun[run.id];
    if (index === undefined) {
      index = items.findIndex(
        (row) => row.createdAt && run.createdAt && row.createdAt > run.createdAt,
      );
      if (index === -1) index = items.length;
    }
    return { index, item };
  });
  placed.sort((a, b) => b.index - a.index);
  for (const { index, item } of placed) items.splice(index, 0, item);
  if (state.active) {
    const running = items.find((row) => row.kind === 'tool' && row.live && !row.result);
    const active =
      running && !state.active.thinking
        ? { ...state.active, thinking: `Using ${running.call.name}…` }
        : state.active;
    label(state.active.runId);
    items.push({ kind: 'live', key: `live-${state.active.runId}`, active });
  }
  return items;
}
