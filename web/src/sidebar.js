// The thread list: newest activity first, text search, a status filter, infinite scroll over
// the API's cursor.
import { html, useEffect, useRef } from './h.js';

import { Icon, ago } from './ui.js';

const FILTERS = [
  ['active', 'Active'],
  ['completed', 'Completed'],
  ['archived', 'Archived'],
  ['', 'All'],
];

export function Sidebar({ list, selectedId, onSelect, onNew, onSearch, onFilter, onMore, email, onSignOut }) {
  const sentinel = useRef(null);
  useEffect(() => {
    const observer = new IntersectionObserver((entries) => {
      if (entries.some((entry) => entry.isIntersecting)) onMore();
    });
    observer.observe(sentinel.current);
    return () => observer.disconnect();
  }, [onMore]);

  return html`<nav class="sidebar" aria-label="Conversations">
    <div class="sidebar-head">
      <div class="brand"><span class="brand-mark" aria-hidden="true"></span>Threadline</div>
      <button type="button" class="button primary" onClick=${onNew}>
        <${Icon} name="plus" /> New chat
      </button>
    </div>
    <div class="sidebar-tools">
      <div class="search">
        <${Icon} name="search" />
        <label for="thread-search" class="visually-hidden">Search conversations</label>
        <input id="thread-search" type="search" placeholder="Search" value=${list.query}
          onInput=${(e) => onSearch(e.currentTarget.value)} />
      </div>
      <label for="thread-filter" class="visually-hidden">Show conversations</label>
      <select id="thread-filter" value=${list.status} onChange=${(e) => onFilter(e.currentTarget.value)}>
        ${FILTERS.map(([value, label]) => html`<option value=${value}>${label}</option>`)}
      </select>
    </div>
    <div class="thread-scroll">
    <ul class="thread-list" aria-busy=${list.loading ? 'true' : 'false'}>
      ${list.items.map((thread) => html`<li key=${thread.id}>
        <button type="button" class="thread-item" data-thread-id=${thread.id}
          aria-current=${thread.id === selectedId ? 'page' : undefined}
          onClick=${() => onSelect(thread.id)}>
          <span class="thread-title">${thread.title || 'New conversation'}</span>
          <span class="thread-meta">
            ${thread.status !== 'active' && html`<span class=${`badge badge-${thread.status}`}>${thread.status}</span>`}
            <time datetime=${thread.last_activity_at}>${ago(thread.last_activity_at)}</time>
          </span>
        </button>
      </li>`)}
    </ul>
    ${!list.loading && list.items.length === 0 && html`<p class="empty-list">
      ${list.query ? 'No conversation matches.' : list.status === 'archived' ? 'Nothing archived.' : 'No conversations yet.'}
    </p>`}
    ${list.error && html`<p class="form-error" role="alert">${list.error}</p>`}
    <div ref=${sentinel} class="sentinel" aria-hidden="true">${list.loading ? 'Loading…' : ''}</div>
    </div>
    <div class="sidebar-foot">
      <span class="who" title=${email}>${email}</span>
      <button type="button" class="button ghost" onClick=${onSignOut}>
        <${Icon} name="logout" /> Sign out
      </button>
    </div>
  </nav>`;
}
