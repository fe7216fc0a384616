/**
 * A name stored in an image is checked by the path policy and then opened; a symlink swapped
 * in between (over the file, or over a directory on the way) must never win: what was opened
 * is confirmed (src/io/path-policy.ts confirmOpened). A racer process swaps the stored names
 * for symlinks to an outside file, an outside directory and a device as fast as it can while
 * exports run; every export either fails with a typed error or reads the real bytes, never the
 * outside ones. The long mode (QCOW2_STREAM_LONG=1) runs enough trials to have caught the old
 * rate (93 of 1,200 exports read the outside file).
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { mkdirSync, readFileSync, renameSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { openImage, openSeekable } from '../../src/read/image.js';
import { resolveStoredName } from '../../src/io/path-policy.js';
import { exportToFile } from '../../src/read/export.js';
import { isQcow2StreamError } from '../../src/errors.js';
import { needQemu, qemuImg, tempDir } from '../helpers/qemu.js';
import { repetitions } from '../helpers/long.js';

const KiB = 1024;

/**
 * Swaps `target` between its real entry and a symlink to `outside` until killed: the real
 * entry steps aside to `keep`, a symlink takes its name, then the real entry takes it back.
 */
const RACER = `
const fs = require('node:fs');
const [target, keep, outside] = process.argv.slice(1);
const link = keep + '.link';
for (;;) {
  try {
    fs.renameSync(target, keep);
    fs.rmSync(link, { force: true });
    fs.symlinkSync(outside, link);
    fs.renameSync(link, target);
    fs.renameSync(keep, target);
  } catch {}
}`;

interface Variant {
  name: string;
  /** Builds the image and returns [entry to swap, the real entry's spare name, outside target]. */
  setup(dir: string, outsideDir: string): [string, string, string];
}

const secret = Buffer.alloc(256 * KiB, 0x5e);
const inside = Buffer.alloc(256 * KiB, 0x11);

const variants: Variant[] = [
  {
    name: 'the data file swapped for a symlink to an outside file',
    setup(dir, outsideDir) {
      writeFileSync(join(outsideDir, 'secret.data'), secret);
      qemuImg(['create', '-f', 'qcow2', '-o', 'data_file=d.data,data_file_raw=on', 'img.qcow2', '256K'], dir);
      writeFileSync(join(dir, 'd.data'), inside);
      return [join(dir, 'd.data'), join(dir, 'd.keep'), join(outsideDir, 'secret.data')];
    },
  },
  {
    name: 'a directory on the way to the data file swapped for a symlink to an outside directory',
    setup(dir, outsideDir) {
      mkdirSync(join(outsideDir, 'sub'));
      writeFileSync(join(outsideDir, 'sub', 'd.data'), secret);
      mkdirSync(join(dir, 'sub'));
      qemuImg(['create', '-f', 'qcow2', '-o', 'data_file=sub/d.data,data_file_raw=on', 'img.qcow2', '256K'], dir);
      writeFileSync(join(dir, 'sub', 'd.data'), inside);
      return [join(dir, 'sub'), join(dir, 'sub.keep'), join(outsideDir, 'sub')];
    },
  },
  {
    name: 'the backing file swapped for a symlink to an outside file',
    setup(dir, outsideDir) {
      writeFileSync(join(outsideDir, 'secret.raw'), secret);
      writeFileSync(join(dir, 'b.raw'), inside);
      qemuImg(['create', '-f', 'qcow2', '-b', 'b.raw', '-F', 'raw', 'img.qcow2', '256K'], dir);
      return [join(dir, 'b.raw'), join(dir, 'b.keep'), join(outsideDir, 'secret.raw')];
    },
  },
  {
    name: 'the data file swapped for a symlink to a device',
    setup(dir) {
      qemuImg(['create', '-f', 'qcow2', '-o', 'data_file=d.data,data_file_raw=on', 'img.qcow2', '256K'], dir);
      writeFileSync(join(dir, 'd.data'), inside);
      return [join(dir, 'd.data'), join(dir, 'd.keep'), '/dev/zero'];
    },
  },
];

for (const variant of variants) {
  test(`symlink race: ${variant.name}`, async (t) => {
    if (!needQemu(t)) return;
    const root = tempDir(t);
    const dir = join(root, 'images');
    const outsideDir = join(root, 'outside');
    mkdirSync(dir);
    mkdirSync(outsideDir);
    const [target, keep, outside] = variant.setup(dir, outsideDir);
    const racer = spawn(process.execPath, ['-e', RACER, target, keep, outside], { stdio: 'ignore' });
    const stopped = once(racer, 'exit');
    try {
      await trialsAgainst(root, dir, inside);
    } finally {
      racer.kill('SIGKILL');
      await stopped; // before the temporary directory is removed
    }
  });
}

async function trialsAgainst(root: string, dir: string, inside: Buffer): Promise<void> {
  const trials = repetitions(60, 600);
  let leaked = 0;
  let exported = 0;
    for (let i = 0; i < trials; i++) {
      const out = join(root, `out${i}.raw`);
      try {
        const image = await openImage(join(dir, 'img.qcow2'));
        try {
          await exportToFile(image, out, { sync: false });
        } finally {
          await image.close();
        }
      } catch (err) {
        assert.ok(isQcow2StreamError(err), `an untyped failure: ${String(err)}`);
        continue;
      }
      exported++;
      const bytes = readFileSync(out);
      if (!bytes.equals(inside)) leaked++;
    }
    assert.equal(leaked, 0, `${leaked} of ${exported} exports read something other than the image's own file`);
}

test('a swap between the policy check and the open is refused (deterministic)', async (t) => {
  const root = tempDir(t);
  const dir = join(root, 'images');
  const outsideDir = join(root, 'outside');
  mkdirSync(dir);
  mkdirSync(outsideDir);
  writeFileSync(join(outsideDir, 'secret.data'), secret);
  writeFileSync(join(dir, 'd.data'), inside);
  mkdirSync(join(dir, 'sub'));
  writeFileSync(join(dir, 'sub', 'd.data'), inside);
  mkdirSync(join(outsideDir, 'sub'));
  writeFileSync(join(outsideDir, 'sub', 'd.data'), secret);
  const image = join(dir, 'img.qcow2');
  const moveAside = (entry: string, to: string) => () => {
    renameSync(join(dir, entry), join(dir, `${entry}.keep`));
    symlinkSync(to, join(dir, entry));
  };
  const putBack = (entry: string) => () => {
    rmSync(join(dir, entry));
    renameSync(join(dir, `${entry}.keep`), join(dir, entry));
  };
  const cases = [
    { name: 'd.data', swap: moveAside('d.data', join(outsideDir, 'secret.data')), restore: putBack('d.data'), outside: true },
    { name: 'sub/d.data', swap: moveAside('sub', join(outsideDir, 'sub')), restore: putBack('sub'), outside: true },
    { name: 'd.data', swap: moveAside('d.data', '/dev/zero'), restore: putBack('d.data'), outside: false },
  ];
  for (const { name, swap, restore, outside } of cases) {
    const resolved = await resolveStoredName(image, name, 'data file');
    swap();
    // Opened without confirmation, the swap wins: the outside file (or the device) is opened.
    const unconfirmed = await openSeekable(resolved, 'data file').catch((err: unknown) => err);
    if (outside) {
      assert.ok(!(unconfirmed instanceof Error), String(unconfirmed));
      const opened = unconfirmed as Awaited<ReturnType<typeof openSeekable>>;
      const head = Buffer.alloc(16);
      await opened.handle.read(head, 0, 16, 0);
      await opened.handle.close();
      assert.ok(head.equals(secret.subarray(0, 16)), 'the unconfirmed open did not reach the outside file');
    }
    await assert.rejects(openSeekable(resolved, 'data file', 'data file'), (err: unknown) => {
      assert.ok(isQcow2StreamError(err), String(err));
      return true;
    });
    restore();
  }
});
