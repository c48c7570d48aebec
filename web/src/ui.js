// Small shared pieces: icons, time formatting, a modal dialog.
import { html, useEffect, useRef } from './h.js';

const PATHS = {
  plus: 'M12 5v14M5 12h14',
  send: 'M5 12h14M13 6l6 6-6 6',
  stop: 'M7 7h10v10H7z',
  menu: 'M4 7h16M4 12h16M4 17h16',
  search: 'M11 18a7 7 0 1 1 0-14 7 7 0 0 1 0 14zM20 20l-4-4',
  edit: 'M4 20h4L19 9l-4-4L4 16v4zM14 6l4 4',
  archive: 'M4 7h16v3H4zM6 10v9h12v-9M10 14h4',
  restore: 'M4 12a8 8 0 1 0 3-6.2M4 4v5h5',
  trash: 'M5 7h14M10 7V5h4v2M7 7l1 13h8l1-13',
  tool: 'M14 6a4 4 0 0 0-5 5l-5 5 3 3 5-5a4 4 0 0 0 5-5l-2 2-2-2 2-2z',
  logout: 'M15 4h4v16h-4M10 8l-4 4 4 4M6 12h10',
  close: 'M6 6l12 12M18 6L6 18',
  copy: 'M9 9h10v10H9zM5 15V5h10',
  check: 'M5 12l5 5 9-10',
};

export function Icon({ name }) {
  return html`<svg class="icon" viewBox="0 0 24 24" aria-hidden="true" focusable="false">
    <path d=${PATHS[name]} />
  </svg>`;
}

const UNITS = [
  [60, 'second'],
  [60, 'minute'],
  [24, 'hour'],
  [7, 'day'],
  [4.35, 'week'],
  [12, 'month'],
  [Infinity, 'year'],
];
const relative = new Intl.RelativeTimeFormat(undefined, { numeric: 'auto' });

export function ago(iso) {
  let amount = (Date.parse(iso) - Date.now()) / 1000;
  for (const [size, unit] of UNITS) {
    if (Math.abs(amount) < size) {
      return unit === 'second' && Math.abs(amount) < 45
        ? 'just now'
        : relative.format(Math.round(amount), unit);
    }
    amount /= size;
  }
  return '';
}

export function formatDuration(ms) {
  if (ms === undefined || ms === null) return '';
  if (ms < 1) return '<1 ms';
  if (ms < 1000) return `${Math.round(ms)} ms`;
  return `${(ms / 1000).toFixed(ms < 10000 ? 1 : 0)} s`;
}

// A native modal <dialog>: focus is trapped inside and Escape closes it.
export function Dialog({ id, open, title, onClose, children }) {
  const ref = useRef(null);
  useEffect(() => {
    const dialog = ref.current;
    if (open && !dialog.open) dialog.showModal();
    if (!open && dialog.open) dialog.close();
  }, [open]);
  // `close` also fires after Escape; only a dialog that is meant to be open reports it.
  const closed = () => open && onClose();
  return html`<dialog ref=${ref} class="dialog" aria-labelledby=${`${id}-title`} onClose=${closed}>
    <h2 id=${`${id}-title`}>${title}</h2>
    ${children}
  </dialog>`;
}
