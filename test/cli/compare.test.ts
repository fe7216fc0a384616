/** `qcow2-stream compare`: exit codes and messages like qemu-img compare. */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { runCli } from '../helpers/cli.js';
import { needQemu, qemuImg, tempDir } from '../helpers/qemu.js';
import { randomBytesAt } from '../helpers/images.js';
import { img } from '../read/fixtures.js';

test('compare: identical (0), first mismatch like qemu (1), error (2)', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  const bytes = randomBytesAt(11, 0, 600_000);
  writeFileSync(join(dir, 'a.raw'), bytes);
  img(dir, 'convert', '-f', 'raw', '-O', 'qcow2', '-o', 'data_file=a.data', 'a.raw', 'a.qcow2');
  bytes[300_001] = (bytes[300_001] ?? 0) ^ 1;
  writeFileSync(join(dir, 'b.raw'), bytes);

  const same = runCli(['compare', '-f', 'raw', '-F', 'qcow2', 'a.raw', 'a.qcow2'], { cwd: dir });
  assert.equal(same.code, 0, same.stderr);
  assert.equal(same.stdout, 'Images are identical.\n');

  const differ = runCli(['compare', 'a.qcow2', 'b.raw'], { cwd: dir });
  assert.equal(differ.code, 1, differ.stderr);
  assert.equal(differ.stdout, qemuImg(['compare', 'a.qcow2', 'b.raw'], dir).stdout);
  assert.equal(differ.stdout, `Content mismatch at offset ${Math.floor(300_001 / 512) * 512}!\n`);

  const missing = runCli(['compare', 'a.raw', 'nope.qcow2'], { cwd: dir });
  assert.equal(missing.code, 2);
  assert.match(missing.stderr, /nope\.qcow2.*\[QCOW_ERR_FILE\]/);
});
