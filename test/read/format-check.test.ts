/**
 * `check` of VMDK, VHDX and VHD images against `qemu-img check`: qemu-made images check clean
 * in both tools; a table entry broken on purpose is reported by ours (and by qemu where it checks
 * that format and that rule); raw and fixed VHD images have nothing to check, as qemu says.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { checkImage, type CheckResult } from '../../src/read/check.js';
import { isQcow2StreamError } from '../../src/errors.js';
import { needQemu, qemuImg, tempDir } from '../helpers/qemu.js';
import { qemuConvertTo, writeSourceRaw } from '../helpers/foreign.js';
import { runCli } from '../helpers/cli.js';

const MiB = 1024 * 1024;

function errors(result: CheckResult): string[] {
  return result.findings.filter((f) => f.severity === 'error').map((f) => f.message);
}

/** A copy of `from` named `to`, with `edit` applied to its bytes. */
function broken(dir: string, from: string, to: string, edit: (bytes: Buffer) => void): string {
  const bytes = readFileSync(join(dir, from));
  edit(bytes);
  writeFileSync(join(dir, to), bytes);
  return to;
}

/** The GD's first grain table of a monolithicSparse VMDK: its byte offset. */
function firstGrainTable(bytes: Buffer): number {
  const gd = Number(bytes.readBigUInt64LE(56)) * 512;
  return bytes.readUInt32LE(gd) * 512;
}

/** The BAT of a qemu-made VHDX (from its region table). */
function vhdxBat(bytes: Buffer): number {
  for (let i = 0; i < bytes.readUInt32LE(192 * 1024 + 8); i++) {
    const entry = 192 * 1024 + 16 + i * 32;
    if (bytes.readUInt32LE(entry) === 0x2dc27766) return Number(bytes.readBigUInt64LE(entry + 16));
  }
  throw new Error('no BAT region');
}

function setBatEntry(bytes: Buffer, bat: number, index: number, mib: number, state = 6): void {
  bytes.writeBigUInt64LE((BigInt(mib) << 20n) | BigInt(state), bat + index * 8);
}

function makeImages(dir: string): void {
  writeSourceRaw(dir, 'src.raw', 3 * MiB + 512, 5);
  qemuConvertTo(dir, 'src.raw', 's.vmdk', 'vmdk', 'subformat=monolithicSparse');
  qemuConvertTo(dir, 'src.raw', 'so.vmdk', 'vmdk', 'subformat=streamOptimized');
  qemuConvertTo(dir, 'src.raw', 'flat.vmdk', 'vmdk', 'subformat=monolithicFlat');
  qemuConvertTo(dir, 'src.raw', 'two.vmdk', 'vmdk', 'subformat=twoGbMaxExtentSparse');
  qemuConvertTo(dir, 'src.raw', 'd.vhdx', 'vhdx', 'subformat=dynamic,block_size=1M');
  qemuConvertTo(dir, 'src.raw', 'f.vhdx', 'vhdx', 'subformat=fixed,block_size=1M');
  qemuConvertTo(dir, 'src.raw', 'd.vhd', 'vpc', 'subformat=dynamic');
  qemuConvertTo(dir, 'src.raw', 'f.vhd', 'vpc', 'subformat=fixed');
}

test('qemu-made VMDK, VHDX and dynamic VHD images check clean, as qemu-img check finds them', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  makeImages(dir);
  for (const [image, format] of [['s.vmdk', 'vmdk'], ['so.vmdk', 'vmdk'], ['flat.vmdk', 'vmdk'], ['two.vmdk', 'vmdk'], ['d.vhdx', 'vhdx'], ['f.vhdx', 'vhdx'], ['d.vhd', 'vpc']] as const) {
    const ours = await checkImage(join(dir, image));
    assert.equal(ours.format, format, image);
    assert.ok(ours.clean, `${image}: ${ours.findings.map((f) => f.message).join('; ')}`);
    assert.ok(ours.allocatedClusters > 0 && ours.allocatedClusters <= ours.totalClusters, `${image}: ${ours.allocatedClusters}/${ours.totalClusters}`);
    const qemu = qemuImg(['check', image], dir);
    // qemu has no check for vpc (exit 63); it checks the others.
    assert.equal(qemu.code, format === 'vpc' ? 63 : 0, `${image}: ${qemu.stdout}${qemu.stderr}`);
  }
  assert.ok((await checkImage(join(dir, 'so.vmdk'))).compressedClusters > 0, 'streamOptimized grains count as compressed');
});

test('a VMDK grain past the end of the file: qemu-img check and ours report it, in qemu\'s words', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  makeImages(dir);
  const image = broken(dir, 's.vmdk', 'past.vmdk', (bytes) => bytes.writeUInt32LE(bytes.length / 512 + 100, firstGrainTable(bytes) + 2 * 4));
  const ours = await checkImage(join(dir, image));
  assert.equal(ours.clean, false);
  // Grain 2 of 64 KiB grains starts at guest sector 256.
  assert.deepEqual(errors(ours), ['ERROR: cluster offset for sector 256 points after EOF']);
  const qemu = qemuImg(['check', image], dir);
  assert.notEqual(qemu.code, 0);
  assert.match(qemu.stderr, /ERROR: cluster offset for sector 256 points after EOF/);
});

test('VMDK grains that share bytes with another grain or with a grain table are corruptions (qemu does not look)', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  makeImages(dir);
  const twice = broken(dir, 's.vmdk', 'twice.vmdk', (bytes) => {
    const gt = firstGrainTable(bytes);
    bytes.writeUInt32LE(bytes.readUInt32LE(gt), gt + 4);
  });
  const doubled = await checkImage(join(dir, twice));
  assert.equal(doubled.corruptions, 1, errors(doubled).join('; '));
  assert.match(errors(doubled)[0]!, /the grain at 0x[0-9a-f]+ overlaps the grain at 0x[0-9a-f]+/);
  assert.equal(qemuImg(['check', twice], dir).code, 0, 'qemu-img check does not look for shared grains');

  const onTable = broken(dir, 's.vmdk', 'ontable.vmdk', (bytes) => {
    const gt = firstGrainTable(bytes);
    bytes.writeUInt32LE(gt / 512, gt + 8);
  });
  // The grain laid over the table also runs into the first real grain: two findings.
  const overTable = await checkImage(join(dir, onTable));
  assert.deepEqual(
    errors(overTable).map((m) => m.replace(/ in '.*'$/, '')),
    [`ERROR: the grain at 0x${firstGrainTable(readFileSync(join(dir, onTable))).toString(16)} overlaps the grain table at 0x${firstGrainTable(readFileSync(join(dir, onTable))).toString(16)}`, `ERROR: the grain at 0x10000 overlaps the grain at 0x${firstGrainTable(readFileSync(join(dir, onTable))).toString(16)}`],
  );
});

test('VHDX BAT entries past the end of the file or inside the BAT: the same corruptions as qemu-img check', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  makeImages(dir);
  const size = statSync(join(dir, 'd.vhdx')).size;
  const past = broken(dir, 'd.vhdx', 'past.vhdx', (bytes) => setBatEntry(bytes, vhdxBat(bytes), 1, size / MiB + 5));
  const inBat = broken(dir, 'd.vhdx', 'inbat.vhdx', (bytes) => setBatEntry(bytes, vhdxBat(bytes), 1, vhdxBat(bytes) / MiB));
  for (const image of [past, inBat]) {
    const ours = await checkImage(join(dir, image));
    const qemu = qemuImg(['check', '--output=json', image], dir);
    const qemuCorruptions = (JSON.parse(qemu.stdout) as { corruptions?: number }).corruptions ?? 0;
    assert.equal(qemu.code, 2, `${image}: ${qemu.stderr}`);
    assert.equal(ours.corruptions, qemuCorruptions, `${image}: ${errors(ours).join('; ')} / qemu: ${qemu.stderr}`);
  }
  const [message] = errors(await checkImage(join(dir, past)));
  assert.equal(message, `VHDX BAT entry 1 start offset ${size + 5 * MiB} points after end of file (${size}). Image has probably been truncated.`);
  assert.match(qemuImg(['check', past], dir).stderr, new RegExp(message!.replace(/[.()]/g, '\\$&')));

  // Two blocks in the same place: qemu does not look; one write would change both.
  const shared = broken(dir, 'd.vhdx', 'shared.vhdx', (bytes) => {
    const bat = vhdxBat(bytes);
    bytes.copy(bytes, bat + 8, bat, bat + 8);
  });
  const sharedResult = await checkImage(join(dir, shared));
  assert.equal(sharedResult.corruptions, 1, errors(sharedResult).join('; '));
  assert.match(errors(sharedResult)[0]!, /the payload block at 0x[0-9a-f]+ overlaps the payload block/);
  assert.equal(qemuImg(['check', shared], dir).code, 0);
});

test('a dynamic VHD: blocks past the end or on top of each other are corruptions (qemu has no vpc check)', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  makeImages(dir);
  const bytes = readFileSync(join(dir, 'd.vhd'));
  const bat = Number(bytes.readBigUInt64BE(512 + 16));
  const past = broken(dir, 'd.vhd', 'past.vhd', (b) => b.writeUInt32BE(b.length / 512 + 10, bat + 4));
  const pastResult = await checkImage(join(dir, past));
  assert.equal(pastResult.corruptions, 1, errors(pastResult).join('; '));
  assert.match(errors(pastResult)[0]!, /block 1 \(BAT entry: sector \d+\) starts at byte \d+, after the end/);
  const shared = broken(dir, 'd.vhd', 'shared.vhd', (b) => b.writeUInt32BE(b.readUInt32BE(bat), bat + 4));
  const sharedResult = await checkImage(join(dir, shared));
  assert.equal(sharedResult.corruptions, 1, errors(sharedResult).join('; '));
  assert.equal(qemuImg(['check', shared], dir).code, 63);
});

test('raw images and fixed VHDs have nothing to check: a typed refusal in qemu-img\'s words; the CLI exits 2 with one line', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  makeImages(dir);
  for (const image of ['src.raw', 'f.vhd']) {
    await assert.rejects(checkImage(join(dir, image)), (err: unknown) => isQcow2StreamError(err) && err.code === 'QCOW_ERR_UNSUPPORTED_FEATURE' && /This image format does not support checks/.test(err.message));
    assert.equal(qemuImg(['check', image], dir).code, 63, `qemu-img check ${image}`);
    const cli = runCli(['check', image], { cwd: dir });
    assert.equal(cli.code, 2, cli.stderr);
    assert.match(cli.stderr, /^qcow2-stream: This image format does not support checks: .* \[QCOW_ERR_UNSUPPORTED_FEATURE\]\n$/);
  }
  // The CLI checks the other formats, probed or given; JSON names the format.
  const json = runCli(['check', '--json', '-f', 'vhdx', 'd.vhdx'], { cwd: dir });
  assert.equal(json.code, 0, json.stderr);
  assert.equal((JSON.parse(json.stdout) as { format: string; clean: boolean }).format, 'vhdx');
  const bad = broken(dir, 's.vmdk', 'past.vmdk', (bytes) => bytes.writeUInt32LE(bytes.length / 512 + 100, firstGrainTable(bytes)));
  const found = runCli(['check', bad], { cwd: dir });
  assert.equal(found.code, 1, found.stderr);
  assert.match(found.stdout, /ERROR: cluster offset for sector 0 points after EOF/);
  assert.equal(runCli(['check', '--repair', 's.vmdk'], { cwd: dir }).code, 2, '--repair is for qcow2');
});
