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

// Threads by when they were last active, the way people remember them.
function groups(threads) {
  const startOfToday = new Date();
  startOfToday.setHours(0, 0, 0, 0);
  const day = 24 * 3600 * 1000;
  const bounds = [
    ['Today', startOfToday.getTime()],
    ['Yesterday', startOfToday.getTime() - day],
    ['Previous 7 days', startOfToday.getTime() - 7 * day],
    ['Previous 30 days', startOfToday.getTime() - 30 * day],
    ['Earlier', -Infinity],
  ];
  const grouped = [];
  for (const thread of threads) {
    const at = Date.parse(thread.last_activity_at);
    const [label] = bounds.find(([, since]) => at >= since);
    const last = grouped[grouped.length - 1];
    if (last && last[0] === label) last[1].push(thread);
    else grouped.push([label, [thread]]);
  }
  return grouped;
}

export function Sidebar({
  list,
  selectedId,
  onSelect,
  onNew,
  onSearch,
  onFilter,
  onMore,
  email,
  onSignOut,
}) {
  const sentinel = useRef(null);
  // Observing again after every page reports the sentinel at once if it is still in view (a
  // tall window), so pages keep coming until the list fills the screen or ends.
  useEffect(() => {
    const observer = new IntersectionObserver((entries) => {
      if (entries.some((entry) => entry.isIntersecting)) onMore();
    });
    observer.observe(sentinel.current);
    return () => observer.disconnect();
  }, [onMore, list.items.length]);

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
        <input
          id="thread-search"
          type="search"
          placeholder="Search"
          value=${list.query}
          onInput=${(e) => onSearch(e.currentTarget.value)}
        />
      </div>
      <label for="thread-filter" class="visually-hidden">Show conversations</label>
      <select
        id="thread-filter"
        value=${list.status}
        onChange=${(e) => onFilter(e.currentTarget.value)}
      >
        ${FILTERS.map(([value, label]) => html`<option value=${value}>${label}</option>`)}
      </select>
    </div>
    <div class="thread-scroll">
      ${groups(list.items).map(
        ([label, threads]) =>
          html`<section class="thread-group" key=${label}>
            <h2 class="group-label">${label}</h2>
            <ul class="thread-list" aria-busy=${list.loading ? 'true' : 'false'}>
              ${threads.map(
                (thread) =>
                  html`<li key=${thread.id}>
                    <button
                      type="button"
                      class="thread-item"
                      data-thread-id=${thread.id}
                      aria-current=${thread.id === selectedId ? 'page' : undefined}
                      onClick=${() => onSelect(thread.id)}
                    >
                      <span class="thread-title">${thread.title || 'New conversation'}</span>
                      <span class="thread-meta">
                        ${thread.status !== 'active' && html`<span class=${`badge badge-${thread.status}`}>${thread.status}</span>`}
                        <time datetime=${thread.last_activity_at}
                          >${ago(thread.last_activity_at)}</time
                        >
                      </span>
                    </button>
                  </li>`,
              )}
            </ul>
          </section>`,
      )}
      ${
        !list.loading &&
        list.items.length === 0 &&
        html`<p class="empty-list">
          ${list.query ? 'No conversation matches.' : list.status === 'archived' ? 'Nothing archived.' : 'No conversations yet.'}
        </p>`
      }
      ${list.error && html`<p class="form-error" role="alert">${list.error}</p>`}
      <div ref=${sentinel} class="sentinel" aria-hidden="true">
        ${list.loading ? 'Loading…' : ''}
      </div>
    </div>
    <div class="sidebar-foot">
      <span class="who" title=${email}>${email}</span>
      <button type="button" class="button ghost" onClick=${onSignOut}>
        <${Icon} name="logout" /> Sign out
      </button>
    </div>
  </nav>`;
}
