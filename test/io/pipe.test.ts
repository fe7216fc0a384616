/**
 * Pipe I/O through the addon (src/io/pipe.ts): reads of standard input and FIFOs and writes to
 * standard output give the same bytes with and without the addon; a read waiting on a quiet
 * writer, and a write waiting on a quiet reader, end as soon as the run is cancelled.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { once } from 'node:events';
import { Writable } from 'node:stream';
import { closeSync, constants, mkdirSync, openSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { convert } from '../../src/index.js';
import { NO_NATIVE_ENV } from '../../src/io/native.js';
import { OffsetWriter } from '../../src/io/output.js';
import { nativePipeIoAvailable, nativePipeReader, nativePipeWriter } from '../../src/io/pipe.js';
import { CLI_PATH } from '../helpers/cli.js';
import { mixedExtents, writeRawImage } from '../helpers/images.js';
import { needQemu, qemuCheck, qemuCompare, tempDir } from '../helpers/qemu.js';
import { MiB } from '../write/helpers.js';

const tsx = import.meta.resolve('tsx');
const cli = `'${process.execPath}' --import '${tsx}' '${CLI_PATH}'`;

/** Runs a bash pipeline in `cwd`, with or without the addon; fails the test on a non-zero exit. */
function sh(command: string, cwd: string, native: boolean): void {
  const env = { ...process.env, [NO_NATIVE_ENV]: native ? '' : '1' };
  const result = spawnSync('bash', ['-c', `set -o pipefail; ${command}`], { cwd, env, encoding: 'utf8' });
  assert.equal(result.status, 0, `${command}\n${result.stderr}`);
}

const sameBytes = (a: string, b: string) => assert.ok(readFileSync(a).equals(readFileSync(b)), `${a} and ${b} differ`);

test('the addon offers native pipe I/O (this machine builds it)', { skip: process.platform !== 'linux' }, () => {
  assert.ok(nativePipeIoAvailable(), 'the addon was not built, or lacks readFull/writeFull');
});

test('stdin pipe → files, stdin pipe → metadata on a stdout pipe, export → stdout pipe: the same bytes with and without the addon', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  // Not a whole number of clusters, nor of the pipe's size: a short last read and a short cluster.
  const size = 9 * MiB + 3 * 4096 + 7;
  writeRawImage(join(dir, 'in.raw'), size, mixedExtents(size, 65536, 7), 7);
  for (const native of [true, false]) {
    // Each in its own directory, under the same names: the data-file name is stored in the image.
    const sub = join(dir, native ? 'n' : 'j');
    mkdirSync(sub);
    // Standard input a pipe (cat), the data and metadata to files.
    sh(`cat ../in.raw | ${cli} convert --quiet --no-sync - f.qcow2 --size ${size} --data-file f.data`, sub, native);
    // The metadata to a pipe on standard output.
    sh(`cat ../in.raw | ${cli} convert --quiet --no-sync - - --size ${size} --data-file p.data | cat > p.qcow2`, sub, native);
    // A socket on standard input (how Node spawns children), to a file.
    const socket = spawnSync(process.execPath, ['--import', tsx, CLI_PATH, 'convert', '--quiet', '--no-sync', '-', 's.qcow2', '--size', String(size), '--data-file', 's.data'], {
      cwd: sub,
      input: readFileSync(join(dir, 'in.raw')),
      env: { ...process.env, [NO_NATIVE_ENV]: native ? '' : '1' },
    });
    assert.equal(socket.status, 0, socket.stderr.toString());
    // Export to a pipe on standard output.
    sh(`${cli} export --quiet f.qcow2 - | cat > e.raw`, sub, native);
    // A single-file image to a pipe: with the addon pass 2 splices the data from the input.
    sh(`${cli} convert --quiet --no-sync --internal ../in.raw - | cat > i.qcow2`, sub, native);
    sh(`${cli} convert --quiet --no-sync --internal --dedup ../in.raw - | cat > d.qcow2`, sub, native);
    // 4 KiB clusters: runs of stored clusters, each spliced on its own.
    sh(`${cli} convert --quiet --no-sync --internal --cluster-size 4096 ../in.raw - | cat > k.qcow2`, sub, native);
  }
  const n = join(dir, 'n');
  for (const image of ['f.qcow2', 'p.qcow2', 's.qcow2', 'i.qcow2', 'd.qcow2', 'k.qcow2']) {
    assert.equal(qemuCheck(image, n).code, 0, `qemu-img check ${image}`);
    assert.equal(qemuCompare('../in.raw', image, n).code, 0, `qemu-img compare in.raw ${image}`);
  }
  for (const file of ['f.qcow2', 'f.data', 'p.qcow2', 'p.data', 's.qcow2', 's.data', 'e.raw', 'i.qcow2', 'd.qcow2', 'k.qcow2']) sameBytes(join(dir, 'n', file), join(dir, 'j', file));
  const exported = readFileSync(join(n, 'e.raw'));
  assert.ok(exported.subarray(0, size).equals(readFileSync(join(dir, 'in.raw'))));
  assert.ok(exported.subarray(size).every((b) => b === 0), 'the sector tail is zeros');
});

/** A FIFO with a writer that never writes (opened read-write, so opening it never waits). */
function quietFifo(dir: string): { path: string; close(): void } {
  const path = join(dir, 'quiet.fifo');
  assert.equal(spawnSync('mkfifo', [path]).status, 0);
  const fd = openSync(path, constants.O_RDWR);
  return { path, close: () => closeSync(fd) };
}

/** Settles with the promise, or rejects when it has not settled within `ms` (a hang, not a slow run). */
function within<T>(promise: Promise<T>, ms: number): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const hang = new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`still pending after ${ms} ms`)), ms)));
  return Promise.race([promise, hang]).finally(() => clearTimeout(timer));
}

for (const native of [true, false]) {
  test(`convert() from a FIFO whose writer stays quiet ends on abort (${native ? 'addon' : 'no addon'}), five times in a row`, async (t) => {
    const dir = tempDir(t);
    const fifo = quietFifo(dir);
    t.after(() => fifo.close());
    const saved = process.env[NO_NATIVE_ENV];
    process.env[NO_NATIVE_ENV] = native ? '' : '1';
    try {
      // Five blocked reads cancelled one after another: a read left blocked on the thread pool
      // (4 threads) would starve the ones after it, and the last would never start.
      for (let i = 0; i < 5; i++) {
        const controller = new AbortController();
        const run = convert({ input: fifo.path, output: join(dir, `q${i}.qcow2`), dataFile: join(dir, `q${i}.data`), signal: controller.signal });
        setTimeout(() => controller.abort(), 100);
        await assert.rejects(within(run, 10_000), { code: 'QCOW_ERR_ABORTED' });
      }
    } finally {
      if (saved === undefined) delete process.env[NO_NATIVE_ENV];
      else process.env[NO_NATIVE_ENV] = saved;
    }
    assert.deepEqual(
      spawnSync('ls', ['-A', dir], { encoding: 'utf8' }).stdout.split('\n').filter(Boolean),
      ['quiet.fifo'],
      'no output is left behind',
    );
  });
}

test('a native read blocked on a quiet pipe, and a write blocked on a full one, end when cancelled', { skip: !nativePipeIoAvailable() }, async (t) => {
  const dir = tempDir(t);
  const fifo = quietFifo(dir);
  t.after(() => fifo.close());
  const readFd = openSync(fifo.path, constants.O_RDONLY | constants.O_NONBLOCK);
  const reader = nativePipeReader(readFd, 'the FIFO', { ownsFd: true })!;
  const reading = reader.read(new Uint8Array(MiB), 0, MiB);
  setTimeout(() => void reader.close(), 100);
  await assert.rejects(within(reading, 10_000), { code: 'QCOW_ERR_ABORTED' });

  // Nobody reads this FIFO (our own read-write descriptor keeps it open): the pipe fills.
  const writeFd = openSync(fifo.path, constants.O_WRONLY | constants.O_NONBLOCK);
  const writer = nativePipeWriter(writeFd, 'the FIFO', { ownsFd: true })!;
  const writing = writer.write(new Uint8Array(8 * MiB));
  setTimeout(() => writer.cancel(), 100);
  await assert.rejects(within(writing, 10_000), { code: 'QCOW_ERR_ABORTED' });
  await writer.close();

  // A splice into the same full FIFO ends the same way.
  writeRawImage(join(dir, 'src.raw'), 8 * MiB, [{ offset: 0, length: 8 * MiB, kind: 'random' }]);
  const source = openSync(join(dir, 'src.raw'), 'r');
  t.after(() => closeSync(source));
  const spliceFd = openSync(fifo.path, constants.O_WRONLY | constants.O_NONBLOCK);
  const splicer = nativePipeWriter(spliceFd, 'the FIFO', { ownsFd: true })!;
  assert.ok(splicer.canSplice, 'the addon splices into a FIFO');
  const splicing = splicer.spliceFrom({ fd: source, name: 'src.raw' }, 0, 8 * MiB);
  setTimeout(() => splicer.cancel(), 100);
  await assert.rejects(within(splicing, 10_000), { code: 'QCOW_ERR_ABORTED' });
  await splicer.close();
});

test('OffsetWriter.copyFrom: spliced into a pipe and read-and-written into a Writable, the same bytes; a short source says so', { skip: !nativePipeIoAvailable() }, async (t) => {
  const dir = tempDir(t);
  const size = 5 * MiB + 123;
  writeRawImage(join(dir, 'src.raw'), size, mixedExtents(size, 65536, 3), 3);
  const expected = readFileSync(join(dir, 'src.raw'));
  const source = { fd: openSync(join(dir, 'src.raw'), 'r'), name: 'src.raw' };
  t.after(() => closeSync(source.fd));
  // What each output should hold: 100 zeros, src[7, 7 + 3 MiB), then the rest of src from 3 MiB + 7 (short: the file ends).
  const want = Buffer.concat([Buffer.alloc(100), expected.subarray(7, 7 + 3 * MiB), expected.subarray(3 * MiB + 7)]);
  const write = async (output: OffsetWriter) => {
    assert.equal(await output.copyFrom(source, 7, 100, 3 * MiB), 3 * MiB);
    assert.equal(await output.copyFrom(source, 3 * MiB + 7, 100 + 3 * MiB, 4 * MiB), size - 3 * MiB - 7, 'fewer bytes where the source ends');
    await output.finish(want.length);
    await output.commit();
  };
  // A FIFO: a child reads it into a file.
  const fifo = join(dir, 'out.fifo');
  assert.equal(spawnSync('mkfifo', [fifo]).status, 0);
  const reader = spawn('bash', ['-c', `cat '${fifo}' > '${join(dir, 'piped.out')}'`], { stdio: 'ignore' });
  const pipeOutput = await OffsetWriter.create(fifo, { label: 'test pipe' });
  assert.ok(pipeOutput.canSplice, 'a pipe output splices');
  await write(pipeOutput);
  await once(reader, 'close');
  // A Writable cannot take spliced pages: the same bytes go through a buffer.
  const chunks: Buffer[] = [];
  const writable = new Writable({ write: (chunk: Buffer, _e, done) => (chunks.push(Buffer.from(chunk)), done()) });
  const bufferOutput = await OffsetWriter.create(writable, { label: 'test writable' });
  assert.equal(bufferOutput.canSplice, false);
  await write(bufferOutput);
  assert.ok(readFileSync(join(dir, 'piped.out')).equals(want), 'the pipe got the bytes');
  assert.ok(Buffer.concat(chunks).equals(want), 'the Writable got the bytes');
});

test('a reader that goes away ends an export to a pipe with an error, not a hang', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  const size = 8 * MiB;
  writeRawImage(join(dir, 'in.raw'), size, [{ offset: 0, length: size, kind: 'random' }], 3);
  sh(`${cli} convert --quiet --no-sync in.raw img.qcow2`, dir, true);
  for (const native of [true, false]) {
    const env = { ...process.env, [NO_NATIVE_ENV]: native ? '' : '1' };
    const result = spawnSync('bash', ['-c', `${cli} export img.qcow2 - | head -c 1000 > /dev/null; echo "\${PIPESTATUS[0]}"`], { cwd: dir, env, encoding: 'utf8', timeout: 60_000 });
    assert.equal(result.signal, null, 'the export hung');
    const status = Number(result.stdout.trim());
    // A closed pipe ends the export: with an error (2), or quietly like `cat` (0, EPIPE-safe stdout).
    assert.ok(status === 2 || status === 0, `export exited with ${status}: ${result.stderr}`);
  }
});
