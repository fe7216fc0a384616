/**
 * The quick start: makes a sample disk image and takes it through the tool as a user would.
 *
 *   npm run sample            # or: npm run sample -- 64   (the size in MiB)
 *
 * 1. generates sample/disk.raw: 512 MiB unless told, sparse, a mix of random data, written zeros, holes
 *    and repeated blocks;
 * 2. converts it to sample/disk.qcow2 (metadata) + sample/disk.data (the guest data, sparse);
 * 3. inspects and checks the result, exports it back to raw and compares with the original;
 * 4. when qemu-img is installed, lets qemu check and compare our image too.
 */

import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, rmSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { join } from 'node:path';
import { generateImage } from '../bench/images.js';

const root = fileURLToPath(new URL('..', import.meta.url));
const dir = join(root, 'sample');
const built = join(root, (JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as { bin: Record<string, string> }).bin['qcow2-stream']!);
// The installed bin when built (npm ci builds it), else the TypeScript source.
const cli = existsSync(built) ? [process.execPath, built] : [process.execPath, '--import', 'tsx', join(root, 'src/cli/main.ts')];

function step(title: string, command: string[], options: { optional?: boolean; cwd?: string } = {}): void {
  const shown = command[0] === process.execPath ? ['qcow2-stream', ...command.slice(cli.length)] : command;
  const where = options.cwd === undefined ? '' : `cd ${options.cwd} && `;
  process.stdout.write(`\n$ ${where}${shown.join(' ')}    # ${title}\n`);
  const result = spawnSync(command[0]!, command.slice(1), { cwd: join(root, options.cwd ?? '.'), stdio: 'inherit' });
  if (result.status !== 0 && !options.optional) {
    process.stderr.write(`sample: '${shown.join(' ')}' failed with exit code ${result.status}\n`);
    process.exit(1);
  }
}

rmSync(dir, { recursive: true, force: true });
mkdirSync(dir);
const sizeMiB = Number(process.argv[2] ?? 512);
if (!Number.isSafeInteger(sizeMiB) || sizeMiB < 1) {
  process.stderr.write(`sample: the size is a whole number of MiB, not '${process.argv[2]}'\n`);
  process.exit(2);
}
const stats = generateImage(join(dir, 'disk.raw'), 'mixed', sizeMiB * 1024 * 1024, 7);
process.stdout.write(
  `made sample/disk.raw: ${stats.blocks} blocks of 64 KiB — ${stats.random} random, ${stats.duplicates} repeated, ${stats.zeros} written zeros, ${stats.holes} holes\n`,
);

step('raw → qcow2 + external data file', [...cli, 'convert', 'sample/disk.raw', 'sample/disk.qcow2']);
step('what the header says (never opens the data file)', [...cli, 'info', 'sample/disk.qcow2']);
step('structural check', [...cli, 'check', 'sample/disk.qcow2']);
step('qcow2 → raw, zero ranges as holes', [...cli, 'export', 'sample/disk.qcow2', 'sample/roundtrip.raw']);
step('byte-for-byte comparison with the original', [...cli, 'compare', 'sample/disk.raw', 'sample/roundtrip.raw']);

const hasQemu = spawnSync('sh', ['-c', 'command -v qemu-img'], { stdio: 'ignore' }).status === 0;
if (hasQemu) {
  // The image stores the data-file name relative to its own directory (disk.data), and qemu 7.2
  // resolves it against its working directory: run it from the image's directory.
  step('qemu-img agrees the image is clean', ['qemu-img', 'check', 'disk.qcow2'], { cwd: 'sample' });
  step('qemu-img reads the same bytes', ['qemu-img', 'compare', '-f', 'raw', '-F', 'qcow2', 'disk.raw', 'disk.qcow2'], { cwd: 'sample' });
} else {
  process.stdout.write('\n(qemu-img not installed: skipping the cross-check with qemu)\n');
}
process.stdout.write('\nsample: all steps passed. Files are in sample/.\n');
