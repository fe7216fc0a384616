/**
 * Durability: before a conversion, wrap or export reports success, every file it wrote is on
 * stable storage. Observed through the file layer: each output's temporary file is fsynced after
 * its last write and length change and before its rename, then its directory is fsynced once the
 * new name is in it, and all of those fsyncs have completed before the promise resolves.
 * `sync: false` opts out; a stream has nothing to fsync.
 */

import { test, mock, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { createReadStream, existsSync, fstatSync, rmSync, statSync } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { convert } from '../../src/write/convert.js';
import { wrap } from '../../src/write/wrap.js';
import { openImage } from '../../src/read/image.js';
import { exportToFile } from '../../src/read/export.js';
import { mixedExtents, writeRawImage } from '../helpers/images.js';
import { tempDir } from '../helpers/qemu.js';
import { fileHandlePrototype, interceptNativeCopies, pathOfHandle, type FaultableMethod } from './faults.js';

const MiB = 1024 * 1024;
const SIZE = 12 * MiB;

interface FileEvent {
  what: FaultableMethod | 'sync done' | 'resolved';
  path: string;
  /** For fsyncs: the file's size then, and which of the watched final names existed. */
  size?: number;
  existing?: string[];
}

/**
 * Logs writes, length changes and fsyncs on every handle in `dir` (the directory's own handle
 * included), and the moment each fsync completes.
 */
async function watchFiles(t: TestContext, dir: string, finals: readonly string[]): Promise<FileEvent[]> {
  type Method = (this: FileHandle, ...args: unknown[]) => Promise<unknown>;
  const proto = (await fileHandlePrototype()) as Record<FaultableMethod, Method>;
  const events: FileEvent[] = [];
  for (const method of ['writev', 'truncate', 'sync', 'datasync'] as const) {
    const original = proto[method];
    const patched = mock.method(proto, method, function (this: FileHandle, ...args: unknown[]): Promise<unknown> {
      const path = pathOfHandle(this);
      if (path !== dir && !path.startsWith(`${dir}/`)) return original.apply(this, args);
      if (method !== 'sync' && method !== 'datasync') {
        events.push({ what: method, path });
        return original.apply(this, args);
      }
      events.push({ what: method, path, size: fstatSync(this.fd).size, existing: finals.filter((name) => existsSync(join(dir, name))) });
      return original.apply(this, args).then((value) => {
        events.push({ what: 'sync done', path });
        return value;
      });
    });
    t.after(() => patched.mock.restore());
  }
  // A native copy writes the data file from the thread pool: it counts as a writev.
  interceptNativeCopies(t, (as, path) => {
    if (as === 'writev' && (path === dir || path.startsWith(`${dir}/`))) events.push({ what: 'writev', path });
    return undefined;
  });
  return events;
}

const isTemporaryOf = (dir: string, final: string) => (path: string) => path.startsWith(`${dir}/.${final}.`) && path.endsWith('.partial');

/**
 * For each output, in commit order: its temporary file fsynced after its last write, at its
 * final size, before the final name existed; then the directory fsynced with the name in it;
 * every fsync completed before the promise resolved.
 */
function assertDurable(events: readonly FileEvent[], dir: string, finals: readonly string[]): void {
  const resolved = events.findIndex((e) => e.what === 'resolved');
  assert.ok(resolved > 0);
  let previousDirectorySync = -1;
  for (const final of finals) {
    const isTemp = isTemporaryOf(dir, final);
    const fileSync = events.findIndex((e) => (e.what === 'sync' || e.what === 'datasync') && isTemp(e.path));
    assert.ok(fileSync >= 0, `${final} was never fsynced: ${JSON.stringify(events.filter((e) => e.what !== 'writev'))}`);
    const lastChange = events.reduce((last, e, i) => ((e.what === 'writev' || e.what === 'truncate') && isTemp(e.path) ? i : last), -1);
    assert.ok(lastChange >= 0 && lastChange < fileSync, `${final} was written after its fsync`);
    const synced = events[fileSync]!;
    assert.equal(synced.size, statSync(join(dir, final)).size, `${final} was fsynced before it was complete`);
    assert.ok(!synced.existing!.includes(final), `${final} had its final name before its fsync`);
    const directorySync = events.findIndex((e, i) => i > fileSync && e.what === 'sync' && e.path === dir);
    assert.ok(directorySync > previousDirectorySync, `no directory fsync after ${final} was renamed`);
    assert.ok(events[directorySync]!.existing!.includes(final), `the directory was fsynced before ${final} was renamed into it`);
    for (const start of [fileSync, directorySync]) {
      const done = events.findIndex((e, i) => i > start && e.what === 'sync done' && e.path === events[start]!.path);
      assert.ok(done > 0 && done < resolved, `an fsync of ${events[start]!.path} completed after the promise resolved`);
    }
    previousDirectorySync = directorySync;
  }
}

function makeInput(dir: string): string {
  const path = join(dir, 'in.raw');
  writeRawImage(path, SIZE, mixedExtents(SIZE, 65536, 3), 3);
  return path;
}

interface Case {
  title: string;
  /** Final names, in the order they are committed. */
  finals: string[];
  run(dir: string, input: string, sync: boolean | undefined): Promise<unknown>;
}

const CASES: Case[] = [
  {
    title: 'convert (data file, then metadata streamed)',
    finals: ['out.data', 'out.qcow2'],
    run: (dir, input, sync) => convert({ input, output: join(dir, 'out.qcow2'), ...(sync === undefined ? {} : { sync }) }),
  },
  {
    title: 'convert of a stream (metadata at the end)',
    finals: ['out.data', 'out.qcow2'],
    run: (dir, input, sync) =>
      convert({ input: createReadStream(input), output: join(dir, 'out.qcow2'), dataFile: join(dir, 'out.data'), ...(sync === undefined ? {} : { sync }) }),
  },
  {
    title: 'convert to the internal layout',
    finals: ['out.qcow2'],
    run: (dir, input, sync) => convert({ input, output: join(dir, 'out.qcow2'), layout: 'internal', ...(sync === undefined ? {} : { sync }) }),
  },
  {
    title: 'wrap',
    finals: ['out.qcow2'],
    run: (dir, input, sync) => wrap({ input, output: join(dir, 'out.qcow2'), dataFileName: 'in.raw', ...(sync === undefined ? {} : { sync }) }),
  },
];

for (const { title, finals, run } of CASES) {
  test(`${title}: every output fsynced, then renamed, then its directory fsynced, before success`, async (t) => {
    const dir = tempDir(t);
    const input = makeInput(dir);
    const events = await watchFiles(t, dir, finals);
    await run(dir, input, undefined);
    events.push({ what: 'resolved', path: '' });
    assertDurable(events, dir, finals);
  });
}

test('a manifest written with a conversion is durable too, committed after the image', async (t) => {
  const dir = tempDir(t);
  const input = makeInput(dir);
  const finals = ['out.data', 'out.qcow2', 'out.xxh'];
  const events = await watchFiles(t, dir, finals);
  await convert({ input, output: join(dir, 'out.qcow2'), manifest: join(dir, 'out.xxh') });
  events.push({ what: 'resolved', path: '' });
  assertDurable(events, dir, finals);
});

test('an export to a file is fsynced, renamed, and its directory fsynced before success', async (t) => {
  const dir = tempDir(t);
  const input = makeInput(dir);
  await convert({ input, output: join(dir, 'img.qcow2'), sync: false });
  const image = await openImage(join(dir, 'img.qcow2'));
  try {
    const events = await watchFiles(t, dir, ['out.raw']);
    await exportToFile(image, join(dir, 'out.raw'));
    events.push({ what: 'resolved', path: '' });
    assertDurable(events, dir, ['out.raw']);
  } finally {
    await image.close();
  }
});

test('sync: false makes no fsync at all', async (t) => {
  const dir = tempDir(t);
  const input = makeInput(dir);
  const events = await watchFiles(t, dir, []);
  for (const { run, finals } of CASES) {
    await run(dir, input, false);
    for (const final of finals) rmSync(join(dir, final));
  }
  await convert({ input, output: join(dir, 'out.qcow2'), manifest: join(dir, 'out.xxh'), sync: false });
  const image = await openImage(join(dir, 'out.qcow2'));
  try {
    await exportToFile(image, join(dir, 'out.raw'), { sync: false });
  } finally {
    await image.close();
  }
  assert.ok(existsSync(join(dir, 'out.xxh')) && existsSync(join(dir, 'out.raw')));
  assert.deepEqual(
    events.filter((e) => e.what === 'sync' || e.what === 'datasync'),
    [],
  );
  assert.ok(events.some((e) => e.what === 'writev'), 'the watch saw the writes');
});

test('metadata to a stream: only the data file (and its directory) is fsynced', async (t) => {
  const dir = tempDir(t);
  const input = makeInput(dir);
  const events = await watchFiles(t, dir, ['out.data']);
  let metadataBytes = 0;
  const sink = new Writable({
    write(chunk: Buffer, _encoding, callback) {
      metadataBytes += chunk.length;
      callback();
    },
  });
  await convert({ input, output: sink, dataFile: join(dir, 'out.data') });
  events.push({ what: 'resolved', path: '' });
  assert.ok(metadataBytes > 0);
  assertDurable(events, dir, ['out.data']);
  assert.equal(events.filter((e) => e.what === 'sync').length, 2, 'one fsync of the data file, one of the directory');
});
