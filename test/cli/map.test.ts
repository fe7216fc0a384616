/** `qcow2-stream map`: JSON and the human table, as qemu-img map prints them. */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { runCli } from '../helpers/cli.js';
import { needQemu, qemuImg, tempDir } from '../helpers/qemu.js';
import { img, io } from '../read/fixtures.js';

test('map --json and the human table match qemu-img map', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  img(dir, 'create', '-f', 'qcow2', 'base.qcow2', '4M');
  io(dir, 'base.qcow2', 'write -P 0x11 0 128k', 'write -P 0x22 1M 64k');
  img(dir, 'create', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'ov.qcow2', '8M');
  io(dir, 'ov.qcow2', 'write -P 0x33 64k 64k', 'write -z 1M 64k', 'write -P 0x44 5M 64k');
  const json = runCli(['map', '--json', 'ov.qcow2'], { cwd: dir });
  assert.equal(json.code, 0, json.stderr);
  const qemuJson = qemuImg(['map', '--output=json', 'ov.qcow2'], dir).stdout;
  assert.deepEqual(JSON.parse(json.stdout), JSON.parse(qemuJson));

  io(dir, 'base.qcow2', 'write -P 0x55 3M 64k');
  const human = runCli(['map', 'base.qcow2'], { cwd: dir });
  assert.equal(human.code, 0, human.stderr);
  assert.equal(human.stdout, qemuImg(['map', 'base.qcow2'], dir).stdout);
});
