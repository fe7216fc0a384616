import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { mixedExtents, writeRawImage } from '../helpers/images.js';
import { CLI_PATH, runCli } from '../helpers/cli.js';
import { needQemu, tempDir } from '../helpers/qemu.js';
import { assertQemuAgrees, qemuFacts } from '../write/helpers.js';

const SIZE = 3 * 1024 * 1024 + 1234;

function setup(t: Parameters<typeof tempDir>[0]): { dir: string; raw: Buffer } {
  const dir = tempDir(t);
  writeRawImage(join(dir, 'in.raw'), SIZE, mixedExtents(SIZE, 65536, 11));
  return { dir, raw: readFileSync(join(dir, 'in.raw')) };
}

/** A one-line error plus at most a hint line, no stack trace, exit code 2. */
function assertCleanError(result: ReturnType<typeof runCli>, pattern: RegExp): void {
  assert.equal(result.code, 2, result.stderr);
  assert.match(result.stderr, pattern);
  assert.ok(result.stderr.trim().split('\n').length <= 3, result.stderr);
  assert.doesNotMatch(result.stderr, /^\s+at /m, 'no stack trace');
}

test('convert file to file: summary on stderr, --json on stdout, --quiet silent', (t) => {
  if (!needQemu(t)) return;
  const { dir } = setup(t);
  const human = runCli(['convert', 'in.raw', 'a.qcow2'], { cwd: dir });
  assert.equal(human.code, 0, human.stderr);
  assert.equal(human.stdout, '');
  assert.match(human.stderr, /a\.qcow2: .* virtual, 64\.0 KiB clusters, raw data file, data file a\.data/);
  assertQemuAgrees('in.raw', 'a.qcow2', dir);
  assert.equal(qemuFacts('a.qcow2', dir).dataFile, 'a.data');

  const json = runCli(['convert', 'in.raw', 'b.qcow2', '--no-data-file-raw', '--cluster-size', '4K', '--refcount-bits', '2', '--json'], { cwd: dir });
  assert.equal(json.code, 0, json.stderr);
  const summary = JSON.parse(json.stdout) as Record<string, unknown>;
  assert.equal(summary['virtualSize'], 3 * 1024 * 1024 + 1536);
  assert.equal(summary['clusterSize'], 4096);
  assert.equal(summary['refcountBits'], 2);
  assert.equal(summary['dataFileRaw'], false);
  assert.equal(summary['dataFileName'], 'b.data');
  assertQemuAgrees('in.raw', 'b.qcow2', dir);
  assert.equal(qemuFacts('b.qcow2', dir).dataFileRaw, false);

  const quiet = runCli(['convert', 'in.raw', 'c.qcow2', '--data-file', 'sub-c.data', '--data-file-name', 'sub-c.data', '-q'], { cwd: dir });
  assert.equal(quiet.code, 0, quiet.stderr);
  assert.equal(quiet.stderr + quiet.stdout, '');
  assertQemuAgrees('in.raw', 'c.qcow2', dir);
});

test('stdin to stdout: metadata on stdout, JSON on stderr; with and without --size', (t) => {
  if (!needQemu(t)) return;
  const { dir, raw } = setup(t);
  for (const [i, extra] of [['--size', String(SIZE)], [], ['--no-data-file-raw'], ['--no-data-file-raw', '--size', String(SIZE)]].entries()) {
    const result = runCli(['convert', '-', '-', '--data-file', `s${i}.data`, '--json', ...extra], { cwd: dir, input: raw });
    assert.equal(result.code, 0, result.stderr);
    const summary = JSON.parse(result.stderr) as Record<string, unknown>;
    assert.equal(summary['inputBytes'], SIZE);
    assert.equal(summary['metadataLayout'], extra.includes('--size') ? 'streamed' : 'at-end');
    writeFileSync(join(dir, `s${i}.qcow2`), result.stdoutBytes);
    assertQemuAgrees('in.raw', `s${i}.qcow2`, dir);
  }
  const toFile = runCli(['convert', '-', 'f.qcow2', '--size', '3M', '-q'], { cwd: dir, input: raw.subarray(0, 3 * 1024 * 1024) });
  assert.equal(toFile.code, 0, toFile.stderr);
  assert.equal(qemuFacts('f.qcow2', dir).virtualSize, 3 * 1024 * 1024);
});

test('bad input: one clear line and exit 2, nothing left behind', (t) => {
  const { dir, raw } = setup(t);
  const before = readdirSync(dir).sort();
  assertCleanError(runCli(['convert', 'missing.raw', 'o.qcow2'], { cwd: dir }), /Cannot open 'missing\.raw': no such file/);
  assertCleanError(runCli(['convert', '-', 'o.qcow2', '--size', String(SIZE + 1)], { cwd: dir, input: raw }), /size was given as/);
  // Longer: the command stops at the excess, so keep the input within one pipe buffer.
  assertCleanError(runCli(['convert', '-', 'o.qcow2', '--size', '59999'], { cwd: dir, input: raw.subarray(0, 60_000) }), /more than 59999/);
  assertCleanError(runCli(['convert', 'in.raw', 'o.qcow2', '--size', '1M'], { cwd: dir }), /size was given as 1048576/);
  assertCleanError(runCli(['convert', 'in.raw', 'o.qcow2', '--data-file', 'in.raw', '--force'], { cwd: dir }), /is the input 'in.raw'/);
  assertCleanError(runCli(['convert', 'in.raw', 'o.qcow2', '--cluster-size', '1000'], { cwd: dir }), /cluster size 1000/);
  assertCleanError(runCli(['convert', 'in.raw', 'o.qcow2', '--refcount-bits', '3'], { cwd: dir }), /refcount width 3/);
  assertCleanError(runCli(['convert', '-', 'o.qcow2', '--size', '200G', '--cluster-size', '512'], { cwd: dir }), /too large[^]*hint: Use --cluster-size 1024/);
  assertCleanError(runCli(['convert', 'in.raw', '-'], { cwd: dir }), /data-file/);
  assertCleanError(runCli(['convert', 'in.raw', 'o.qcow2', '--size', 'lots'], { cwd: dir }), /not a size/);
  assert.deepEqual(readdirSync(dir).sort(), before);
  // An existing data file needs --force.
  writeFileSync(join(dir, 'o.data'), 'keep me');
  assertCleanError(runCli(['convert', 'in.raw', 'o.qcow2'], { cwd: dir }), /already exists[^]*--force/);
  assert.equal(readFileSync(join(dir, 'o.data'), 'utf8'), 'keep me');
  assert.equal(runCli(['convert', 'in.raw', 'o.qcow2', '--force', '-q'], { cwd: dir }).code, 0);
});

test('Ctrl-C part-way exits 130 and leaves no output', async (t) => {
  const { dir } = setup(t);
  const tsx = fileURLToPath(import.meta.resolve('tsx'));
  const child = spawn(process.execPath, ['--import', tsx, CLI_PATH, 'convert', '-', 'o.qcow2', '--size', '1G'], { cwd: dir, stdio: ['pipe', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  // The child exits with part of this unread: EPIPE on our side is expected.
  child.stdin.on('error', () => {});
  child.stdin.write(Buffer.alloc(4 * 1024 * 1024, 1));
  // Wait until the partial outputs exist, then interrupt while the input pipe stays open.
  for (let i = 0; i < 200 && !readdirSync(dir).some((f) => f.endsWith('.partial')); i++) await new Promise((r) => setTimeout(r, 25));
  assert.ok(readdirSync(dir).some((f) => f.endsWith('.partial')), 'the conversion started');
  child.kill('SIGINT');
  const [code] = (await once(child, 'exit')) as [number | null];
  child.stdin.destroy();
  assert.equal(code, 130, stderr);
  assert.match(stderr, /Interrupted by SIGINT/);
  assert.deepEqual(readdirSync(dir), ['in.raw']);
});
