/**
 * A header whose virtual size is not a multiple of 512 (only an odd or hostile image has one):
 * qemu counts whole sectors (total_sectors = size / 512), so export, map, info and compare see
 * floor(size / 512) * 512 bytes, and so do we.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { runCli } from '../helpers/cli.js';
import { needQemu, qemuImg, qemuInfo, tempDir } from '../helpers/qemu.js';
import { img, io, qemuRaw, writeU64 } from './fixtures.js';

for (const size of [511, 1000, 65536 + 700]) {
  test(`header size ${size}: export, map, info and compare agree with qemu`, (t) => {
    if (!needQemu(t)) return;
    const dir = tempDir(t);
    img(dir, 'create', '-f', 'qcow2', 'a.qcow2', '1M');
    io(dir, 'a.qcow2', 'write -P 0x61 0 128k');
    writeU64(join(dir, 'a.qcow2'), 24, BigInt(size));
    const expected = qemuRaw(dir, 'a.qcow2');
    assert.equal(expected.length, size - (size % 512), 'qemu-img convert -O raw');
    const exported = runCli(['export', '-q', 'a.qcow2', 'ours.raw'], { cwd: dir });
    assert.equal(exported.code, 0, exported.stderr);
    assert.ok(readFileSync(join(dir, 'ours.raw')).equals(expected), 'export');

    const ourMap = runCli(['map', '--json', 'a.qcow2'], { cwd: dir });
    const qemuMap = qemuImg(['map', '--output=json', 'a.qcow2'], dir);
    const end = (json: string) => (JSON.parse(json) as Array<{ start: number; length: number }>).reduce((n, e) => Math.max(n, e.start + e.length), 0);
    assert.equal(end(ourMap.stdout), end(qemuMap.stdout), 'map covers what qemu covers');

    const ourInfo = JSON.parse(runCli(['info', '--json', 'a.qcow2'], { cwd: dir }).stdout) as Record<string, unknown>;
    assert.equal(ourInfo['virtual-size'], qemuInfo('a.qcow2', dir)['virtual-size'], 'info');

    const compared = runCli(['compare', 'a.qcow2', 'a.qcow2.qemu.raw'], { cwd: dir });
    assert.equal(compared.code, 0, compared.stdout + compared.stderr);
  });
}
