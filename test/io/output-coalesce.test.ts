/**
 * OffsetWriter on a descriptor (a pipe) copies small contiguous chunks into one write: the
 * bytes that come out must be exactly the chunks in order, across every boundary of the
 * staging buffer (chunks that fill it, overflow it, or are larger than it).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execFileSync } from 'node:child_process';
import { OffsetWriter } from '../../src/io/output.js';

const MiB = 1024 * 1024;

function pattern(length: number, seed: number): Uint8Array {
  const out = new Uint8Array(length);
  let x = seed * 2654435761;
  for (let i = 0; i < length; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    out[i] = x >>> 24;
  }
  return out;
}

test('a pipe output receives coalesced writev chunks byte for byte, in order', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'qs-coalesce-'));
  try {
    const fifo = join(dir, 'out.fifo');
    const copy = join(dir, 'copy.bin');
    execFileSync('mkfifo', [fifo]);
    const reader = spawn('sh', ['-c', `cat "${fifo}" > "${copy}"`], { stdio: 'ignore' });
    const output = await OffsetWriter.create(fifo, { label: 'image' });
    // Sizes around the 4 MiB staging limit: many small ones, one that overflows the staging,
    // one larger than it, odd sizes, and a single chunk (written as is).
    const groups = [
      Array.from({ length: 64 }, (_, i) => pattern(64 * 1024, i)),
      [pattern(3 * MiB, 100), pattern(1.5 * MiB, 101), pattern(7, 102)],
      [pattern(5 * MiB, 200), pattern(512, 201), pattern(4 * MiB, 202), pattern(4 * MiB - 1, 203)],
      [pattern(12345, 300)],
    ];
    const expected: Uint8Array[] = [];
    let at = 0;
    for (const chunks of groups) {
      await output.writev(at, chunks);
      for (const c of chunks) {
        expected.push(c);
        at += c.length;
      }
    }
    // A gap on a stream becomes zeros, then one more coalesced group.
    const tail = [pattern(1000, 400), pattern(2000, 401)];
    await output.writev(at + 4096, tail);
    expected.push(new Uint8Array(4096), ...tail);
    await output.finish(at + 4096 + 3000);
    await output.commit();
    await new Promise((resolve) => reader.on('close', resolve));
    const got = readFileSync(copy);
    assert.equal(got.length, expected.reduce((n, c) => n + c.length, 0));
    assert.ok(Buffer.concat(expected).equals(got), 'the pipe got other bytes than were written');
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
