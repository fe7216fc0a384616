/** `qcow2-stream check`: exit 0 clean, 1 problems, 2 error; human and JSON reports. */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { formatPercent } from '../../src/cli/check.js';
import { runCli } from '../helpers/cli.js';
import { needQemu, qemuImg, tempDir } from '../helpers/qemu.js';
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

test('percentages round like printf("%.2f") in qemu-img check: exact ties to even', () => {
  const cases: Array<[number, string]> = [
    [(1 * 100) / 32, '3.12'], // 3.125 exactly: C rounds to even, JS toFixed would print 3.13
    [(3 * 100) / 800, '0.38'], // 0.375: the tie rounds up to the even digit
    [(5 * 100) / 800, '0.62'],
    [(100 * 100) / 300, '33.33'],
    [3.1250000000000004, '3.13'], // just above the tie
    [100, '100.00'],
    [0, '0.00'],
  ];
  for (const [value, printed] of cases) assert.equal(formatPercent(value), printed, String(value));
});

test("the statistics line ('% fragmented') is qemu-img check's", async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  img(dir, 'create', '-f', 'qcow2', '-o', 'cluster_size=512', 'frag.qcow2', '2M');
  io(dir, 'frag.qcow2', 'write -P 1 0 512', 'write -P 2 100000 3000', 'write -P 3 40000 2000', 'write -P 4 1500000 700', 'write -P 5 33000 100', 'write -P 6 700000 5000', 'write -P 7 65536 512');
  const stats = (text: string) => text.split('\n').find((line) => line.includes('% fragmented'));
  const ours = runCli(['check', 'frag.qcow2'], { cwd: dir });
  const qemu = qemuImg(['check', 'frag.qcow2'], dir);
  assert.equal(stats(ours.stdout), stats(qemu.stdout));
  assert.match(stats(ours.stdout) ?? '', /3\.57% fragmented/);
});

test('check --repair fixes the COPIED flag qemu leaves in a deduplicated image; exit 1 before, 0 after', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  const cluster = Buffer.alloc(65536);
  for (let i = 0; i < cluster.length; i++) cluster[i] = (i * 131 + 7) & 0xff;
  writeFileSync(join(dir, 'in.raw'), Buffer.concat([cluster, cluster]));
  const converted = runCli(['convert', 'in.raw', 'out.qcow2', '--internal', '--dedup', '-q'], { cwd: dir });
  assert.equal(converted.code, 0, converted.stderr);
  io(dir, 'out.qcow2', 'write -P 0x55 0 65536');
  const found = runCli(['check', 'out.qcow2'], { cwd: dir });
  assert.equal(found.code, 1);
  assert.match(found.stdout, /^ERROR OFLAG_COPIED data cluster: l2_entry=0x10000 refcount=1$/m);
  assert.match(found.stdout, /check --repair/);
  const repaired = runCli(['check', '--repair', '--json', 'out.qcow2'], { cwd: dir });
  assert.equal(repaired.code, 0, repaired.stdout);
  const report = JSON.parse(repaired.stdout) as Record<string, unknown>;
  assert.equal(report['corruptions-fixed'], 1);
  assert.equal(report['corruptions'], 0);
  assert.equal(qemuImg(['check', 'out.qcow2'], dir).code, 0);
});
