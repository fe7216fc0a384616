#!/usr/bin/env node
// Runs every test/**/*.test.ts under node:test with tsx, on any Node >= 20
// (Node 20's --test takes no glob patterns, so the files are listed here).
// Extra arguments are passed through, e.g. `npm test -- --test-name-pattern=header`.
import { readdirSync } from 'node:fs';
import { join, relative } from 'node:path';
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';

const root = fileURLToPath(new URL('..', import.meta.url));
const files = [];
const walk = (dir) => {
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) walk(path);
    else if (entry.name.endsWith('.test.ts')) files.push(relative(root, path));
  }
};
walk(join(root, 'test'));
files.sort();
const only = process.argv.slice(2).filter((a) => !a.startsWith('-'));
const flags = process.argv.slice(2).filter((a) => a.startsWith('-'));
const selected = only.length ? files.filter((f) => only.some((o) => f.includes(o))) : files;
// A per-test timeout so a hung child process fails the run instead of stalling CI.
const timeout = flags.some((f) => f.startsWith('--test-timeout')) ? [] : ['--test-timeout=300000'];
// Off a terminal (CI, logs) the same TAP summary lines ('# tests', '# pass', '# fail') on every
// Node version: Node 20 defaults to TAP there, Node 24 to the spec reporter.
const reporter = process.stdout.isTTY || flags.some((f) => f.startsWith('--test-reporter')) ? [] : ['--test-reporter=tap'];
const result = spawnSync(process.execPath, ['--import', 'tsx', '--test', ...timeout, ...reporter, ...flags, ...selected], {
  cwd: root,
  stdio: 'inherit',
});
process.exit(result.status ?? 1);
