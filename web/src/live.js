// One WebSocket to /v1/ws for the whole page, carrying the live events of the threads it
// watches. The token goes in the `bearer.<token>` sub-protocol, never in the URL.
//
// Resuming: for every watched thread it remembers the highest `seq` handed on. After a drop it
// reconnects (with back-off, at once when the browser comes back online) and subscribes again
// with `after_seq`, so the server replays exactly what was missed; a durable event at or below
// the remembered seq is dropped here too, so a listener never sees an event twice. Streamed
// text (`message_delta`, `ephemeral: true`) is not numbered: its `seq` is that of the durable
// event it follows, so it is handed on only right after that event and never moves the seq.

// The server closes with these when the token is refused or the session was signed out.
const SESSION_ENDED = new Set([4001, 4003]);
const PING_EVERY_MS = 15000;
const PONG_TIMEOUT_MS = 10000;
const MAX_BACKOFF_MS = 8000;

export class LiveSocket {
  constructor(token, { onStatus, onUnauthorized }) {
    this.token = token;
    this.onStatus = onStatus;
    this.onUnauthorized = onUnauthorized;
    this.threads = new Map(); // thread id -> { lastSeq, listener }
    this.socket = null;
    this.status = 'connecting';
    this.attempt = 0;
    this.closed = false;
    this.timers = new Set();
    this.onOnline = () => this.reconnectNow();
    this.onOffline = () => this.socket && this.socket.close();
    window.addEventListener('online', this.onOnline);
    window.addEventListener('offline', this.onOffline);
    this.connect();
  }

  setStatus(status) {
    this.status = status;
    this.onStatus(status);
  }

  later(ms, fn) {
    const id = setTimeout(() => {
      this.timers.delete(id);
      fn();
    }, ms);
    this.timers.add(id);
    return id;
  }

  connect() {
    if (this.closed) return;
    const scheme = window.location.protocol === 'https:' ? 'wss:' : 'ws:';
    const socket = new WebSocket(`${scheme}//${window.location.host}/v1/ws`, [
      'threadline',
      `bearer.${this.token}`,
    ]);
    this.socket = socket;
    socket.onmessage = (message) => this.receive(socket, message.data);
    socket.onclose = (event) => this.dropped(socket, event);
  }

  receive(socket, text) {
    if (socket !== this.socket) return;
    const frame = JSON.parse(text);
    for (const message of frame.type === 'batch' ? frame.events : [frame]) {
      this.handle(message);
    }
  }

  handle(message) {
    this.lastHeard = Date.now();
    if (message.type === 'authenticated') {
      this.attempt = 0;
      this.setStatus('live');
      for (const [threadId, watch] of this.threads) this.sendSubscribe(threadId, watch);
      this.schedulePing();
      return;
    }
    if (message.type === 'pong') return;
    const watch = message.thread_id ? this.threads.get(message.thread_id) : null;
    if (!watch) return;
    if (message.ephemeral) {
      if (message.seq !== watch.lastSeq) return; // out of place (the server sends none such)
    } else if (typeof message.seq === 'number') {
      if (watch.lastSeq !== null && message.seq <= watch.lastSeq) return; // already seen
      watch.lastSeq = message.seq;
    } else if (message.type === 'snapshot' && watch.lastSeq === null) {
      watch.lastSeq = message.last_seq;
    }
    watch.listener(message);
  }

  dropped(socket, event) {
    if (socket !== this.socket) return;
    this.socket = null;
    if (this.closed) return;
    if (SESSION_ENDED.has(event.code)) {
      this.setStatus('unauthorized');
      this.onUnauthorized();
      return;
    }
    this.setStatus('reconnecting');
    const delay = Math.min(MAX_BACKOFF_MS, 250 * 2 ** this.attempt);
    this.attempt += 1;
    this.retryTimer = this.later(delay, () => this.connect());
  }

  reconnectNow() {
    if (this.closed || this.socket) return;
    clearTimeout(this.retryTimer);
    this.timers.delete(this.retryTimer);
    this.connect();
  }

  schedulePing() {
    const socket = this.socket;
    this.later(PING_EVERY_MS, () => {
      if (socket !== this.socket || socket.readyState !== WebSocket.OPEN) return;
      const sentAt = Date.now();
      socket.send(JSON.stringify({ type: 'ping' }));
      // A socket that answers nothing for this long is dead even if it has not closed.
      this.later(PONG_TIMEOUT_MS, () => {
        if (socket === this.socket && this.lastHeard < sentAt) socket.close();
      });
      this.schedulePing();
    });
  }

  sendSubscribe(threadId, watch) {
    const message = { type: 'subscribe', thread_id: threadId };
    if (watch.lastSeq !== null) message.after_seq = watch.lastSeq;
    this.send(message);
  }

  send(message) {
    if (this.socket && this.socket.readyState === WebSocket.OPEN) {
      this.socket.send(JSON.stringify(message));
      return true;
    }
    return false;
  }

  // Watch a thread: `listener` gets its snapshot, then every event once, in order: the live
  // ones, or with `afterSeq` every stored one after it first (0 for a thread just created).
  watch(threadId, listener, { afterSeq = null } = {}) {
    const watch = { lastSeq: afterSeq, listener };
    this.threads.set(threadId, watch);
    if (this.status === 'live') this.sendSubscribe(threadId, watch);
    return () => {
      if (this.threads.get(threadId) !== watch) return;
      this.threads.delete(threadId);
      this.send({ type: 'unsubscribe', thread_id: threadId });
    };
  }

  close() {
    this.closed = true;
    window.removeEventListener('online', this.onOnline);
    window.removeEventListener('offline', this.onOffline);
    for (const id of this.timers) clearTimeout(id);
    if (this.socket) this.socket.close();
    this.socket = null;
  }
}
