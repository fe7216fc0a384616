/** `qcow2-stream check`: exit 0 clean, 1 problems, 2 error; human and JSON reports. */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { runCli } from '../helpers/cli.js';
import { needQemu, tempDir } from '../helpers/qemu.js';
import { img, io, locate, writeU32, writeU64 } from '../read/fixtures.js';

test('check exits 0 on a clean image, 1 with findings (also in JSON), 2 when it cannot check', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  img(dir, 'create', '-f', 'qcow2', '-o', 'data_file=d.data', 'a.qcow2', '4M');
  io(dir, 'a.qcow2', 'write -P 0x11 0 256k');
  const clean = runCli(['check', 'a.qcow2'], { cwd: dir });
  assert.equal(clean.code, 0, clean.stderr);
  assert.match(clean.stdout, /No errors were found on the image\./);

  const a = locate(join(dir, 'a.qcow2'));
  writeU64(join(dir, 'a.qcow2'), a.l2EntryOffset(2), 0x30000n | (1n << 63n));
  const found = runCli(['check', '--json', 'a.qcow2'], { cwd: dir });
  assert.equal(found.code, 1, found.stderr);
  const report = JSON.parse(found.stdout) as { corruptions: number; leaks: number; clean: boolean; findings: { severity: string; structure: string; offset: number; message: string }[] };
  assert.equal(report.corruptions, 1);
  assert.equal(report.clean, false);
  assert.deepEqual(report.findings.map((f) => [f.severity, f.structure, f.offset]), [['error', 'L2 entry', a.l2EntryOffset(2)]]);

  writeU32(join(dir, 'a.qcow2'), 4, 9);
  const broken = runCli(['check', 'a.qcow2'], { cwd: dir });
  assert.equal(broken.code, 2);
  assert.match(broken.stderr, /Unsupported qcow2 version 9 .*\[QCOW_ERR_UNSUPPORTED_VERSION\]/);
  assert.doesNotMatch(broken.stderr, /^\s+at /m);
});
