/**
 * The path policy for names stored inside images: unit cases on resolveStoredName, then images
 * made by qemu whose data-file and backing names point where they must not.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { linkSync, mkdirSync, readFileSync, realpathSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { resolveStoredName } from '../../src/io/path-policy.js';
import { openImage } from '../../src/read/image.js';
import { isQcow2StreamError } from '../../src/errors.js';
import { needQemu, tempDir } from '../helpers/qemu.js';
import { img, io, replaceStoredName } from '../read/fixtures.js';

function layout(dir: string): { image: string; outside: string } {
  mkdirSync(join(dir, 'images', 'sub'), { recursive: true });
  mkdirSync(join(dir, 'elsewhere'));
  writeFileSync(join(dir, 'images', 'disk.data'), 'data');
  writeFileSync(join(dir, 'images', 'sub', 'nested.data'), 'data');
  writeFileSync(join(dir, 'images', 'backup:1.raw'), 'data');
  writeFileSync(join(dir, 'elsewhere', 'secret'), 'secret');
  symlinkSync('disk.data', join(dir, 'images', 'inner-link'));
  symlinkSync('../elsewhere/secret', join(dir, 'images', 'escape-link'));
  execFileSync('mkfifo', [join(dir, 'images', 'pipe')]);
  return { image: join(dir, 'images', 'disk.qcow2'), outside: join(dir, 'elsewhere', 'secret') };
}

async function refused(image: string, name: string, why: RegExp, allowUnsafePaths = false): Promise<void> {
  await assert.rejects(resolveStoredName(image, name, 'data file', { allowUnsafePaths }), (err: unknown) => {
    assert.ok(isQcow2StreamError(err));
    assert.equal(err.code, 'QCOW_ERR_PATH_POLICY');
    assert.match(err.message, why);
    assert.match(err.hint ?? '', /--data-file/);
    assert.match(err.hint ?? '', /--allow-unsafe-paths/);
    return true;
  });
}

test('names inside the image directory resolve to their real path', async (t) => {
  const dir = tempDir(t);
  const { image } = layout(dir);
  const images = realpathSync(join(dir, 'images'));
  assert.equal(await resolveStoredName(image, 'disk.data', 'data file'), join(images, 'disk.data'));
  assert.equal(await resolveStoredName(image, 'sub/nested.data', 'data file'), join(images, 'sub', 'nested.data'));
  assert.equal(await resolveStoredName(image, './sub/../disk.data', 'data file'), join(images, 'disk.data'));
  assert.equal(await resolveStoredName(image, 'inner-link', 'data file'), join(images, 'disk.data'));
  assert.equal(await resolveStoredName(image, join(images, 'disk.data'), 'data file'), join(images, 'disk.data'));
  // A plain file whose name merely looks like a protocol is fine.
  assert.equal(await resolveStoredName(image, 'backup:1.raw', 'data file'), join(images, 'backup:1.raw'));
});

test('escapes, protocols, special files and bad bytes are refused with a reason and a hint', async (t) => {
  const dir = tempDir(t);
  const { image, outside } = layout(dir);
  await refused(image, outside, /absolute path outside the image directory/);
  await refused(image, '../elsewhere/secret', /escapes the image directory/);
  await refused(image, 'sub/../../elsewhere/secret', /escapes the image directory/);
  await refused(image, 'escape-link', /symbolic link .* outside the image directory/);
  await refused(image, 'pipe', /not a regular file \(it is a FIFO\)/);
  await refused(image, 'sub', /not a regular file/);
  await refused(image, 'json:{"driver":"file","filename":"/etc/passwd"}', /json:/);
  await refused(image, 'nbd:localhost:10809', /protocol/);
  await refused(image, 'file:disk.data', /protocol/);
  await refused(image, 'disk.data\0.txt', /NUL/);
  await refused(image, 'disk\uFFFD.data', /not valid UTF-8/);
  await refused(image, 'missing.data', /does not exist/);
  await refused(image, '', /empty/);
});

test('allowUnsafePaths lets local paths out of the directory but never json:, NUL or FIFOs', async (t) => {
  const dir = tempDir(t);
  const { image, outside } = layout(dir);
  const real = realpathSync(outside);
  assert.equal(await resolveStoredName(image, outside, 'data file', { allowUnsafePaths: true }), real);
  assert.equal(await resolveStoredName(image, '../elsewhere/secret', 'data file', { allowUnsafePaths: true }), real);
  assert.equal(await resolveStoredName(image, 'escape-link', 'data file', { allowUnsafePaths: true }), real);
  await refused(image, 'json:{}', /json:/, true);
  await refused(image, 'pipe', /FIFO/, true);
  await refused(image, 'a\0b', /NUL/, true);
});

test('images made by qemu naming files outside their directory are refused; explicit files are used', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  mkdirSync(join(dir, 'sub'));
  // Absolute data-file name outside the image directory.
  img(dir, 'create', '-f', 'qcow2', '-o', `data_file=${join(dir, 'abs.data')}`, join('sub', 'abs.qcow2'), '1M');
  io(dir, join('sub', 'abs.qcow2'), 'write -P 0x11 0 64k');
  // A relative '..' name (qemu resolves it against its CWD, so run it from sub/).
  img(join(dir, 'sub'), 'create', '-f', 'qcow2', '-o', 'data_file=../up.data', 'up.qcow2', '1M');
  // A backing file outside the directory.
  img(dir, 'create', '-f', 'qcow2', 'base.qcow2', '1M');
  img(join(dir, 'sub'), 'create', '-f', 'qcow2', '-b', '../base.qcow2', '-F', 'qcow2', 'over.qcow2', '1M');
  // A json: data-file name, patched into the header.
  const json = 'json:{"driver":"file","filename":"/etc/hostname"}';
  img(join(dir, 'sub'), 'create', '-f', 'qcow2', '-o', `data_file=${'x'.repeat(json.length)}`, 'json.qcow2', '1M');
  replaceStoredName(join(dir, 'sub', 'json.qcow2'), 'x'.repeat(json.length), json);
  for (const [name, why] of [
    ['abs.qcow2', /absolute path/],
    ['up.qcow2', /escapes/],
    ['over.qcow2', /Refusing the backing file .*escapes/],
    ['json.qcow2', /json:/],
  ] as const) {
    await assert.rejects(openImage(join(dir, 'sub', name)), (err: unknown) => {
      assert.ok(isQcow2StreamError(err));
      assert.equal(err.code, 'QCOW_ERR_PATH_POLICY', `${name}: ${err.message}`);
      assert.match(err.message, why);
      return true;
    });
  }
  // The caller's explicit choices bypass the policy for that file.
  const abs = await openImage(join(dir, 'sub', 'abs.qcow2'), { dataFile: join(dir, 'abs.data') });
  assert.equal((await abs.read(0, 1))[0], 0x11);
  await abs.close();
  const over = await openImage(join(dir, 'sub', 'over.qcow2'), { backing: join(dir, 'base.qcow2') });
  assert.equal(over.backing?.format, 'qcow2');
  await over.close();
  const unsafe = await openImage(join(dir, 'sub', 'abs.qcow2'), { allowUnsafePaths: true });
  assert.equal((await unsafe.read(0, 1))[0], 0x11);
  await unsafe.close();
});

test('very long names, devices, /proc links and look-alike prefixes are refused; the opt-out still refuses devices', async (t) => {
  const dir = tempDir(t);
  const { image } = layout(dir);
  await refused(image, 'x'.repeat(300), /cannot be resolved \(ENAMETOOLONG\)/);
  await refused(image, `${'a/'.repeat(3000)}f`, /cannot be resolved|does not exist/);
  await refused(image, '/dev/zero', /absolute path outside/);
  await refused(image, '/dev/zero', /not a regular file \(it is a char-device\)/, true);
  await refused(image, '/proc/self/fd/0', /absolute path outside/);
  await refused(image, 'JSON:{"driver":"nbd"}', /json:/, true);
  await refused(image, 'file:///etc/passwd', /protocol/, true);
  await refused(image, 'nbd+unix:///export?socket=/tmp/s', /protocol/);
  await refused(image, '.', /not a regular file \(it is a directory\)/);
  await refused(image, '..', /escapes the image directory/);
});

test('names stored in real headers: non-UTF-8 bytes are refused, and an image naming itself as its data file', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  // The bytes on disk are "d\xffta": no file of that name can be opened under the decoded name.
  img(dir, 'create', '-f', 'qcow2', '-o', 'data_file=d0ta', 'bad.qcow2', '1M');
  const path = join(dir, 'bad.qcow2');
  const bytes = readFileSync(path);
  const at = bytes.indexOf(Buffer.from('d0ta'));
  bytes[at + 1] = 0xff;
  writeFileSync(path, bytes);
  await assert.rejects(openImage(path), (err: unknown) => {
    assert.ok(isQcow2StreamError(err));
    assert.equal(err.code, 'QCOW_ERR_PATH_POLICY');
    assert.match(err.message, /not valid UTF-8/);
    return true;
  });
  // Same-length rename of the data-file name to the image's own name (via a hard link too).
  img(dir, 'create', '-f', 'qcow2', '-o', 'data_file=self.data', 'self.qcow2', '1M');
  replaceStoredName(join(dir, 'self.qcow2'), 'self.data', 'self.qcow');
  linkSync(join(dir, 'self.qcow2'), join(dir, 'self.qcow'));
  await assert.rejects(openImage(join(dir, 'self.qcow2')), (err: unknown) => {
    assert.ok(isQcow2StreamError(err));
    assert.equal(err.code, 'QCOW_ERR_CORRUPT_IMAGE');
    assert.match(err.message, /names itself as its external data file/);
    return true;
  });
});
