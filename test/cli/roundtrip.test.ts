/**
 * End to end through the CLI, as a user would: convert with our tool and read back with our tool
 * from a directory other than the image's, and let qemu-img agree — for every layout. (qemu 7.2
 * resolves the stored data-file name, relative to the image, from its working directory: it runs
 * in the image's.)
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { closeSync, existsSync, mkdirSync, openSync, readdirSync, readFileSync, writeFileSync, writeSync } from 'node:fs';
import { spawn, spawnSync } from 'node:child_process';
import { once } from 'node:events';
import { join } from 'node:path';
import { CLI_PATH, runCli } from '../helpers/cli.js';
import { mixedExtents, writeRawImage, randomBytesAt } from '../helpers/images.js';
import { needQemu, qemuCheck, qemuCompare, tempDir } from '../helpers/qemu.js';

const SIZE = 6 * 1024 * 1024 + 3000; // not a multiple of 512 or of the cluster

function setup(t: Parameters<typeof tempDir>[0]) {
  const dir = tempDir(t);
  mkdirSync(join(dir, 'out'));
  writeRawImage(join(dir, 'disk.raw'), SIZE, mixedExtents(SIZE, 65536, 3));
  return dir;
}

/** The raw image as the guest sees it: padded with zeros to a multiple of 512. */
function guestBytes(path: string): Buffer {
  const raw = readFileSync(path);
  return Buffer.concat([raw, Buffer.alloc(Math.ceil(raw.length / 512) * 512 - raw.length)]);
}

function ok(result: ReturnType<typeof runCli>, what: string): void {
  assert.equal(result.code, 0, `${what}: ${result.stderr}`);
}

for (const variant of [
  { name: 'raw data file', args: [] as string[] },
  { name: 'sparse data file', args: ['--no-data-file-raw'] },
  { name: 'internal', args: ['--internal'] },
  { name: 'internal with dedup, 4 KiB clusters', args: ['--internal', '--dedup', '--cluster-size', '4K'] },
]) {
  test(`convert → export → identical, from the parent directory: ${variant.name}`, (t) => {
    const dir = setup(t);
    ok(runCli(['convert', 'disk.raw', 'out/disk.qcow2', '-q', ...variant.args], { cwd: dir }), 'convert');
    ok(runCli(['check', 'out/disk.qcow2'], { cwd: dir }), 'check');
    ok(runCli(['export', 'out/disk.qcow2', 'back.raw', '-q'], { cwd: dir }), 'export');
    assert.ok(readFileSync(join(dir, 'back.raw')).equals(guestBytes(join(dir, 'disk.raw'))));
    ok(runCli(['compare', 'disk.raw', 'out/disk.qcow2'], { cwd: dir }), 'compare');
    if (!needQemu(t)) return;
    assert.equal(qemuCheck('disk.qcow2', join(dir, 'out')).code, 0);
    assert.equal(qemuCompare('../disk.raw', 'disk.qcow2', join(dir, 'out')).code, 0);
  });
}

test('a relative data-file name is read from the image directory, and the way qemu reads it only inside it', (t) => {
  const dir = setup(t);
  ok(runCli(['convert', 'disk.raw', 'out/disk.qcow2', '-q'], { cwd: dir }), 'convert');
  // The stored name is 'disk.data', relative to out/: read from out/ and from its parent alike.
  ok(runCli(['export', 'disk.qcow2', '../back.raw', '-q'], { cwd: join(dir, 'out') }), 'export from inside out/');
  assert.ok(readFileSync(join(dir, 'back.raw')).equals(guestBytes(join(dir, 'disk.raw'))));
  // A name stored relative to the working directory (qemu's reading), as an older run wrote it:
  // found from that directory, since it stays inside the image's; from inside out/ it names nothing.
  ok(runCli(['convert', 'disk.raw', 'out/cwd.qcow2', '--data-file', 'out/cwd.data', '--data-file-name', 'out/cwd.data', '-q'], { cwd: dir }), 'convert');
  ok(runCli(['export', 'out/cwd.qcow2', 'cwd.raw', '-q'], { cwd: dir }), 'export from the directory it was made in');
  const inside = runCli(['export', 'cwd.qcow2', '../cwd2.raw'], { cwd: join(dir, 'out') });
  assert.equal(inside.code, 2);
  assert.match(inside.stderr, /QCOW_ERR_PATH_POLICY/);
  // An image storing 'elsewhere/secret.data' must not reach a file outside its directory
  // just because the working directory makes that name resolve.
  mkdirSync(join(dir, 'elsewhere'));
  writeFileSync(join(dir, 'elsewhere', 'secret.data'), randomBytesAt(1, 0, 65536));
  ok(runCli(['convert', 'disk.raw', 'out/trap.qcow2', '--data-file', 'out/trap.data', '--data-file-name', 'elsewhere/secret.data', '-q'], { cwd: dir }), 'convert');
  const trap = runCli(['export', 'out/trap.qcow2', 'leak.raw'], { cwd: dir });
  assert.equal(trap.code, 2, trap.stderr);
  assert.match(trap.stderr, /does not exist/);
  assert.equal(existsSync(join(dir, 'leak.raw')), false);
});

test('incremental backups: overlay against the base image and against its manifest', (t) => {
  const dir = setup(t);
  ok(runCli(['convert', 'disk.raw', 'day1.qcow2', '--data-file', 'day1.data', '--no-data-file-raw', '--manifest', 'day1.xxh', '-q'], { cwd: dir }), 'day 1');
  // Day 2: a few clusters change, one becomes zeros.
  const day2 = guestBytes(join(dir, 'disk.raw'));
  for (const cluster of [1, 7, 40]) randomBytesAt(9, cluster * 65536, 65536).copy(day2, cluster * 65536);
  day2.fill(0, 20 * 65536, 21 * 65536);
  writeFileSync(join(dir, 'day2.raw'), day2);
  for (const [name, extra] of [
    ['day2', ['--base', 'day1.qcow2']],
    ['day2m', ['--base', 'day1.qcow2', '--base-manifest', 'day1.xxh']],
    ['day2i', ['--base', 'day1.qcow2', '--internal']],
  ] as const) {
    const dataArgs = name === 'day2i' ? [] : ['--data-file', `${name}.data`];
    const result = runCli(['convert', 'day2.raw', `${name}.qcow2`, ...dataArgs, ...extra, '--json'], { cwd: dir });
    ok(result, name);
    const summary = JSON.parse(result.stdout) as Record<string, number | string>;
    assert.equal(summary['dataClusters'], 3, `${name}: only the changed clusters are stored`);
    assert.equal(summary['backingFile'], 'day1.qcow2');
    assert.equal(summary['dataFileRaw'], false);
    ok(runCli(['check', `${name}.qcow2`], { cwd: dir }), `${name} check`);
    ok(runCli(['compare', 'day2.raw', `${name}.qcow2`], { cwd: dir }), `${name} compare`);
    if (needQemu(t)) {
      assert.equal(qemuCheck(`${name}.qcow2`, dir).code, 0);
      assert.equal(qemuCompare('day2.raw', `${name}.qcow2`, dir).code, 0, name);
    }
  }
});

test('dedup with an external data file fails before writing anything, and says why', (t) => {
  const dir = setup(t);
  const result = runCli(['convert', 'disk.raw', 'out/disk.qcow2', '--dedup'], { cwd: dir });
  assert.equal(result.code, 2);
  assert.match(result.stderr, /QCOW_ERR_DEDUP_UNSUPPORTED/);
  assert.match(result.stderr, /guest offset/);
  assert.match(result.stderr, /--internal --dedup/);
  assert.doesNotMatch(result.stderr, /\n\s+at /);
  assert.equal(existsSync(join(dir, 'out', 'disk.qcow2')), false);
  assert.equal(existsSync(join(dir, 'out', 'disk.data')), false);
});

test('a reader that goes away early ends the program quietly (no EPIPE stack trace)', async () => {
  const tsx = import.meta.resolve('tsx');
  const result = spawnSync('sh', ['-c', `"${process.execPath}" --import "${tsx}" "${CLI_PATH}" convert --help | head -c 10 > /dev/null; exit 0`], { encoding: 'utf8' });
  assert.doesNotMatch(result.stderr, /EPIPE|\n\s+at /);
});

test('a shell pipe into convert (stdin reopened non-blocking) gives the same image, and Ctrl-C on a quiet pipe exits', async (t) => {
  const dir = setup(t);
  const tsx = import.meta.resolve('tsx');
  const cli = `"${process.execPath}" --import "${tsx}" "${CLI_PATH}"`;
  const piped = spawnSync('sh', ['-c', `cat disk.raw | ${cli} convert - p.qcow2 --data-file p.data -q`], { cwd: dir, encoding: 'utf8' });
  assert.equal(piped.status, 0, piped.stderr);
  ok(runCli(['compare', 'disk.raw', 'p.qcow2'], { cwd: dir }), 'compare');
  // A writer that goes quiet: the pipe stays open and empty; SIGINT must still end the run.
  // (A FIFO opened read-write here is stdin's pipe: we hold it open and write only 60 KiB.)
  const fifo = join(dir, 'stdin.fifo');
  assert.equal(spawnSync('mkfifo', [fifo]).status, 0);
  const fd = openSync(fifo, 'r+');
  t.after(() => closeSync(fd));
  writeSync(fd, Buffer.alloc(60 * 1024, 7));
  const child = spawn(process.execPath, ['--import', tsx, CLI_PATH, 'convert', '-', 'q.qcow2', '--data-file', 'q.data'], { cwd: dir, stdio: [fd, 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr?.on('data', (d: Buffer) => (stderr += d.toString()));
  for (let i = 0; i < 200 && !readdirSync(dir).some((f) => f.endsWith('.partial')); i++) await new Promise((r) => setTimeout(r, 25));
  child.kill('SIGINT');
  const [code] = (await once(child, 'exit')) as [number | null];
  assert.equal(code, 130, stderr);
  assert.ok(!readdirSync(dir).some((f) => f.startsWith('q.') || f.includes('.partial')), 'no output left');
});
