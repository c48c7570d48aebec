// Bundles the page into ../src/threadline/web/assets/ (committed, so installing Threadline
// needs no Node). Run `npm ci && npm run build` here after changing anything in src/.
import { build } from 'esbuild';

// OUTDIR lets the test that checks the committed bundle build a copy elsewhere.
const outdir =
  process.env.OUTDIR || new URL('../src/threadline/web/assets/', import.meta.url).pathname;

await build({
  entryPoints: { app: 'src/main.js', style: 'src/app.css' },
  bundle: true,
  minify: true,
  format: 'esm',
  target: ['es2022'],
  outdir,
  legalComments: 'linked',
  logLevel: 'info',
});
