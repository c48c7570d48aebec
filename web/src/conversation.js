// One open thread: its header and actions, history (paging back as you scroll up), the live
// run, and the composer.
import {
  html,
  useCallback,
  useEffect,
  useLayoutEffect,
  useReducer,
  useRef,
  useState,
} from './h.js';

import { ApiError } from './api.js';
import { Composer } from './composer.js';
import { conversationReducer, initialConversation, timeline } from './conversation-state.js';
import { Row } from './steps.js';
import { Dialog, Icon } from './ui.js';

const TERMINAL = new Set(['agent_completed', 'agent_failed', 'run_cancelled']);
const SUGGESTIONS = ['what is 12*7?', 'what time is it in Asia/Tokyo?', 'divide 355 by 113'];

function ThreadHeader({ thread, onRename, onArchive, onRestore, onDelete, onMenu }) {
  const archived = thread && thread.status === 'archived';
  return html`<header class="conversation-head">
    <button
      type="button"
      class="button ghost icon-only menu-toggle"
      aria-label="Open the conversation list"
      onClick=${onMenu}
    >
      <${Icon} name="menu" />
    </button>
    <h1 class="conversation-title">
      ${thread ? thread.title || 'New conversation' : 'New conversation'}
    </h1>
    ${archived && html`<span class="badge badge-archived">archived</span>`}
    ${
      thread &&
      html`<div class="head-actions">
        <button type="button" class="button ghost" onClick=${onRename}>
          <${Icon} name="edit" /><span class="label">Rename</span>
        </button>
        ${
          archived
            ? html`<button type="button" class="button ghost" onClick=${onRestore}>
                <${Icon} name="restore" /><span class="label">Restore</span>
              </button>`
            : html`<button type="button" class="button ghost" onClick=${onArchive}>
                <${Icon} name="archive" /><span class="label">Archive</span>
              </button>`
        }
        <button type="button" class="button ghost danger-text" onClick=${onDelete}>
          <${Icon} name="trash" /><span class="label">Delete</span>
        </button>
      </div>`
    }
  </header>`;
}

function RenameDialog({ open, thread, onClose, onSave }) {
  const [title, setTitle] = useState('');
  useEffect(() => {
    if (open) setTitle((thread && thread.title) || '');
  }, [open]);
  return html`<${Dialog} id="rename" open=${open} title="Rename conversation" onClose=${onClose}>
    <form
      method="dialog"
      onSubmit=${(e) => {
        e.preventDefault();
        if (title.trim()) onSave(title.trim());
      }}
    >
      <label for="rename-input">Title</label>
      <input
        id="rename-input"
        value=${title}
        maxlength="200"
        required
        autofocus
        onInput=${(e) => setTitle(e.currentTarget.value)}
      />
      <div class="dialog-actions">
        <button type="button" class="button ghost" onClick=${onClose}>Cancel</button>
        <button type="submit" class="button primary">Save</button>
      </div>
    </form>
  <//>`;
}

function DeleteDialog({ open, thread, onClose, onConfirm }) {
  return html`<${Dialog}
    id="delete"
    open=${open}
    title="Delete this conversation?"
    onClose=${onClose}
  >
    <p>
      “${(thread && thread.title) || 'New conversation'}” and all its messages and runs will be
      deleted for good. This cannot be undone. To keep it out of the way instead, archive it.
    </p>
    <div class="dialog-actions">
      <button type="button" class="button ghost" onClick=${onClose} autofocus>Keep it</button>
      <button type="button" class="button danger" onClick=${onConfirm}>Delete forever</button>
    </div>
  <//>`;
}

function useStickToBottom(scroller, deps) {
  const stick = useRef(true);
  useEffect(() => {
    const el = scroller.current;
    const onScroll = () => {
      stick.current = el.scrollHeight - el.scrollTop - el.clientHeight < 80;
    };
    el.addEventListener('scroll', onScroll, { passive: true });
    return () => el.removeEventListener('scroll', onScroll);
  }, []);
  useLayoutEffect(() => {
    const el = scroller.current;
    if (stick.current) el.scrollTop = el.scrollHeight;
  }, deps);
  return stick;
}

export function Conversation(props) {
  const {
    threadId,
    fresh,
    api,
    live,
    agents,
    agent,
    onAgent,
    retryUntil,
    onSend,
    onThreadChanged,
    onGone,
    onActivity,
    onMenu,
  } = props;
  const [state, dispatch] = useReducer(conversationReducer, threadId, initialConversation);
  const [thread, setThread] = useState(null);
  const [problem, setProblem] = useState('');
  const [dialog, setDialog] = useState(null);
  const scroller = useRef(null);
  const topSentinel = useRef(null);
  const keepOffset = useRef(null);
  const loadingOlder = useRef(false);

  const loadLatest = useCallback(async () => {
    if (!threadId) return;
    try {
      const [page, runs] = await Promise.all([api.messages(threadId), api.runs(threadId)]);
      dispatch({ type: 'runs', runs: runs.data });
      dispatch({ type: 'history', page, older: false });
    } catch (error) {
      if (error instanceof ApiError && error.status === 404) onGone(threadId, 'missing');
      else setProblem(error.message);
    }
  }, [threadId]);

  useEffect(() => {
    if (!threadId) return undefined;
    let cancelled = false;
    api.thread(threadId).then(
      (found) => !cancelled && setThread(found),
      (error) =>
        !cancelled &&
        error instanceof ApiError &&
        error.status === 404 &&
        onGone(threadId, 'missing'),
    );
    loadLatest();
    let first = true;
    const stop = live.watch(
      threadId,
      (event) => {
        dispatch({ type: 'event', event });
        if (event.type === 'snapshot' && first) {
          first = false;
          loadLatest(); // covers anything written between the first read and the subscription
        }
        if (
          event.type === 'thread_updated' ||
          (event.type === 'message_created' && event.data.role === 'user')
        ) {
          api.thread(threadId).then(
            (found) => !cancelled && setThread(found),
            () => {},
          );
          onActivity();
        }
        if (TERMINAL.has(event.type)) onActivity();
        if (event.type === 'thread_deleted') onGone(threadId, 'deleted');
      },
      { afterSeq: fresh ? 0 : null },
    );
    return () => {
      cancelled = true;
      stop();
    };
  }, [threadId]);

  useEffect(() => {
    document.title = thread && thread.title ? `${thread.title} · Threadline` : 'Threadline';
  }, [thread && thread.title]);

  const items = timeline(state);
  const stick = useStickToBottom(scroller, [
    items.length,
    state.active && state.active.text,
    state.active && state.active.thinking,
  ]);

  // Paging back: when the top of the history scrolls into view, load the page before it and
  // keep what the reader was looking at in place.
  const loadOlder = useCallback(async () => {
    if (!state.olderCursor || loadingOlder.current) return;
    loadingOlder.current = true;
    const el = scroller.current;
    keepOffset.current = el.scrollHeight - el.scrollTop;
    try {
      const page = await api.messages(threadId, { cursor: state.olderCursor });
      stick.current = false;
      dispatch({ type: 'history', page, older: true });
    } finally {
      loadingOlder.current = false;
    }
  }, [state.olderCursor, threadId]);

  useLayoutEffect(() => {
    if (keepOffset.current !== null) {
      const el = scroller.current;
      el.scrollTop = el.scrollHeight - keepOffset.current;
      keepOffset.current = null;
    }
  }, [state.messages.length]);

  useEffect(() => {
    if (!topSentinel.current) return undefined;
    const observer = new IntersectionObserver(
      (entries) => {
        if (entries.some((entry) => entry.isIntersecting)) loadOlder();
      },
      { root: scroller.current },
    );
    observer.observe(topSentinel.current);
    return () => observer.disconnect();
  }, [loadOlder]);

  async function change(changes) {
    try {
      const updated = await api.updateThread(threadId, changes);
      setThread(updated);
      onThreadChanged(updated);
    } catch (error) {
      setProblem(error.message);
    }
  }

  async function rename(title) {
    await change({ title });
    setDialog((open) => (open === 'rename' ? null : open));
  }

  async function remove() {
    try {
      await api.deleteThread(threadId);
      setDialog(null);
      onGone(threadId, 'deleted');
    } catch (error) {
      setProblem(error.message);
      setDialog(null);
    }
  }

  async function cancel() {
    if (!state.active) return;
    try {
      await api.cancelRun(threadId, state.active.runId);
    } catch (error) {
      setProblem(error.message);
    }
  }

  const empty = state.loaded || !threadId ? items.length === 0 : false;
  return html`<section class="conversation" aria-label="Conversation">
    <${ThreadHeader}
      thread=${thread}
      onMenu=${onMenu}
      onRename=${() => setDialog('rename')}
      onArchive=${() => change({ status: 'archived' })}
      onRestore=${() => change({ status: 'active' })}
      onDelete=${() => setDialog('delete')}
    />
    <div class="messages" ref=${scroller} role="log" aria-label="Messages" aria-live="off">
      <div class="messages-inner">
        ${
          state.olderCursor &&
          html`<div ref=${topSentinel} class="older">
            <button type="button" class="button ghost small" onClick=${loadOlder}>
              Load earlier messages
            </button>
          </div>`
        }
        ${
          empty &&
          html`<div class="empty-conversation">
            <h2>What can I help with?</h2>
            <p class="muted">
              Ask the demo agent some arithmetic or the time, and watch it use its tools.
            </p>
            <div class="suggestions">
              ${SUGGESTIONS.map((text) => html`<button type="button" class="suggestion" onClick=${() => onSend(threadId, text)}>${text}</button>`)}
            </div>
          </div>`
        }
        ${items.map((item) => html`<${Row} key=${item.key} item=${item} />`)}
      </div>
    </div>
    ${
      problem &&
      html`<p class="problem" role="alert">
        ${problem}
        <button
          type="button"
          class="button ghost icon-only"
          aria-label="Dismiss"
          onClick=${() => setProblem('')}
        >
          <${Icon} name="close" />
        </button>
      </p>`
    }
    <${Composer}
      agents=${agents}
      agent=${agent}
      onAgent=${onAgent}
      retryUntil=${retryUntil}
      active=${Boolean(state.active)}
      onCancel=${cancel}
      autofocus=${true}
      onSend=${(content) => onSend(threadId, content)}
    />
    <${RenameDialog}
      open=${dialog === 'rename'}
      thread=${thread}
      onClose=${() => setDialog(null)}
      onSave=${rename}
    />
    <${DeleteDialog}
      open=${dialog === 'delete'}
      thread=${thread}
      onClose=${() => setDialog(null)}
      onConfirm=${remove}
    />
  </section>`;
}
