#!/usr/bin/env node
// Builds the optional native addon (qcow2_native.c: extent probe and data mover) at install time with node-gyp, which
// npm bundles. Optional on purpose: without it (no compiler, no Node headers, another OS) the
// library reads holes like data, so a failed build prints one warning and install goes on.
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = fileURLToPath(new URL('.', import.meta.url));
const disabled = process.env.QCOW2_STREAM_NO_NATIVE;
if (disabled !== undefined && disabled !== '' && disabled !== '0') process.exit(0);

// npm hands its bundled node-gyp to scripts as npm_config_node_gyp; run by hand, look for the
// one npm bundles next to this Node, else one on the PATH.
const prefix = dirname(dirname(process.execPath));
const bundledGyp = join(prefix, 'lib/node_modules/npm/node_modules/node-gyp/bin/node-gyp.js');
const gyp = process.env.npm_config_node_gyp ?? (existsSync(bundledGyp) ? bundledGyp : undefined);
const [command, args] = gyp ? [process.execPath, [gyp]] : ['node-gyp', []];
// A distribution's Node keeps its headers next to it (/usr/include/node): use them rather than
// have node-gyp download them, so the build works offline.
const localHeaders = !process.env.npm_config_nodedir && existsSync(join(prefix, 'include/node/node_api.h')) && existsSync(join(prefix, 'include/node/common.gypi'));
const result = spawnSync(command, [...args, 'rebuild', `--directory=${here}`, ...(localHeaders ? [`--nodedir=${prefix}`] : [])], {
  encoding: 'utf8',
  stdio: ['ignore', 'pipe', 'pipe'],
});

if (result.status !== 0) {
  console.warn(`qcow2-stream: warning: the optional native addon was not built (${reason()}); holes in input files will be read like data and data will be copied more slowly.`);
}

/** One line on why the build failed: the compiler's first error, or node-gyp's. */
function reason() {
  if (result.error) return result.error.message;
  const lines = `${result.stdout ?? ''}\n${result.stderr ?? ''}`.split('\n');
  const compiler = lines.find((line) => /\berror:/.test(line));
  if (compiler) return compiler.trim().slice(0, 200);
  const errors = lines.filter((line) => line.startsWith('gyp ERR! ')).map((line) => line.slice('gyp ERR! '.length).trim());
  const what = errors.find((line) => !/^(stack|System|command|cwd|node -v|node-gyp -v|not ok)\b/.test(line));
  const why = errors.find((line) => line.startsWith('stack Error: '))?.slice('stack Error: '.length);
  const other = lines.find((line) => /Error/.test(line))?.trim();
  return ([what, why].filter(Boolean).join(': ') || other || `node-gyp exited with ${result.status}`).slice(0, 200);
}
