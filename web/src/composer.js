// The message box: Enter sends, Shift+Enter starts a new line; an agent picker; Cancel while a
// run is active; disabled, with the reason, while the user is rate limited.
import { html, useEffect, useRef, useState } from './h.js';

import { Icon } from './ui.js';

export function Composer({
  agents,
  agent,
  onAgent,
  onSend,
  onCancel,
  active,
  retryUntil,
  autofocus,
}) {
  const [text, setText] = useState('');
  const [now, setNow] = useState(Date.now());
  const [sending, setSending] = useState(false);
  const box = useRef(null);
  const limited = Boolean(retryUntil) && retryUntil > now;

  useEffect(() => {
    if (!limited) return undefined;
    const id = setInterval(() => setNow(Date.now()), 250);
    return () => clearInterval(id);
  }, [limited, retryUntil]);

  useEffect(() => {
    if (autofocus && box.current) box.current.focus();
  }, [autofocus]);

  useEffect(() => {
    const el = box.current;
    el.style.height = 'auto';
    el.style.height = `${Math.min(el.scrollHeight, 240)}px`;
  }, [text]);

  async function submit(event) {
    if (event) event.preventDefault();
    const content = text.trim();
    if (!content || limited || sending) return;
    setSending(true);
    try {
      if (await onSend(content)) setText('');
    } finally {
      setSending(false);
      if (box.current) box.current.focus();
    }
  }

  function onKeyDown(event) {
    if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      submit();
    }
  }

  const seconds = limited ? Math.ceil((retryUntil - now) / 1000) : 0;
  const reason = limited
    ? `You are sending messages too fast. You can send again in ${seconds} s.`
    : '';
  return html`<form class="composer" onSubmit=${submit} aria-label="Send a message">
    ${limited && html`<p class="composer-reason" id="composer-reason" role="status">${reason}</p>`}
    <div class="composer-box">
      <label for="composer-input" class="visually-hidden">Message</label>
      <textarea
        id="composer-input"
        ref=${box}
        rows="1"
        value=${text}
        disabled=${limited}
        placeholder=${limited ? 'Rate limited…' : 'Message the agent (Enter to send, Shift+Enter for a new line)'}
        aria-describedby=${limited ? 'composer-reason' : undefined}
        onInput=${(e) => setText(e.currentTarget.value)}
        onKeyDown=${onKeyDown}
      ></textarea>
      <div class="composer-actions">
        <label for="composer-agent" class="agent-label">Agent</label>
        <select
          id="composer-agent"
          value=${agent}
          onChange=${(e) => onAgent(e.currentTarget.value)}
        >
          ${agents.map((a) => html`<option value=${a.name} title=${a.description}>${a.name}</option>`)}
        </select>
        <span class="spacer"></span>
        ${
          active &&
          html`<button type="button" class="button danger" onClick=${onCancel}>
            <${Icon} name="stop" /> Cancel
          </button>`
        }
        <button
          type="submit"
          class="button primary"
          disabled=${limited || sending || !text.trim()}
          aria-label="Send"
          title=${reason || 'Send (Enter)'}
        >
          <${Icon} name="send" /> <span class="send-text">Send</span>
        </button>
      </div>
    </div>
  </form>`;
}
