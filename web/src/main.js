import { html, render } from './h.js';

import { App } from './app.js';

render(html`<${App} />`, document.getElementById('app'));
