/**
 * Nightly incrementals make long chains: `convert day$i.raw --base day$((i-1)).qcow2` for three
 * weeks must give images every command reads (qemu reads them too), and `convert --base` must
 * refuse to create a chain that reading would refuse, naming the option that raises the limit.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { runCli } from '../helpers/cli.js';
import { needQemu, qemuCompare, tempDir } from '../helpers/qemu.js';
import { randomBytesAt } from '../helpers/images.js';

const KiB = 1024;
const SIZE = 512 * KiB;

test('21 nightly overlays: every one exports and compares equal; the limit is enforced at creation', (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  const disk = Buffer.from(randomBytesAt(1, 0, SIZE));
  writeFileSync(join(dir, 'day0.raw'), disk);
  let ran = runCli(['convert', '-q', '--internal', 'day0.raw', 'day0.qcow2'], { cwd: dir });
  assert.equal(ran.code, 0, ran.stderr);
  for (let day = 1; day <= 21; day++) {
    // Each night changes one 4 KiB block.
    randomBytesAt(100 + day, 0, 4 * KiB).copy(disk, (day * 20 * KiB) % SIZE);
    writeFileSync(join(dir, `day${day}.raw`), disk);
    ran = runCli(['convert', '-q', '--internal', `day${day}.raw`, `day${day}.qcow2`, '--base', `day${day - 1}.qcow2`], { cwd: dir });
    assert.equal(ran.code, 0, `day ${day}: ${ran.stderr}`);
  }
  ran = runCli(['export', '-q', 'day21.qcow2', 'out.raw'], { cwd: dir });
  assert.equal(ran.code, 0, ran.stderr);
  assert.ok(readFileSync(join(dir, 'out.raw')).equals(disk));
  assert.equal(qemuCompare("day21.raw", "day21.qcow2", dir).code, 0);

  // A limit of 22 reads day21 (22 images) but refuses to create day22, before writing anything.
  ran = runCli(['export', '-q', '--force', '--max-chain-depth', '22', 'day21.qcow2', 'out.raw'], { cwd: dir });
  assert.equal(ran.code, 0, ran.stderr);
  ran = runCli(['export', '-q', '--force', '--max-chain-depth', '21', 'day21.qcow2', 'out.raw'], { cwd: dir });
  assert.equal(ran.code, 2);
  assert.match(ran.stderr, /more than 21 images.*QCOW_ERR_LIMIT_EXCEEDED/);
  const before = readdirSync(dir).sort();
  ran = runCli(['convert', '--internal', '--max-chain-depth', '22', 'day21.raw', 'day22.qcow2', '--base', 'day21.qcow2'], { cwd: dir });
  assert.equal(ran.code, 2);
  assert.match(ran.stderr, /chain of 23 images, more than the 22/);
  assert.match(ran.stderr, /--max-chain-depth/);
  assert.deepEqual(readdirSync(dir).sort(), before);
});
