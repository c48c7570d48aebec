// The HTTP API, with the bearer token from sign-in. Every error becomes an ApiError carrying
// the API's stable `code`, the HTTP status and, for 429, the Retry-After seconds.

export class ApiError extends Error {
  constructor(status, code, message, retryAfter = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

const TOKEN_KEY = 'threadline.token';
const EMAIL_KEY = 'threadline.email';

export function savedSession() {
  const token = localStorage.getItem(TOKEN_KEY);
  return token ? { token, email: localStorage.getItem(EMAIL_KEY) || '' } : null;
}

export function saveSession(session) {
  if (session) {
    localStorage.setItem(TOKEN_KEY, session.token);
    localStorage.setItem(EMAIL_KEY, session.email);
  } else {
    localStorage.removeItem(TOKEN_KEY);
    localStorage.removeItem(EMAIL_KEY);
  }
}

async function request(method, path, { token, body, query } = {}) {
  const url = new URL(path, window.location.origin);
  for (const [key, value] of Object.entries(query || {})) {
    if (value !== undefined && value !== null && value !== '') url.searchParams.set(key, value);
  }
  const headers = {};
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  let response;
  try {
    response = await fetch(url, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch {
    throw new ApiError(0, 'network_error', 'The server cannot be reached. Check your connection.');
  }
  if (response.status === 204) return null;
  const payload = await response.json().catch(() => null);
  if (!response.ok) {
    const error = (payload && payload.error) || {};
    const retry = response.headers.get('Retry-After');
    throw new ApiError(
      response.status,
      error.code || 'http_error',
      error.message || `The server answered ${response.status}`,
      retry === null ? null : Number(retry),
    );
  }
  return payload;
}

export async function signIn(email, password) {
  const issued = await request('POST', '/v1/auth/token', { body: { email, password } });
  return { token: issued.access_token, email };
}

export async function register(email, password) {
  await request('POST', '/v1/auth/register', { body: { email, password } });
  return signIn(email, password);
}

// Everything a signed-in user does. `onUnauthorized` runs when the token stops working.
export class Api {
  constructor(token, onUnauthorized) {
    this.token = token;
    this.onUnauthorized = onUnauthorized;
  }

  async call(method, path, options = {}) {
    try {
      return await request(method, path, { ...options, token: this.token });
    } catch (error) {
      if (error instanceof ApiError && error.status === 401) this.onUnauthorized();
      throw error;
    }
  }

  logout() {
    return this.call('POST', '/v1/auth/logout');
  }

  agents() {
    return this.call('GET', '/v1/agents');
  }

  threads({ status, q, cursor, limit = 30 }) {
    return this.call('GET', '/v1/threads', { query: { status, q, cursor, limit } });
  }

  thread(id) {
    return this.call('GET', `/v1/threads/${encodeURIComponent(id)}`);
  }

  createThread(title) {
    return this.call('POST', '/v1/threads', { body: title ? { title } : {} });
  }

  updateThread(id, changes) {
    return this.call('PATCH', `/v1/threads/${encodeURIComponent(id)}`, { body: changes });
  }

  deleteThread(id) {
    return this.call('DELETE', `/v1/threads/${encodeURIComponent(id)}`, {
      query: { permanent: 'true' },
    });
  }

  // Newest first, so the first page is the end of the conversation; `cursor` pages back.
  messages(threadId, { cursor, limit = 40 } = {}) {
    return this.call('GET', `/v1/threads/${encodeURIComponent(threadId)}/messages`, {
      query: { order: 'desc', cursor, limit },
    });
  }

  runs(threadId, { limit = 50 } = {}) {
    return this.call('GET', `/v1/threads/${encodeURIComponent(threadId)}/runs`, {
      query: { limit },
    });
  }

  postMessage(threadId, content, agent) {
    return this.call('POST', `/v1/threads/${encodeURIComponent(threadId)}/messages`, {
      body: { content, run: agent ? { agent } : undefined },
    });
  }

  cancelRun(threadId, runId) {
    const path = `/v1/threads/${encodeURIComponent(threadId)}/runs/${encodeURIComponent(runId)}`;
    return this.call('POST', `${path}/cancel`);
  }
}
