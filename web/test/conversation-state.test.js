// The conversation reducer's invariants: `node --test` (run by tests/unit/test_page_bundle.py).
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { conversationReducer, initialConversation, timeline } from '../src/conversation-state.js';

const RUN = 'run_1';
const CALL = 'call_1';

function event(seq, type, data, runId = RUN) {
  return {
    type,
    seq,
    thread_id: 'thr_1',
    run_id: runId,
    ts: `2026-01-01T00:00:${String(seq).padStart(2, '0')}Z`,
    data,
  };
}

const DEMO_RUN = [
  event(
    2,
    'message_created',
    { message_id: 'msg_u', role: 'user', content: 'what is 12*7?', position: 1 },
    null,
  ),
  event(3, 'run_queued', { run_id: RUN, agent: 'demo', status: 'queued' }),
  event(4, 'agent_started', { agent: 'demo', attempt: 1 }),
  event(5, 'agent_thinking', { text: 'Looking at the question…' }),
  event(6, 'message_created', {
    message_id: 'msg_a',
    role: 'assistant',
    content: '',
    tool_calls: [{ id: CALL, name: 'calculator', arguments: { expression: '12*7' } }],
  }),
  event(7, 'tool_executing', {
    tool: 'calculator',
    call_id: CALL,
    arguments: { expression: '12*7' },
  }),
  event(8, 'tool_completed', {
    tool: 'calculator',
    call_id: CALL,
    result: '84',
    is_error: false,
    duration_ms: 0.3,
  }),
  // Deltas are not numbered: they carry the seq of the durable event they follow.
  { ...event(8, 'message_delta', { text: '12*7 ' }), ephemeral: true },
  { ...event(8, 'message_delta', { text: '= 84.' }), ephemeral: true },
  event(9, 'message_created', {
    message_id: 'msg_b',
    role: 'assistant',
    content: '12*7 = 84.',
    tool_calls: [],
  }),
  event(10, 'agent_completed', { message_id: 'msg_b', text: '12*7 = 84.' }),
];

function apply(state, events) {
  return events.reduce((s, e) => conversationReducer(s, { type: 'event', event: e }), state);
}

function kinds(state) {
  return timeline(state).map((row) => row.kind);
}

test('a run becomes a user message, a tool card with its result and the answer', () => {
  const state = apply(initialConversation('thr_1'), DEMO_RUN);
  assert.deepEqual(kinds(state), ['user', 'agent', 'tool', 'assistant']);
  assert.equal(timeline(state)[1].agent, 'demo');
  const card = timeline(state)[2];
  assert.equal(card.result.result, '84');
  assert.equal(state.active, null);
});

test('the answer streams into the live row until its message arrives', () => {
  const state = apply(initialConversation('thr_1'), DEMO_RUN.slice(0, 9));
  const live = timeline(state).at(-1);
  assert.equal(live.kind, 'live');
  assert.equal(live.active.text, '12*7 = 84.');
});

test('the (stored) durable events applied again change nothing', () => {
  const once = apply(initialConversation('thr_1'), DEMO_RUN);
  const durable = DEMO_RUN.filter((e) => e.type !== 'message_delta');
  const twice = apply(once, durable);
  assert.deepEqual(timeline(twice), timeline(once));
});

test('a history page overlapping live events keeps one copy of each message', () => {
  const live = apply(initialConversation('thr_1'), DEMO_RUN);
  const page = {
    next_cursor: null,
    data: [
      {
        id: 'msg_b',
        role: 'assistant',
        content: '12*7 = 84.',
        run_id: RUN,
        created_at: '2026-01-01T00:00:11Z',
      },
      {
        id: 'msg_t',
        role: 'tool',
        content: '84',
        tool_call_id: CALL,
        run_id: RUN,
        metadata: { is_error: false, duration_ms: 0.3 },
        created_at: '2026-01-01T00:00:08Z',
      },
      {
        id: 'msg_a',
        role: 'assistant',
        content: '',
        run_id: RUN,
        tool_calls: [{ id: CALL, name: 'calculator', arguments: { expression: '12*7' } }],
        created_at: '2026-01-01T00:00:06Z',
      },
      { id: 'msg_u', role: 'user', content: 'what is 12*7?', created_at: '2026-01-01T00:00:02Z' },
    ],
  };
  const merged = conversationReducer(live, { type: 'history', page, older: false });
  assert.deepEqual(kinds(merged), ['user', 'agent', 'tool', 'assistant']);
  assert.equal(merged.messages.length, 4);
});

test('a cancelled run is shown after its last row, and a failed one without rows after its question', () => {
  let state = apply(initialConversation('thr_1'), DEMO_RUN.slice(0, 7));
  state = apply(state, [event(13, 'run_cancelled', { reason: 'user' })]);
  state = apply(state, [
    event(14, 'message_created', { message_id: 'msg_u2', role: 'user', content: 'again' }, null),
    event(15, 'run_queued', { run_id: 'run_2', agent: 'demo', status: 'queued' }, 'run_2'),
    event(16, 'agent_failed', { code: 'agent_error', message: 'boom' }, 'run_2'),
  ]);
  assert.deepEqual(kinds(state), ['user', 'agent', 'tool', 'outcome', 'user', 'outcome']);
  const outcomes = timeline(state)
    .filter((row) => row.kind === 'outcome')
    .map((row) => row.run.status);
  assert.deepEqual(outcomes, ['cancelled', 'failed']);
  assert.equal(state.active, null);
});

test('a message queued behind a run moves below that run when its own run starts', () => {
  let state = apply(initialConversation('thr_1'), DEMO_RUN.slice(0, 7));
  state = apply(state, [
    event(
      13,
      'message_created',
      { message_id: 'msg_q', role: 'user', content: 'next', position: 3 },
      null,
    ),
    ...DEMO_RUN.slice(7).map((e) => ({ ...e, seq: e.seq + 6 })),
    event(30, 'message_moved', { message_id: 'msg_q', position: 5 }, 'run_2'),
  ]);
  assert.deepEqual(
    timeline(state).map((row) => row.content || row.kind),
    ['what is 12*7?', 'agent', 'tool', '12*7 = 84.', 'next'],
  );
});
