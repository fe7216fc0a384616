/**
 * The installed command: package.json's `bin`, the launcher that runs the one-file CommonJS
 * bundle of the CLI from a V8 code cache (src/cli/bundle.mjs and launch.cjs, made by
 * `npm run build`). The other CLI tests run the TypeScript source; these check that the bundle
 * is that same program: it finds its version and the native addon from where it sits, reads
 * standard input, converts and exports, fails like the source does, and V8 takes its cache.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { nativeAddon } from '../../src/io/native.js';
import { mixedExtents, writeRawImage } from '../helpers/images.js';
import { hasQemuImg, qemuCheck, qemuCompare, tempDir } from '../helpers/qemu.js';

const root = fileURLToPath(new URL('../..', import.meta.url));
const pkg = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as { version: string; bin: Record<string, string> };
const bin = join(root, pkg.bin['qcow2-stream']!);
// Without a build there is nothing to test; a build without the bundle is a failure below.
const skip = existsSync(join(root, 'dist/src/cli/main.js')) ? undefined : 'not built: run npm run build';

/** Reports every native module the process loads, on stderr. */
const DLOPEN_TRACE = `data:text/javascript,${encodeURIComponent(
  "const open = process.dlopen; process.dlopen = function (module, file, ...rest) { process.stderr.write('dlopen ' + file + '\\n'); return open.call(this, module, file, ...rest); };",
)}`;

function runBin(args: readonly string[], cwd: string, input?: Uint8Array) {
  const result = spawnSync(process.execPath, ['--import', DLOPEN_TRACE, bin, ...args], { cwd, input, maxBuffer: 64 * 1024 * 1024 });
  if (result.error) throw result.error;
  return { code: result.status, stdout: result.stdout, stderr: result.stderr.toString('utf8') };
}

const cli = join(root, 'dist/src/cli');

test('the bin is the launcher, built next to main.js with the bundle', { skip }, () => {
  assert.equal(bin, join(cli, 'qcow2-stream.cjs'));
  for (const file of [bin, join(cli, 'cli-bundle.cjs')]) assert.ok(existsSync(file), `${file} is missing: npm run build makes it`);
});

test('V8 accepts the code cache built for this Node version', { skip }, (t) => {
  const cache = join(cli, `cli-bundle.${process.version}.cache`);
  // Built by another Node (CI builds with one and tests with two): the launcher compiles from source.
  if (!existsSync(cache)) return t.skip(`no code cache for Node ${process.version}`);
  // In a plain child process, with the launcher's own options: test-runner flags must not count.
  const probe = `const { readFileSync } = require('node:fs'); const { wrap } = require('node:module'); const { Script } = require('node:vm');
    const script = new Script(wrap(readFileSync(process.argv[1], 'utf8')), { filename: process.argv[1], cachedData: readFileSync(process.argv[2]) });
    process.stdout.write(String(script.cachedDataRejected));`;
  const result = spawnSync(process.execPath, ['-e', probe, join(cli, 'cli-bundle.cjs'), cache], { encoding: 'utf8' });
  assert.equal(result.status, 0, result.stderr);
  assert.equal(result.stdout, 'false', 'the cache was rejected');
});

test('the bundle prints the package version', { skip }, (t) => {
  const result = runBin(['--version'], tempDir(t));
  assert.equal(result.code, 0, result.stderr);
  assert.equal(result.stdout.toString().trim(), pkg.version);
});

test('the bundle converts with the native addon and exports back the same bytes; qemu-img agrees', { skip }, (t) => {
  const dir = tempDir(t);
  const size = 24 * 1024 * 1024 + 512;
  writeRawImage(join(dir, 'in.raw'), size, mixedExtents(size, 64 * 1024, 3));
  const converted = runBin(['convert', '--quiet', 'in.raw', 'out.qcow2'], dir);
  assert.equal(converted.code, 0, converted.stderr);
  if (nativeAddon()) assert.match(converted.stderr, /dlopen .*\/src\/native\/build\/Release\/qcow2_native\.node\n/, 'the bundle did not load the addon');
  const exported = runBin(['export', '--quiet', 'out.qcow2', '-'], dir);
  assert.equal(exported.code, 0, exported.stderr);
  assert.ok(exported.stdout.equals(readFileSync(join(dir, 'in.raw'))), 'the export differs from the input');
  // Standard input in, metadata to standard output (the pipe inputs load node:tty and node:net on demand).
  const piped = runBin(['convert', '--quiet', '-', '-', '--data-file', 'piped.data'], dir, readFileSync(join(dir, 'in.raw')));
  assert.equal(piped.code, 0, piped.stderr);
  writeFileSync(join(dir, 'piped.qcow2'), piped.stdout);
  if (hasQemuImg) {
    assert.equal(qemuCheck('out.qcow2', dir).code, 0);
    assert.equal(qemuCompare('in.raw', 'out.qcow2', dir).code, 0);
    assert.equal(qemuCompare('in.raw', 'piped.qcow2', dir).code, 0);
  }
});

test('the bundle reports a broken image in one line with its code, no stack trace', { skip }, (t) => {
  const dir = tempDir(t);
  writeFileSync(join(dir, 'bad.qcow2'), Buffer.from('QFI\xfb not really a qcow2 header', 'latin1'));
  const result = runBin(['info', 'bad.qcow2'], dir);
  assert.equal(result.code, 2);
  const lines = result.stderr.split('\n').filter((line) => line !== '' && !line.startsWith('dlopen '));
  assert.match(lines[0]!, /^qcow2-stream: .*\[QCOW_ERR_[A-Z_]+\]$/);
  assert.ok(!/\bat .*:\d+:\d+\)?$/m.test(result.stderr), result.stderr);
});

test('the bundle starts the compression workers from dist (--internal --compress --threads 2)', { skip }, (t) => {
  const dir = tempDir(t);
  const size = 6 * 1024 * 1024;
  writeRawImage(join(dir, 'in.raw'), size, mixedExtents(size, 64 * 1024, 5));
  const result = runBin(['convert', '--json', 'in.raw', 'c.qcow2', '--internal', '--compress', '--threads', '2'], dir);
  assert.equal(result.code, 0, result.stderr);
  const summary = JSON.parse(result.stdout.toString()) as { compression?: { type: string; clusters: number } };
  assert.equal(summary.compression?.type, 'zlib');
  assert.ok((summary.compression?.clusters ?? 0) > 0, 'pattern clusters were compressed');
  if (hasQemuImg) {
    assert.equal(qemuCheck('c.qcow2', dir).code, 0);
    assert.equal(qemuCompare('in.raw', 'c.qcow2', dir).code, 0);
  }
});
