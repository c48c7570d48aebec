// Sign in and register: one form, two modes.
import { html, useState } from './h.js';

import { ApiError, register, signIn } from './api.js';

function explain(error, mode) {
  if (!(error instanceof ApiError)) return 'Something went wrong. Please try again.';
  if (error.code === 'unknown_user') return 'No account uses this email. Create one instead?';
  if (error.code === 'wrong_password') return 'That password is not right.';
  if (error.status === 409) return 'An account with this email already exists. Sign in instead?';
  if (error.status === 429) return `Too many attempts. Try again in ${error.retryAfter || 60} s.`;
  return (
    error.message || (mode === 'register' ? 'Could not create the account.' : 'Could not sign in.')
  );
}

export function AuthScreen({ onSignedIn, notice }) {
  const [mode, setMode] = useState('signin');
  const [email, setEmail] = useState('');
  const [password, setPassword] = useState('');
  const [error, setError] = useState('');
  const [busy, setBusy] = useState(false);
  const registering = mode === 'register';

  async function submit(event) {
    event.preventDefault();
    setBusy(true);
    setError('');
    try {
      const session = await (registering ? register : signIn)(email.trim(), password);
      onSignedIn(session);
    } catch (caught) {
      setError(explain(caught, mode));
      setBusy(false);
    }
  }

  function switchMode() {
    setMode(registering ? 'signin' : 'register');
    setError('');
  }

  return html`<main class="auth">
    <div class="auth-card">
      <div class="brand brand-large">
        <span class="brand-mark" aria-hidden="true"></span>Threadline
      </div>
      <h1>${registering ? 'Create your account' : 'Sign in'}</h1>
      <p class="muted">
        ${
          registering
            ? 'Threads, agents and every step they take, live.'
            : 'Welcome back. Your conversations are where you left them.'
        }
      </p>
      ${notice && !error && html`<p class="notice" role="status">${notice}</p>`}
      <form onSubmit=${submit} class="auth-form">
        <label for="auth-email">Email</label>
        <input
          id="auth-email"
          type="email"
          autocomplete="email"
          required
          value=${email}
          onInput=${(e) => setEmail(e.currentTarget.value)}
        />
        <label for="auth-password">Password</label>
        <input
          id="auth-password"
          type="password"
          required
          autocomplete=${registering ? 'new-password' : 'current-password'}
          minlength=${registering ? 8 : undefined}
          value=${password}
          onInput=${(e) => setPassword(e.currentTarget.value)}
        />
        ${error && html`<p class="form-error" role="alert">${error}</p>`}
        <button type="submit" class="button primary wide" disabled=${busy}>
          ${busy ? 'One moment…' : registering ? 'Create account' : 'Sign in'}
        </button>
      </form>
      <p class="switch">
        ${registering ? 'Already have an account?' : 'New here?'}
        <button type="button" class="link" onClick=${switchMode}>
          ${registering ? 'Sign in' : 'Create an account'}
        </button>
      </p>
    </div>
  </main>`;
}
