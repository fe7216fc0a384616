import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readdirSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { mixedExtents, writeRawImage } from '../helpers/images.js';
import { runCli } from '../helpers/cli.js';
import { needQemu, tempDir } from '../helpers/qemu.js';
import { assertQemuAgrees, qemuFacts, sha256File } from '../write/helpers.js';

test('wrap: metadata around the raw file, which stays untouched, in both modes and to stdout', (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  const size = 2 * 1024 * 1024 + 700;
  writeRawImage(join(dir, 'disk.raw'), size, mixedExtents(size, 65536, 3));
  const hash = sha256File(join(dir, 'disk.raw'));
  const mtime = statSync(join(dir, 'disk.raw')).mtimeMs;

  const raw = runCli(['wrap', 'disk.raw', 'raw.qcow2'], { cwd: dir });
  assert.equal(raw.code, 0, raw.stderr);
  assert.match(raw.stderr, /raw\.qcow2: .* over data file disk\.raw \(raw data file\)/);
  assertQemuAgrees('disk.raw', 'raw.qcow2', dir);
  assert.equal(qemuFacts('raw.qcow2', dir).dataFileRaw, true);

  const sparse = runCli(['wrap', 'disk.raw', 'sparse.qcow2', '--no-data-file-raw', '--json'], { cwd: dir });
  assert.equal(sparse.code, 0, sparse.stderr);
  const summary = JSON.parse(sparse.stdout) as Record<string, number>;
  assert.equal(summary['inputBytes'], size);
  assert.ok(summary['zeroClusters']! > 0);
  assertQemuAgrees('disk.raw', 'sparse.qcow2', dir);
  assert.equal(qemuFacts('sparse.qcow2', dir).dataFileRaw, false);

  const piped = runCli(['wrap', 'disk.raw', '-', '--data-file-name', 'disk.raw', '--json'], { cwd: dir });
  assert.equal(piped.code, 0, piped.stderr);
  assert.equal((JSON.parse(piped.stderr) as Record<string, unknown>)['dataFileName'], 'disk.raw');
  writeFileSync(join(dir, 'piped.qcow2'), piped.stdoutBytes);
  assertQemuAgrees('disk.raw', 'piped.qcow2', dir);

  assert.equal(sha256File(join(dir, 'disk.raw')), hash);
  assert.equal(statSync(join(dir, 'disk.raw')).mtimeMs, mtime);
  assert.equal(statSync(join(dir, 'disk.raw')).size, size);
});

test('wrap: bad input fails with one line and exit 2', (t) => {
  const dir = tempDir(t);
  writeFileSync(join(dir, 'disk.raw'), Buffer.alloc(1024, 1));
  for (const [args, pattern] of [
    [['wrap', 'missing.raw', 'o.qcow2'], /no such file/],
    [['wrap', 'disk.raw', 'disk.raw'], /is the raw file 'disk.raw'/],
    [['wrap', 'disk.raw', 'o.qcow2', '--cluster-size', '3K'], /cluster size/],
  ] as const) {
    const result = runCli(args, { cwd: dir });
    assert.equal(result.code, 2, result.stderr);
    assert.match(result.stderr, pattern);
    assert.doesNotMatch(result.stderr, /^\s+at /m);
  }
  assert.deepEqual(readdirSync(dir), ['disk.raw']);
});
