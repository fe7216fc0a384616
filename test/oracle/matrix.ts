/**
 * The wide oracle matrix (issue 13's "rerun a wide matrix of your own"): every qcow2 variant
 * qemu-img 7.2 makes, read back by us; every convert option on odd-sized inputs, read back by
 * qemu; qemu-io writes into our outputs. qemu-img is the oracle throughout. Not part of
 * `npm test` (a few minutes): run it with
 *
 *   npm run build && node --import tsx test/oracle/matrix.ts [--quick]
 *
 * It prints one line per failed check and the counts at the end; exit 1 on any failure.
 */

import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import * as zlib from 'node:zlib';
import { mixedExtents, writeRawImage } from '../helpers/images.js';

const root = fileURLToPath(new URL('../..', import.meta.url));
const cli = join(root, (JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as { bin: Record<string, string> }).bin['qcow2-stream']!);
const quick = process.argv.includes('--quick');
const dir = mkdtempSync(join(tmpdir(), 'qs-matrix-'));

let cases = 0;
let checks = 0;
const failures: string[] = [];

function run(command: string, args: readonly string[], input?: Buffer): { code: number; stdout: string; stderr: string } {
  const r = spawnSync(command, args, { cwd: dir, encoding: 'utf8', maxBuffer: 64 << 20, ...(input ? { input } : {}) });
  return { code: r.status ?? -1, stdout: r.stdout ?? '', stderr: r.stderr ?? '' };
}
const ours = (args: readonly string[], input?: Buffer) => run(process.execPath, [cli, ...args], input);
const qemu = (args: readonly string[]) => run('qemu-img', args);

/**
 * qemu-io `-c` arguments for [command, offset, length] requests, clipped to the image (its
 * virtual size is the input's, rounded up to a sector): qemu-io fails a request past the end,
 * and the smallest inputs are a sector.
 */
function ioCommands(size: number, requests: Array<[string, number, number]>): string[] {
  const end = Math.ceil(size / 512) * 512;
  const out: string[] = [];
  for (const [command, offset, length] of requests) {
    const start = Math.min(offset, end - 512);
    const clipped = Math.min(length, end - start);
    // Sector-aligned, as qemu-io's -z and discard want on a 512-byte-cluster image.
    const aligned = Math.floor(clipped / 512) * 512;
    if (aligned > 0) out.push('-c', `${command} ${Math.floor(start / 512) * 512} ${aligned}`);
  }
  return out;
}

/** One check: `ok` or a failure line naming the case and what differed. */
function expect(name: string, what: string, ok: boolean, detail = ''): void {
  checks++;
  if (!ok) failures.push(`${name}: ${what}${detail ? ` — ${detail.trim().split('\n')[0]}` : ''}`);
}

function sameFiles(a: string, b: string): boolean {
  return run('cmp', ['-s', a, b]).code === 0;
}

/** Odd-sized raw inputs with data, zeros and holes. */
const sizes = quick ? [3 * 1048576 + 4321] : [1, 511, 65536 * 5 + 513, 3 * 1048576 + 4321, 9 * 1048576 + 7];
function rawInput(size: number, seed: number): string {
  const path = join(dir, `in-${size}-${seed}.raw`);
  writeRawImage(path, size, mixedExtents(size, 65536, seed), seed);
  return path;
}

const qemuVersion = qemu(['--version']).stdout.split('\n')[0];
/** This Node writes zstd (node:zlib has it from 22.15); qemu reads it. */
const ourZstd = typeof (zlib as unknown as { zstdCompressSync?: unknown }).zstdCompressSync === 'function';
const zstd = !qemu(['create', '-q', '-f', 'qcow2', '-o', 'compression_type=zstd', join(dir, 'probe-zstd.qcow2'), '1M']).code;

/** qemu-made variants: -o options and whether to compress (-c). */
function qemuVariants(): Array<{ name: string; options: string; compress?: boolean }> {
  const out: Array<{ name: string; options: string; compress?: boolean }> = [];
  const clusters = quick ? [65536] : [512, 4096, 65536, 2097152];
  for (const cs of clusters) {
    for (const rb of quick ? [16] : [1, 16, 64]) out.push({ name: `cs${cs}-rb${rb}`, options: `cluster_size=${cs},refcount_bits=${rb}` });
    if (cs >= 16384) out.push({ name: `cs${cs}-extl2`, options: `cluster_size=${cs},extended_l2=on` });
    out.push({ name: `cs${cs}-compat010`, options: `cluster_size=${cs},compat=0.10` });
    out.push({ name: `cs${cs}-zlib`, options: `cluster_size=${cs}`, compress: true });
    if (zstd) out.push({ name: `cs${cs}-zstd`, options: `cluster_size=${cs},compression_type=zstd`, compress: true });
    out.push({ name: `cs${cs}-prealloc`, options: `cluster_size=${cs},preallocation=metadata` });
    out.push({ name: `cs${cs}-lazy`, options: `cluster_size=${cs},lazy_refcounts=on` });
  }
  out.push({ name: 'datafile-raw', options: 'data_file=DATA,data_file_raw=on' });
  out.push({ name: 'datafile', options: 'data_file=DATA' });
  return out;
}

/** Our export and map of a qemu-made image against qemu's own reading of it. */
function readQemuImage(name: string, raw: string, options: string, compress: boolean): void {
  cases++;
  const image = join(dir, `${name}.qcow2`);
  const data = join(dir, `${name}.data`);
  rmSync(image, { force: true });
  rmSync(data, { force: true });
  const made = qemu(['convert', '-q', '-f', 'raw', '-O', 'qcow2', ...(compress ? ['-c'] : []), '-o', options.replace('DATA', data), raw, image]);
  if (made.code !== 0) {
    // A combination qemu refuses (e.g. preallocation with an odd size) is not ours to read.
    cases--;
    return;
  }
  // qemu-io writes after creation: allocations in the middle, a zeroed range, a discard.
  const io = run('qemu-io', ['-f', 'qcow2', ...ioCommands(readFileSync(raw).length, [['write -P 0x5c', 4096, 8192], ['write -z', 65536, 65536], ['discard', 131072, 65536]]), image]);
  expect(name, 'qemu-io writes', io.code === 0, io.stderr);
  const exported = join(dir, `${name}.ours.raw`);
  const reference = join(dir, `${name}.qemu.raw`);
  const e = ours(['export', '--quiet', '--force', image, exported]);
  expect(name, 'export exits 0', e.code === 0, e.stderr);
  qemu(['convert', '-q', '-f', 'qcow2', '-O', 'raw', image, reference]);
  expect(name, 'export equals qemu convert -O raw', sameFiles(exported, reference));
  const c = ours(['check', image]);
  expect(name, 'our check agrees with qemu check (clean)', c.code === qemu(['check', '-q', image]).code, c.stdout + c.stderr);
  const cmp = ours(['compare', reference, image]);
  expect(name, 'our compare says identical', cmp.code === 0, cmp.stdout + cmp.stderr);
  const info = ours(['info', '--json', image]);
  const qinfo = qemu(['info', '--output=json', image]);
  if (info.code === 0 && qinfo.code === 0) {
    const a = JSON.parse(info.stdout) as Record<string, unknown>;
    const b = JSON.parse(qinfo.stdout) as Record<string, unknown>;
    for (const key of ['virtual-size', 'cluster-size', 'format']) expect(name, `info ${key}`, JSON.stringify(a[key]) === JSON.stringify(b[key]), `${String(a[key])} vs ${String(b[key])}`);
  } else expect(name, 'info exits 0', false, info.stderr + qinfo.stderr);
  for (const f of [exported, reference]) rmSync(f, { force: true });
}

/** Our convert with `args` read back by qemu: check, compare, then qemu-io writes and again. */
function convertCase(name: string, raw: string, args: readonly string[], viaPipe = false, toPipe = false): void {
  cases++;
  const image = join(dir, `${name}.qcow2`);
  for (const f of [image, join(dir, `${name}.data`)]) rmSync(f, { force: true });
  const internal = args.includes('--internal');
  const outputArgs = internal ? [image] : [image, '--data-file', join(dir, `${name}.data`)];
  const size = readFileSync(raw).length;
  const quote = (a: string) => `'${a.replace(/'/g, `'\\''`)}'`;
  // A single-file image to a pipe: plan, then emit in order (spliced from the input with the addon).
  const r = toPipe
    ? run('bash', ['-c', `set -o pipefail; ${[process.execPath, cli, 'convert', '--quiet', '--no-sync', raw, '-', ...args].map(quote).join(' ')} | cat > ${quote(image)}`])
    : viaPipe
      ? ours(['convert', '--quiet', '--no-sync', '-', ...outputArgs, '--size', String(size), ...args], readFileSync(raw))
      : ours(['convert', '--quiet', '--no-sync', raw, ...outputArgs, ...args]);
  expect(name, 'convert exits 0', r.code === 0, r.stderr);
  if (r.code !== 0) return;
  const check = qemu(['check', '-q', image]);
  expect(name, 'qemu-img check clean', check.code === 0, check.stdout + check.stderr);
  const cmp = qemu(['compare', '-q', '-f', 'raw', '-F', 'qcow2', raw, image]);
  expect(name, 'qemu-img compare identical', cmp.code === 0, cmp.stdout + cmp.stderr);
  const io = run('qemu-io', ['-f', 'qcow2', ...ioCommands(size, [['write -P 0xa5', 0, 4096], ['write -P 0x3c', Math.max(0, Math.floor(size / 2) - 4096), 8192], ['write -z', 65536, 65536]]), image]);
  expect(name, 'qemu-io writes into our output', io.code === 0, io.stderr);
  const check2 = qemu(['check', '-q', image]);
  expect(name, 'qemu-img check clean after qemu-io', check2.code === 0, check2.stdout + check2.stderr);
  const exported = join(dir, `${name}.ours.raw`);
  const reference = join(dir, `${name}.qemu.raw`);
  ours(['export', '--quiet', '--force', image, exported]);
  qemu(['convert', '-q', '-f', 'qcow2', '-O', 'raw', image, reference]);
  expect(name, 'after qemu-io: our export equals qemu convert -O raw', sameFiles(exported, reference));
  for (const f of [exported, reference]) rmSync(f, { force: true });
}

function convertOptions(): Array<{ name: string; args: string[]; pipe?: boolean; toPipe?: boolean }> {
  const out: Array<{ name: string; args: string[]; pipe?: boolean; toPipe?: boolean }> = [];
  for (const cs of quick ? ['65536'] : ['512', '4096', '65536', '2097152']) {
    out.push({ name: `ext-cs${cs}`, args: ['--cluster-size', cs] });
    out.push({ name: `ext-cs${cs}-noraw`, args: ['--cluster-size', cs, '--no-data-file-raw'] });
    out.push({ name: `int-cs${cs}`, args: ['--internal', '--cluster-size', cs] });
    out.push({ name: `int-cs${cs}-dedup`, args: ['--internal', '--dedup', '--cluster-size', cs] });
    out.push({ name: `int-cs${cs}-zlib`, args: ['--internal', '--compress', '--cluster-size', cs] });
    out.push({ name: `int-stdout-cs${cs}`, args: ['--internal', '--cluster-size', cs], toPipe: true });
    out.push({ name: `int-stdout-cs${cs}-dedup`, args: ['--internal', '--dedup', '--cluster-size', cs], toPipe: true });
  }
  out.push({ name: 'int-stdout-zlib', args: ['--internal', '--compress'], toPipe: true });
  for (const rb of quick ? ['16'] : ['1', '2', '8', '16', '64']) out.push({ name: `ext-rb${rb}`, args: ['--refcount-bits', rb] });
  out.push({ name: 'int-rb64-dedup', args: ['--internal', '--dedup', '--refcount-bits', '64'] });
  out.push({ name: 'int-dedup-zlib', args: ['--internal', '--dedup', '--compress'] });
  if (zstd && ourZstd) out.push({ name: 'int-zstd', args: ['--internal', '--compress', '--compression-type', 'zstd'] });
  out.push({ name: 'ext-pipe', args: [], pipe: true });
  out.push({ name: 'ext-pipe-noraw', args: ['--no-data-file-raw'], pipe: true });
  return out;
}

try {
  let seed = 1;
  for (const size of sizes) {
    const raw = rawInput(size, seed++);
    for (const v of qemuVariants()) readQemuImage(`q-${v.name}-${size}`, raw, v.options, v.compress ?? false);
    for (const o of convertOptions()) convertCase(`c-${o.name}-${size}`, raw, o.args, o.pipe ?? false, o.toPipe ?? false);
    // An overlay over our own conversion: the base is the previous day.
    const base = join(dir, `base-${size}.qcow2`);
    ours(['convert', '--quiet', '--no-sync', raw, base, '--force']);
    const changed = join(dir, `day2-${size}.raw`);
    const bytes = readFileSync(raw);
    if (bytes.length > 8192) bytes.fill(0x77, 4096, 8192);
    writeFileSync(changed, bytes);
    convertCase(`c-overlay-${size}`, changed, ['--base', base]);
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}

for (const f of failures) process.stdout.write(`FAIL ${f}\n`);
process.stdout.write(`oracle matrix: ${cases} cases, ${checks} checks, ${failures.length} failed (${qemuVersion}; Node ${process.version}${ourZstd ? '' : ', no zstd writes'}${quick ? '; --quick' : ''})\n`);
process.exitCode = failures.length ? 1 : 0;
