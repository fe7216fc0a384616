import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { convert } from '../../src/write/convert.js';
import { AbortedError, FileError, InputSizeError, InvalidArgumentError, Qcow2StreamError } from '../../src/errors.js';
import { randomBytesAt } from '../helpers/images.js';
import { tempDir } from '../helpers/qemu.js';
import { KiB, MiB } from './helpers.js';

/** An input of `total` bytes in 64 KiB chunks that runs `before(i)` ahead of chunk i. */
async function* chunkedInput(total: number, before: (i: number) => void = () => {}): AsyncGenerator<Uint8Array> {
  for (let i = 0, pos = 0; pos < total; i++, pos += 64 * KiB) {
    before(i);
    await new Promise((resolve) => setImmediate(resolve));
    yield randomBytesAt(1, pos, Math.min(64 * KiB, total - pos));
  }
}

function listing(dir: string): string[] {
  return readdirSync(dir).sort();
}

test('input shorter or longer than the declared size: no output, no data file', async (t) => {
  const dir = tempDir(t);
  for (const [actual, declared] of [
    [3 * MiB, 3 * MiB + 1],
    [3 * MiB, 3 * MiB - 512],
  ] as const) {
    for (const dataFileRaw of [true, false]) {
      await assert.rejects(
        convert({ input: chunkedInput(actual), output: join(dir, 'out.qcow2'), size: declared, dataFileRaw }),
        (err: unknown) => err instanceof InputSizeError && err.expected === declared,
      );
      assert.deepEqual(listing(dir), []);
    }
  }
  // A regular file whose size differs from --size is refused before anything is created.
  writeFileSync(join(dir, 'in.raw'), Buffer.alloc(5000, 1));
  await assert.rejects(convert({ input: join(dir, 'in.raw'), output: join(dir, 'out.qcow2'), size: 4096 }), InputSizeError);
  assert.deepEqual(listing(dir), ['in.raw']);
});

test('a read error part-way leaves no output and removes the data file', async (t) => {
  const dir = tempDir(t);
  const failing = chunkedInput(8 * MiB, (i) => {
    if (i === 50) throw new Error('disk on fire');
  });
  await assert.rejects(convert({ input: failing, output: join(dir, 'out.qcow2') }), /disk on fire/);
  assert.deepEqual(listing(dir), []);
});

test('aborting through the signal part-way leaves nothing behind', async (t) => {
  const dir = tempDir(t);
  const controller = new AbortController();
  const input = chunkedInput(8 * MiB, (i) => {
    if (i === 20) controller.abort();
  });
  await assert.rejects(convert({ input, output: join(dir, 'out.qcow2'), size: 8 * MiB, signal: controller.signal }), AbortedError);
  assert.deepEqual(listing(dir), []);
  // An input that never sends anything more (a quiet pipe) is interrupted too.
  const quiet = new AbortController();
  const stalled = (async function* () {
    yield new Uint8Array(1000);
    await new Promise(() => {});
  })();
  setTimeout(() => quiet.abort(), 50);
  await assert.rejects(convert({ input: stalled, output: join(dir, 'out.qcow2'), signal: quiet.signal }), AbortedError);
  assert.deepEqual(listing(dir), []);
});

test('a write error on the data file leaves no metadata file', async (t) => {
  const dir = tempDir(t);
  let written = 0;
  const broken = new Writable({
    write(chunk: Buffer, _e, cb) {
      written += chunk.length;
      cb(written > 2 * MiB ? new Error('device full') : null);
    },
  });
  await assert.rejects(
    convert({ input: chunkedInput(8 * MiB), output: join(dir, 'out.qcow2'), dataFile: broken, dataFileName: 'x.data' }),
    /device full/,
  );
  assert.deepEqual(listing(dir), []);
});

test('an existing data file is never replaced by surprise; overwrite replaces it', async (t) => {
  const dir = tempDir(t);
  const raw = join(dir, 'in.raw');
  writeFileSync(raw, randomBytesAt(2, 0, 10_000));
  writeFileSync(join(dir, 'out.data'), 'precious');
  await assert.rejects(convert({ input: raw, output: join(dir, 'out.qcow2') }), (err: unknown) => {
    assert.ok(err instanceof FileError);
    assert.match(err.hint ?? '', /--force/);
    return true;
  });
  assert.equal(readFileSync(join(dir, 'out.data'), 'utf8'), 'precious');
  assert.deepEqual(listing(dir), ['in.raw', 'out.data']);
  await convert({ input: raw, output: join(dir, 'out.qcow2'), overwrite: true });
  assert.equal(readFileSync(join(dir, 'out.data')).length, 10_240);
});

test('a data file or output naming the input is refused and the input is untouched', async (t) => {
  const dir = tempDir(t);
  const raw = join(dir, 'in.raw');
  const content = randomBytesAt(3, 0, 20_000);
  writeFileSync(raw, content);
  for (const options of [
    { dataFile: raw, overwrite: true },
    { dataFile: join(dir, '.', 'sub', '..', 'in.raw'), overwrite: true },
    { dataFile: join(dir, 'x.data'), output: raw },
  ]) {
    await assert.rejects(convert({ input: raw, output: join(dir, 'out.qcow2'), ...options }), InvalidArgumentError);
    assert.deepEqual(readFileSync(raw), content);
    assert.deepEqual(listing(dir), ['in.raw']);
  }
  await assert.rejects(convert({ input: raw, output: join(dir, 'same'), dataFile: join(dir, 'same') }), InvalidArgumentError);
  assert.deepEqual(listing(dir), ['in.raw']);
});

test('bad options are refused before anything is created, with useful messages', async (t) => {
  const dir = tempDir(t);
  const raw = join(dir, 'in.raw');
  writeFileSync(raw, Buffer.alloc(1000));
  const output = join(dir, 'out.qcow2');
  for (const clusterSize of [256, 1000, 4 * MiB, 0]) {
    await assert.rejects(convert({ input: raw, output, clusterSize }), /cluster size/);
  }
  for (const refcountBits of [0, 3, 128]) {
    await assert.rejects(convert({ input: raw, output, refcountBits }), /refcount width/);
  }
  await assert.rejects(convert({ input: chunkedInput(0), output, size: 200 * 1024 ** 3, clusterSize: 512 }), (err: unknown) => {
    assert.ok(err instanceof InvalidArgumentError);
    assert.match(err.message, /too large for 512-byte clusters/);
    assert.match(err.hint ?? '', /--cluster-size 1024/);
    return true;
  });
  await assert.rejects(convert({ input: join(dir, 'missing.raw'), output }), (err: unknown) => err instanceof FileError && /no such file/.test(err.message));
  await assert.rejects(convert({ input: raw, output: '-' }), /data-file/);
  await assert.rejects(convert({ input: raw, output, dataFileName: 'x'.repeat(70_000) }), InvalidArgumentError);
  assert.deepEqual(listing(dir), ['in.raw']);
});

test('every failure is a Qcow2StreamError or the caller’s own error', async (t) => {
  const dir = tempDir(t);
  const err = await convert({ input: join(dir, 'nope'), output: join(dir, 'o') }).catch((e: unknown) => e);
  assert.ok(err instanceof Qcow2StreamError);
  assert.equal(err.code, 'QCOW_ERR_FILE');
});
