import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { assembleBlocks } from '../../src/write/stream-image.js';
import { spawnSync } from 'node:child_process';
import { CLI_PATH, runCli } from '../helpers/cli.js';
import { qemuConvertTo, qemuRaw, vmwareStyleStream, writeSourceRaw } from '../helpers/foreign.js';
import { needQemu, qemuCheck, qemuImg, tempDir } from '../helpers/qemu.js';

const MiB = 1024 * 1024;
const tsx = import.meta.resolve('tsx');

/** The CLI with `file` piped into it by cat (a real pipe; cat, not the test, sees an early exit). */
function pipeInto(dir: string, file: string, args: readonly string[]): { code: number; stderr: string } {
  const quoted = [process.execPath, '--import', tsx, CLI_PATH, ...args].map((a) => `'${a.replace(/'/g, "'\\''")}'`).join(' ');
  const result = spawnSync('sh', ['-c', `cat '${file}' | ${quoted}`], { cwd: dir, encoding: 'utf8' });
  return { code: result.status ?? -1, stderr: result.stderr };
}

function assertGood(dir: string, expectedRaw: string, image: string): void {
  assert.equal(qemuCheck(image, dir).code, 0, `qemu-img check ${image}`);
  const compare = qemuImg(['compare', '-f', 'raw', '-F', 'qcow2', expectedRaw, image], dir);
  assert.equal(compare.code, 0, `compare ${image}: ${compare.stdout}${compare.stderr}`);
}

test('a streamOptimized VMDK through a pipe gives the same image as from the file', (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  writeSourceRaw(dir, 'in.raw', 5 * MiB + 1536, 81);
  qemuConvertTo(dir, 'in.raw', 's.vmdk', 'vmdk', 'subformat=streamOptimized');
  writeFileSync(join(dir, 'w.vmdk'), vmwareStyleStream(readFileSync(join(dir, 's.vmdk'))));
  const expected = qemuRaw(dir, 's.vmdk');
  for (const vmdk of ['s.vmdk', 'w.vmdk']) {
    for (const extra of [[], ['--no-data-file-raw'], ['--cluster-size', '4K']]) {
      const tag = `${vmdk}${extra.join('')}`;
      const fromFile = runCli(['convert', vmdk, `${tag}.f.qcow2`, '--data-file', `${tag}.f.data`, '-q', ...extra], { cwd: dir });
      assert.equal(fromFile.code, 0, fromFile.stderr);
      const piped = runCli(['convert', '-', `${tag}.p.qcow2`, '--data-file', `${tag}.p.data`, '-q', ...extra], { cwd: dir, input: readFileSync(join(dir, vmdk)) });
      assert.equal(piped.code, 0, piped.stderr);
      assertGood(dir, expected, `${tag}.p.qcow2`);
      assert.ok(readFileSync(join(dir, `${tag}.p.data`)).equals(readFileSync(join(dir, `${tag}.f.data`))), `${tag}: the same data file`);
      assert.equal(qemuImg(['compare', `${tag}.f.qcow2`, `${tag}.p.qcow2`], dir).code, 0);
    }
  }
  // Internal layout from a pipe too.
  const internal = runCli(['convert', '-', 'i.qcow2', '--internal', '-q'], { cwd: dir, input: readFileSync(join(dir, 's.vmdk')) });
  assert.equal(internal.code, 0, internal.stderr);
  assertGood(dir, expected, 'i.qcow2');
});

test('a fixed VHD through a pipe with -f vpc; formats that need random access are refused and leave nothing', (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  writeSourceRaw(dir, 'in.raw', 3 * MiB + 512, 82);
  qemuConvertTo(dir, 'in.raw', 'f.vhd', 'vpc', 'subformat=fixed');
  const expected = qemuRaw(dir, 'f.vhd', 'vpc');
  const piped = runCli(['convert', '-f', 'vpc', '-', 'f.qcow2', '--data-file', 'f.data', '-q'], { cwd: dir, input: readFileSync(join(dir, 'f.vhd')) });
  assert.equal(piped.code, 0, piped.stderr);
  assertGood(dir, expected, 'f.qcow2');
  // -f vpc on a stream that does not end in a fixed footer: refused once the end is seen, nothing left.
  const before = readdirSync(dir).sort();
  const notVhd = pipeInto(dir, 'in.raw', ['convert', '-f', 'vpc', '-', 'n.qcow2', '--data-file', 'n.data']);
  assert.equal(notVhd.code, 2);
  assert.match(notVhd.stderr, /not a fixed VHD.*QCOW_ERR_CORRUPT_IMAGE/);
  assert.deepEqual(readdirSync(dir).sort(), before);

  qemuConvertTo(dir, 'in.raw', 'q.qcow2', 'qcow2');
  qemuConvertTo(dir, 'in.raw', 'd.vhd', 'vpc', 'subformat=dynamic');
  qemuConvertTo(dir, 'in.raw', 'x.vhdx', 'vhdx');
  qemuConvertTo(dir, 'in.raw', 'm.vmdk', 'vmdk', 'subformat=monolithicSparse');
  qemuConvertTo(dir, 'in.raw', 'v.vdi', 'vdi');
  const listed = readdirSync(dir).sort();
  for (const [file, code] of [['q.qcow2', 'QCOW_ERR_NOT_SEEKABLE'], ['d.vhd', 'QCOW_ERR_NOT_SEEKABLE'], ['x.vhdx', 'QCOW_ERR_NOT_SEEKABLE'], ['m.vmdk', 'QCOW_ERR_UNSUPPORTED_FEATURE'], ['v.vdi', 'QCOW_ERR_UNSUPPORTED_FORMAT']] as const) {
    const result = pipeInto(dir, file, ['convert', '-', 'o.qcow2', '--data-file', 'o.data']);
    assert.equal(result.code, 2, `${file}: ${result.stderr}`);
    assert.match(result.stderr, new RegExp(code), file);
    if (code !== 'QCOW_ERR_UNSUPPORTED_FORMAT') assert.match(result.stderr, /Write the input to a file first/, file);
  }
  assert.deepEqual(readdirSync(dir).sort(), listed);
  assert.equal(existsSync(join(dir, 'o.data')), false);
});

test('streamOptimized grains out of disk order are refused from a pipe', (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  writeSourceRaw(dir, 'in.raw', 2 * MiB, 83);
  qemuConvertTo(dir, 'in.raw', 's.vmdk', 'vmdk', 'subformat=streamOptimized');
  const bytes = readFileSync(join(dir, 's.vmdk'));
  // The first grain marker is at sector 128 (qemu's overhead); make it claim the disk's last grain.
  bytes.writeBigUInt64LE(BigInt((2 * MiB) / 512 - 128), 128 * 512);
  writeFileSync(join(dir, 'bad.vmdk'), bytes);
  const result = pipeInto(dir, 'bad.vmdk', ['convert', '-', 'o.qcow2', '--data-file', 'o.data']);
  assert.equal(result.code, 2, result.stderr);
  assert.match(result.stderr, /not in disk order/);
  assert.equal(existsSync(join(dir, 'o.data')), false);
});

test('assembleBlocks: pieces at any offsets become whole clusters, gaps zero runs, the last cluster short', async () => {
  const size = 10 * 4096 + 1000;
  const pieces = [
    { offset: 100, data: new Uint8Array(50).fill(1) },
    { offset: 4096 * 2, data: new Uint8Array(4096).fill(2) },
    { offset: 4096 * 3 + 4000, data: new Uint8Array(200).fill(3) },
    { offset: 4096 * 10, data: new Uint8Array(1000).fill(4) },
  ];
  const expected = new Uint8Array(size);
  for (const p of pieces) expected.set(p.data, p.offset);
  const got = new Uint8Array(size);
  let covered = 0;
  let last = -1;
  for await (const block of assembleBlocks(Readable.from(pieces), () => size, 4096)) {
    assert.ok(block.index > last, 'in order');
    const count = block.count ?? 1;
    for (let i = 0; i < count; i++) if (!block.zero || block.count === undefined) got.set(block.data, (block.index + i) * 4096);
    covered += block.count !== undefined ? count * 4096 : block.data.length;
    last = block.index + count - 1;
  }
  assert.equal(covered, size);
  assert.ok(Buffer.from(got).equals(Buffer.from(expected)));
});
