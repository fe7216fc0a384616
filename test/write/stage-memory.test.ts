/**
 * convert() with a user's own stage on a file input reads through Blocks whose buffers the GC
 * reclaims: memory stays bounded however large the input. (A buffer pool whose Blocks were
 * never released once held every buffer read: a 2 GiB input peaked at 1.7 GB of RSS.)
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { openSync, writeSync, closeSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { qemuCheck, tempDir } from '../helpers/qemu.js';

const MiB = 1024 * 1024;
const root = fileURLToPath(new URL('../..', import.meta.url));

test('convert() with a user stage keeps memory bounded on a large file input', (t) => {
  const dir = tempDir(t);
  const input = join(dir, 'in.raw');
  // 512 MiB of data (no zeros, no holes): every cluster is read and stored.
  const chunk = Buffer.alloc(MiB);
  for (let i = 0; i < chunk.length; i++) chunk[i] = (i * 131 + 7) & 0xff;
  const fd = openSync(input, 'w');
  for (let m = 0; m < 512; m++) {
    chunk.writeUInt32LE(m, 0);
    writeSync(fd, chunk);
  }
  closeSync(fd);
  const script = `
    import { convert, perBlock } from ${JSON.stringify(join(root, 'src/index.ts'))};
    let seen = 0;
    const summary = await convert({ input: ${JSON.stringify(input)}, output: ${JSON.stringify(join(dir, 'out.qcow2'))}, sync: false,
      stages: [perBlock((block) => void (block.zero || (seen += 1)))] });
    if (summary.dataClusters !== seen) throw new Error('the stage saw ' + seen + ' data clusters, the sink stored ' + summary.dataClusters);
    process.stdout.write(String(process.resourceUsage().maxRSS * 1024));
  `;
  const peak = Number(execFileSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], { cwd: root, encoding: 'utf8' }));
  qemuCheck(join(dir, 'out.qcow2'));
  // Node + tsx + the pipeline's buffers are ~150 MiB; holding the input would be 512 MiB more.
  assert.ok(peak < 320 * MiB, `peak RSS ${(peak / MiB).toFixed(0)} MiB for a 512 MiB input`);
});
