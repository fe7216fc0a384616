/**
 * Export to a file reuses a small pool of buffers for data that must pass through JavaScript
 * (compressed clusters), while uncompressed data is copied natively; both share one queue of
 * writes in flight. A buffer must never be refilled while a write from it is still running:
 * these tests make the writes slow (deterministically), and run several exports of a
 * compressed image at once under load (the way the bug was first seen: one wrong cluster, the
 * content of a compressed cluster a few pieces later, with exit 0).
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import type { FileHandle } from 'node:fs/promises';
import { mock } from 'node:test';
import { openImage } from '../../src/read/image.js';
import { exportToFile } from '../../src/read/export.js';
import { needQemu, tempDir } from '../helpers/qemu.js';
import { fileHandlePrototype, pathOfHandle } from '../robustness/faults.js';
import { repetitions } from '../helpers/long.js';
import { img, io, qemuRaw } from './fixtures.js';
import { CLI_PATH } from '../helpers/cli.js';

const KiB = 1024;

/** Compressible bytes that differ in every cluster: each cluster repeats its own text. */
function distinctCompressible(clusterSize: number, clusters: number): Buffer {
  const out = Buffer.alloc(clusterSize * clusters);
  for (let i = 0; i < clusters; i++) out.fill(`cluster ${i} of ${clusters}; `, i * clusterSize, (i + 1) * clusterSize);
  return out;
}

/**
 * A compressed image (every cluster distinct) with a few clusters rewritten uncompressed by
 * qemu-io, far apart, so that a native copy falls now and then between long runs of buffered
 * (decompressed) pieces: the pattern that filled the write queue with copies and writes.
 */
function mixedCompressed(dir: string, clusterSize: number, clusters: number): string {
  writeFileSync(join(dir, 'in.raw'), distinctCompressible(clusterSize, clusters));
  img(dir, 'convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', `cluster_size=${clusterSize}`, 'in.raw', 'c.qcow2');
  const rewrites: string[] = [];
  for (let i = 5; i < clusters; i += 23) rewrites.push(`write -P ${0x30 + (i % 200)} ${i * clusterSize} ${clusterSize}`);
  io(dir, 'c.qcow2', ...rewrites);
  return 'c.qcow2';
}

test('pooled export buffers are not refilled while their writes run (slow writes)', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  const image = mixedCompressed(dir, 64 * KiB, 60);
  const expected = qemuRaw(dir, image);
  const out = join(dir, 'out.raw');
  // Every buffered write to the output waits a little before it reaches the kernel, so the
  // bytes it sends are the buffer's contents at that later moment.
  type Writev = (this: FileHandle, ...args: unknown[]) => Promise<unknown>;
  const proto = (await fileHandlePrototype()) as Record<'writev', Writev>;
  const original = proto.writev;
  const patched = mock.method(proto, 'writev', async function (this: FileHandle, ...args: unknown[]) {
    if (pathOfHandle(this).includes('.out.raw.')) await new Promise((resolve) => setTimeout(resolve, 15));
    return original.apply(this, args);
  });
  t.after(() => patched.mock.restore());
  const opened = await openImage(join(dir, image));
  try {
    await exportToFile(opened, out, { sync: false });
  } finally {
    await opened.close();
  }
  const bytes = readFileSync(out);
  assert.equal(bytes.length, expected.length);
  assert.ok(bytes.equals(expected), 'the exported image differs from qemu-img convert -O raw');
});

test('parallel exports of a compressed image under load are all exact', async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  const image = mixedCompressed(dir, 4 * KiB, 1200);
  const expected = qemuRaw(dir, image);
  // Competing CPU: a busy child for the length of the test.
  const burner = spawn(process.execPath, ['-e', 'for(;;){}'], { stdio: 'ignore' });
  t.after(() => burner.kill('SIGKILL'));
  const rounds = repetitions(3, 20);
  let wrong = 0;
  for (let round = 0; round < rounds; round++) {
    const runs = [0, 1, 2].map(async (i) => {
      const out = join(dir, `out-${round}-${i}.raw`);
      const child = spawn(process.execPath, ['--import', import.meta.resolve('tsx'), CLI_PATH, 'export', '--no-sync', image, out], { cwd: dir, stdio: ['ignore', 'ignore', 'pipe'] });
      let stderr = '';
      child.stderr.setEncoding('utf8').on('data', (s: string) => (stderr += s));
      const [code] = (await once(child, 'close')) as [number | null];
      assert.equal(code, 0, stderr);
      if (!readFileSync(out).equals(expected)) wrong++;
    });
    await Promise.all(runs);
  }
  assert.equal(wrong, 0, `${wrong} of ${rounds * 3} exports differ from qemu-img convert -O raw`);
});
