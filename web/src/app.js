// The signed-in page: the sidebar, the open conversation, the connection banner.
import { html, useCallback, useEffect, useMemo, useRef, useState } from './h.js';

import { Api, ApiError, saveSession, savedSession } from './api.js';
import { AuthScreen } from './auth.js';
import { Conversation } from './conversation.js';
import { LiveSocket } from './live.js';
import { Sidebar } from './sidebar.js';

const AGENT_KEY = 'threadline.agent';

function threadFromHash() {
  const match = /^#\/t\/([A-Za-z0-9_-]+)$/.exec(window.location.hash);
  return match ? match[1] : null;
}

function useThreadList(api) {
  const [list, setList] = useState({
    items: [],
    cursor: null,
    loading: true,
    status: 'active',
    query: '',
    error: '',
  });
  const current = useRef(list);
  current.current = list;
  const generation = useRef(0);

  const load = useCallback(
    async ({ status, query, append }) => {
      const mine = append ? generation.current : ++generation.current;
      setList((l) => ({ ...l, status, query, loading: true, error: '' }));
      try {
        const page = await api.threads({
          status: status || undefined,
          q: query.trim() || undefined,
          cursor: append ? current.current.cursor : undefined,
        });
        if (mine !== generation.current) return;
        setList((l) => {
          const items = append
            ? [...l.items, ...page.data.filter((t) => !l.items.some((i) => i.id === t.id))]
            : page.data;
          return { ...l, items, cursor: page.next_cursor, loading: false };
        });
      } catch (error) {
        if (mine === generation.current)
          setList((l) => ({ ...l, loading: false, error: error.message }));
      }
    },
    [api],
  );

  const refresh = useCallback(
    () => load({ status: current.current.status, query: current.current.query, append: false }),
    [load],
  );
  const more = useCallback(() => {
    const l = current.current;
    if (l.cursor && !l.loading) load({ status: l.status, query: l.query, append: true });
  }, [load]);
  return { list, setList, load, refresh, more };
}

function Shell({ session, onSignedOut }) {
  const api = useMemo(
    () => new Api(session.token, () => onSignedOut('Your session ended. Please sign in again.')),
    [session.token],
  );
  const [liveStatus, setLiveStatus] = useState('connecting');
  const live = useMemo(
    () =>
      new LiveSocket(session.token, {
        onStatus: setLiveStatus,
        onUnauthorized: () => onSignedOut('Your session ended. Please sign in again.'),
      }),
    [session.token],
  );
  useEffect(() => () => live.close(), [live]);

  const [agents, setAgents] = useState([]);
  const [agent, setAgent] = useState(localStorage.getItem(AGENT_KEY) || 'demo');
  const [selected, setSelected] = useState(threadFromHash());
  const [fresh, setFresh] = useState(null);
  const [notice, setNotice] = useState('');
  const [retryUntil, setRetryUntil] = useState(0);
  const [drawer, setDrawer] = useState(false);
  const threads = useThreadList(api);
  const searchTimer = useRef(null);

  useEffect(() => {
    threads.load({ status: 'active', query: '', append: false });
    api.agents().then(
      (page) => {
        setAgents(page.data);
        if (!page.data.some((a) => a.name === agent) && page.data.length) {
          setAgent(page.data.some((a) => a.name === 'demo') ? 'demo' : page.data[0].name);
        }
      },
      () => {},
    );
    const onHash = () => setSelected(threadFromHash());
    window.addEventListener('hashchange', onHash);
    return () => window.removeEventListener('hashchange', onHash);
  }, []);

  function open(threadId) {
    setNotice('');
    setDrawer(false);
    window.location.hash = threadId ? `#/t/${threadId}` : '#/';
    setSelected(threadId);
  }

  function chooseAgent(name) {
    setAgent(name);
    localStorage.setItem(AGENT_KEY, name);
  }

  async function send(threadId, content) {
    try {
      let id = threadId;
      if (!id) {
        const created = await api.createThread();
        id = created.id;
        setFresh(id);
        open(id);
      }
      await api.postMessage(id, content, agent);
      threads.refresh();
      return true;
    } catch (error) {
      if (error instanceof ApiError && error.status === 429) {
        setRetryUntil(Date.now() + 1000 * (error.retryAfter || 60));
      } else {
        setNotice(error.message);
      }
      return false;
    }
  }

  function gone(threadId, why) {
    threads.setList((l) => ({ ...l, items: l.items.filter((t) => t.id !== threadId) }));
    open(null);
    setNotice(
      why === 'deleted'
        ? 'The conversation was deleted.'
        : 'This conversation does not exist, or it is not yours.',
    );
  }

  function changed(thread) {
    threads.setList((l) => {
      const keep = !l.status || l.status === thread.status;
      const items = l.items
        .map((t) => (t.id === thread.id ? thread : t))
        .filter((t) => keep || t.id !== thread.id);
      return { ...l, items };
    });
  }

  async function signOut() {
    try {
      await api.logout();
    } catch {
      // Signing out here must work even when the server cannot be reached.
    }
    onSignedOut('');
  }

  function search(query) {
    clearTimeout(searchTimer.current);
    threads.setList((l) => ({ ...l, query }));
    searchTimer.current = setTimeout(
      () => threads.load({ status: threads.list.status, query, append: false }),
      250,
    );
  }

  // Other devices change threads too: look again whenever the page comes back into view.
  useEffect(() => {
    const onVisible = () => document.visibilityState === 'visible' && threads.refresh();
    document.addEventListener('visibilitychange', onVisible);
    return () => document.removeEventListener('visibilitychange', onVisible);
  }, [threads.refresh]);

  useEffect(() => {
    if (!drawer) return undefined;
    const first = document.querySelector('.sidebar button');
    if (first) first.focus();
    const onKey = (event) => event.key === 'Escape' && setDrawer(false);
    window.addEventListener('keydown', onKey);
    return () => window.removeEventListener('keydown', onKey);
  }, [drawer]);

  return html`<div class=${`shell${drawer ? ' drawer-open' : ''}`}>
    <${Sidebar}
      list=${threads.list}
      selectedId=${selected}
      onSelect=${open}
      onNew=${() => open(null)}
      onSearch=${search}
      onFilter=${(status) => threads.load({ status, query: threads.list.query, append: false })}
      onMore=${threads.more}
      email=${session.email}
      onSignOut=${signOut}
    />
    <div class="scrim" onClick=${() => setDrawer(false)} aria-hidden="true"></div>
    <main class="main">
      ${
        liveStatus === 'reconnecting' &&
        html`<div class="banner" role="status">
          <span class="spinner" aria-hidden="true"></span> Connection lost. Reconnecting…
        </div>`
      }
      ${notice && html`<div class="banner banner-info" role="status">${notice}</div>`}
      <${Conversation}
        key=${selected || 'new'}
        threadId=${selected}
        fresh=${selected && selected === fresh}
        api=${api}
        live=${live}
        agents=${agents}
        agent=${agent}
        onAgent=${chooseAgent}
        retryUntil=${retryUntil}
        onSend=${send}
        onThreadChanged=${changed}
        onGone=${gone}
        onActivity=${threads.refresh}
        onMenu=${() => setDrawer(true)}
      />
    </main>
  </div>`;
}

export function App() {
  const [session, setSession] = useState(savedSession());
  const [notice, setNotice] = useState('');

  // Signing in or out in another tab does the same here.
  useEffect(() => {
    const onStorage = (event) => {
      if (event.key === null || event.key === 'threadline.token') setSession(savedSession());
    };
    window.addEventListener('storage', onStorage);
    return () => window.removeEventListener('storage', onStorage);
  }, []);

  function signedIn(next) {
    saveSession(next);
    setNotice('');
    setSession(next);
  }

  function signedOut(message) {
    saveSession(null);
    setNotice(message);
    setSession(null);
  }

  if (!session) return html`<${AuthScreen} onSignedIn=${signedIn} notice=${notice} />`;
  return html`<${Shell} key=${session.token} session=${session} onSignedOut=${signedOut} />`;
}
