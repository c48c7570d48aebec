// One row of the conversation: a message, an answer, a tool card, a run's outcome, the live run.
import { html, useEffect, useState } from './h.js';

import { renderMarkdown } from './markdown.js';
import { Icon, formatDuration } from './ui.js';

function Markdown({ text }) {
  // renderMarkdown escapes raw HTML and sanitizes the rest (see markdown.js).
  return html`<div class="markdown" dangerouslySetInnerHTML=${{ __html: renderMarkdown(text) }} />`;
}

function pretty(value) {
  if (typeof value === 'string') {
    try {
      return JSON.stringify(JSON.parse(value), null, 2);
    } catch {
      return value;
    }
  }
  return JSON.stringify(value, null, 2);
}

function Elapsed({ since }) {
  const [now, setNow] = useState(Date.now());
  useEffect(() => {
    const id = setInterval(() => setNow(Date.now()), 200);
    return () => clearInterval(id);
  }, []);
  if (!since) return null;
  return html`<span class="elapsed">${formatDuration(Math.max(0, now - Date.parse(since)))}</span>`;
}

const TOOL_STATES = { done: 'Done', error: 'Error', running: 'Running', unfinished: 'No result' };

function ToolCard({ item }) {
  const { call, result } = item;
  const state = result ? (result.isError ? 'error' : 'done') : item.live ? 'running' : 'unfinished';
  const label = TOOL_STATES[state];
  return html`<article
    class=${`tool-card tool-${state}`}
    data-call-id=${call.id}
    aria-label=${`Tool call ${call.name}: ${label}`}
  >
    <header class="tool-head">
      <span class="tool-icon"><${Icon} name="tool" /></span>
      <span class="tool-name">${call.name}</span>
      <span class="tool-status" role=${state === 'running' ? 'status' : undefined}>
        ${state === 'running' && html`<span class="spinner" aria-hidden="true"></span>`} ${label}
      </span>
      <span class="tool-duration">
        ${result ? formatDuration(result.durationMs) : state === 'running' ? html`<${Elapsed} since=${item.startedAt} />` : ''}
      </span>
    </header>
    <div class="tool-body">
      <div class="tool-section">
        <div class="tool-label">Arguments</div>
        <pre class="tool-args"><code>${pretty(call.arguments)}</code></pre>
      </div>
      ${
        result &&
        html`<div class="tool-section">
          <div class="tool-label">${result.isError ? 'Error' : 'Result'}</div>
          <pre class="tool-result"><code>${pretty(result.result)}</code></pre>
        </div>`
      }
    </div>
  </article>`;
}

const OUTCOMES = {
  failed: ['Run failed', 'The agent stopped with an error.'],
  cancelled: ['Run cancelled', 'Stopped before it finished.'],
  timed_out: ['Run timed out', 'The agent took longer than allowed.'],
};

function Outcome({ run }) {
  const [title, fallback] = OUTCOMES[run.status];
  const detail = run.error && run.error.message ? run.error.message : fallback;
  return html`<div class=${`outcome outcome-${run.status}`} role="note" data-run-id=${run.id}>
    <strong>${title}</strong><span>${detail}</span>
  </div>`;
}

function LiveRun({ active }) {
  const waiting = active.status === 'queued';
  return html`<div class="live-run" data-run-id=${active.runId}>
    ${
      active.text
        ? html`<div class="bubble assistant streaming" aria-live="polite">
            <${Markdown} text=${active.text} />
          </div>`
        : null
    }
    <div class="thinking" role="status" aria-live="polite">
      <span class="dots" aria-hidden="true"><span></span><span></span><span></span></span>
      <span class="thinking-text">
        ${waiting ? 'Waiting for an agent…' : active.thinking || (active.text ? 'Writing…' : 'Thinking…')}
      </span>
    </div>
  </div>`;
}

function CopyButton({ text }) {
  const [copied, setCopied] = useState(false);
  async function copy() {
    try {
      await navigator.clipboard.writeText(text);
      setCopied(true);
      setTimeout(() => setCopied(false), 1500);
    } catch {
      // No clipboard permission (or no secure context): nothing to do.
    }
  }
  return html`<button
    type="button"
    class="button ghost small copy"
    onClick=${copy}
    aria-label=${copied ? 'Copied' : 'Copy answer'}
    title="Copy answer"
  >
    <${Icon} name=${copied ? 'check' : 'copy'} />
  </button>`;
}

export function Row({ item }) {
  switch (item.kind) {
    case 'user':
      return html`<div class="row row-user"><div class="bubble user">${item.content}</div></div>`;
    case 'assistant':
      return html`<div class="row row-assistant">
        <div class="bubble assistant"><${Markdown} text=${item.content} /></div>
        <${CopyButton} text=${item.content} />
      </div>`;
    case 'tool':
      return html`<div class="row row-tool"><${ToolCard} item=${item} /></div>`;
    case 'outcome':
      return html`<div class="row row-outcome"><${Outcome} run=${item.run} /></div>`;
    case 'agent':
      return html`<div class="row row-agent"><span class="agent-chip">${item.agent}</span></div>`;
    case 'live':
      return html`<div class="row row-live"><${LiveRun} active=${item.active} /></div>`;
    default:
      return null;
  }
}
