/**
 * A regular-file input that gets shorter while it is converted is an error (InputSizeError),
 * never an image with the lost part as zeros: the hole probe sees a file cut short as one long
 * hole, so a plan made after the cut used to turn the tail into a zero run and exit 0.
 */

import { test, mock, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { readdirSync, truncateSync } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import { PassThrough, type Writable } from 'node:stream';
import { convert } from '../../src/write/convert.js';
import { isQcow2StreamError } from '../../src/errors.js';
import { nativeAddon, type NativeAddon } from '../../src/io/native.js';
import { writeRawImage } from '../helpers/images.js';
import { tempDir } from '../helpers/qemu.js';
import { fileHandlePrototype, pathOfHandle, pathOfFd } from '../robustness/faults.js';
import { withoutNative } from './helpers.js';

const MiB = 2 ** 20;

/** 24 MiB of data (more reads than are planned ahead), a 40 MiB hole, 1 MiB of data at the end. */
function input(dir: string): string {
  const path = join(dir, 'in.raw');
  writeRawImage(path, 65 * MiB, [
    { offset: 0, length: 24 * MiB, kind: 'random' },
    { offset: 64 * MiB, length: MiB, kind: 'random' },
  ]);
  return path;
}

async function assertShrinkRefused(dir: string, path: string, layout: 'external' | 'internal', output: string | Writable = join(dir, 'out.qcow2')): Promise<void> {
  await assert.rejects(convert({ input: path, output, layout, sync: false }), (err: unknown) => {
    assert.ok(isQcow2StreamError(err), String(err));
    assert.equal(err.code, 'QCOW_ERR_INPUT_SIZE', err.message);
    assert.match(err.message, /shrank while it was read/);
    return true;
  });
  assert.deepEqual(readdirSync(dir).sort(), ['in.raw']);
}

for (const layout of ['external', 'internal'] as const) {
  test(`a file cut short during the first reads fails the conversion (Blocks path, ${layout})`, async (t) => {
    const dir = tempDir(t);
    const path = input(dir);
    type Read = (this: FileHandle, ...args: unknown[]) => Promise<unknown>;
    const proto = (await fileHandlePrototype()) as Record<'read', Read>;
    const original = proto.read;
    let cut = false;
    const patched = mock.method(proto, 'read', function (this: FileHandle, ...args: unknown[]) {
      // The input probe's reads (4 KiB at the start, the last sector) come first; cut at the conversion's.
      if (!cut && pathOfHandle(this) === path && Number(args[2]) > 4096) {
        cut = true;
        truncateSync(path, 24 * MiB);
      }
      return original.apply(this, args);
    });
    t.after(() => patched.mock.restore());
    await withoutNative(() => assertShrinkRefused(dir, path, layout));
    assert.ok(cut);
  });
}

/** Cuts `path` to 24 MiB at the first native copyClusters call reading it that `when` accepts; true once it has. */
function cutOnFirstNativeCopy(t: TestContext, path: string, when: (args: Parameters<NativeAddon['copyClusters']>) => boolean = () => true): () => boolean {
  const addon = nativeAddon()!;
  const copy = addon.copyClusters;
  let cut = false;
  const patched = mock.method(addon, 'copyClusters', (...args: Parameters<typeof copy>) => {
    if (!cut && pathOfFd(args[0]) === path && when(args)) {
      cut = true;
      truncateSync(path, 24 * MiB);
    }
    return copy.apply(addon, args);
  });
  t.after(() => patched.mock.restore());
  return () => cut;
}

test('a file cut short during the first native copies fails the conversion', { skip: nativeAddon() ? false : 'the native addon is not built' }, async (t) => {
  const dir = tempDir(t);
  const path = input(dir);
  const cut = cutOnFirstNativeCopy(t, path);
  await assertShrinkRefused(dir, path, 'external');
  assert.ok(cut());
});

test('a file cut short during the native scan of a single-file image to a stream fails the conversion', { skip: nativeAddon() ? false : 'the native addon is not built' }, async (t) => {
  const dir = tempDir(t);
  const path = input(dir);
  // The scan reads and checks only: no destination.
  const cut = cutOnFirstNativeCopy(t, path, (args) => args[2] === -1);
  const output = new PassThrough();
  output.resume();
  await assertShrinkRefused(dir, path, 'internal', output);
  assert.ok(cut(), 'the scan ran');
});
