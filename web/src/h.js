// Preact with htm tagged templates (no JSX, so no compile step beyond bundling), and its hooks.
export { html, render } from 'htm/preact';
export {
  useCallback,
  useEffect,
  useLayoutEffect,
  useMemo,
  useReducer,
  useRef,
  useState,
} from 'preact/hooks';
