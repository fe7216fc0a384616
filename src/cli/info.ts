/**
 * `qcow2-stream info <image> [--json]`: the header, read from the image file alone. The data
 * file and backing file are shown by their stored names and never opened (CVE-2024-4467).
 */

import type { Command } from 'commander';
import { action, printJson, writeStdout } from './common.js';
import type { ImageInfo, SnapshotInfo } from '../read/info.js';
import { parseFormat } from './export.js';
import type { ImageFormat } from '../read/image.js';

export function registerInfo(program: Command): void {
  program
    .command('info')
    .description("Show an image's header: sizes, features, data file and backing names (never opens them)")
    .argument('<image>', 'the image to inspect, a path or s3://bucket/key')
    .option('-f, --format <format>', 'qcow2, raw, vmdk, vpc or vhdx (default: probed)', parseFormat)
    .option('--json', 'print JSON (field names as in qemu-img info --output=json)')
    .addHelpText(
      'after',
      `
Only the image file is read: the data file and the backing file are shown by their stored
names and never opened, so info is safe on images from anyone.

Examples:
  qcow2-stream info disk.qcow2
  qcow2-stream info --json disk.qcow2`,
    )
    .action(
      action(async (imagePath: string, flags: { json?: boolean; format?: ImageFormat }) => {
        const { readImageInfo } = await import('../read/info.js');
        const info = await readImageInfo(imagePath, { format: flags.format });
        if (flags.json) printJson(qemuInfoJson(info));
        else writeStdout(formatInfo(info));
      }),
    );
}

/**
 * The API's camelCase info under qemu-img info's own names (`virtualSize` → `virtual-size`,
 * `extendedL2` → `extended-l2`), at every depth: `--json` stays what `qemu-img info
 * --output=json` prints. Keys only; values (`in-use`, `0.10`) are qemu's already.
 */
export function qemuInfoJson(info: ImageInfo): Record<string, unknown> {
  return kebabKeys(info) as Record<string, unknown>;
}

function kebabKeys(value: unknown): unknown {
  if (Array.isArray(value)) return value.map(kebabKeys);
  if (typeof value !== 'object' || value === null) return value;
  return Object.fromEntries(Object.entries(value).map(([key, inner]) => [key.replace(/[A-Z]/g, (letter) => `-${letter.toLowerCase()}`), kebabKeys(inner)]));
}

/** The human form, laid out like qemu-img info. */
export function formatInfo(info: ImageInfo): string {
  const lines = [
    `image: ${info.filename}`,
    `file format: ${info.format}`,
    `virtual size: ${qemuSize(info.virtualSize)} (${info.virtualSize} bytes)`,
    `disk size: ${qemuSize(info.actualSize)}`,
  ];
  if (info.clusterSize !== undefined) lines.push(`cluster_size: ${info.clusterSize}`);
  const backing = info.backingFilename;
  if (backing !== undefined) {
    const full = info.fullBackingFilename;
    lines.push(`backing file: ${backing} (${full !== undefined && full !== backing ? `actual path: ${full}, ` : ''}not opened)`);
  }
  if (info.backingFilenameFormat !== undefined) lines.push(`backing file format: ${info.backingFilenameFormat}`);
  if (info.snapshots?.length) {
    lines.push('Snapshot list:', snapshotRow(undefined));
    for (const snapshot of info.snapshots) lines.push(snapshotRow(snapshot));
  }
  const specific = info.formatSpecific?.data;
  if (specific) {
    lines.push('Format specific information:');
    const item = (name: string, value: unknown) => lines.push(`    ${name}: ${String(value)}`);
    item('compat', specific.compat);
    item('compression type', specific.compressionType);
    item('lazy refcounts', specific.lazyRefcounts);
    if (specific.bitmaps?.length) {
      // qemu's layout of a list of structs.
      lines.push('    bitmaps:');
      specific.bitmaps.forEach((bitmap, i) => {
        lines.push(`        [${i}]:`, '            flags:');
        bitmap.flags.forEach((flag, j) => lines.push(`                [${j}]: ${flag}`));
        lines.push(`            name: ${bitmap.name}`, `            granularity: ${bitmap.granularity}`);
      });
    }
    item('refcount bits', specific.refcountBits);
    if ('dataFileRaw' in specific) {
      item('data file', specific.dataFile === undefined ? '(not named)' : `${specific.dataFile} (not opened)`);
      item('data file raw', specific.dataFileRaw);
    }
    item('corrupt', specific.corrupt);
    item('extended l2', specific.extendedL2);
    if (info.dirtyFlag) item('dirty', true);
    if (info.features) item('feature bits', `incompatible ${info.features.incompatible}, compatible ${info.features.compatible}, autoclear ${info.features.autoclear}`);
  }
  return `${lines.join('\n')}\n`;
}

/**
 * One line of qemu's snapshot table (bdrv_snapshot_dump), or its header for `undefined`. The
 * date is in local time, as qemu prints it.
 */
export function snapshotRow(snapshot: SnapshotInfo | undefined): string {
  if (!snapshot) return `${'ID'.padEnd(10)}${'TAG'.padEnd(17)}${'VM SIZE'.padStart(8)}${'DATE'.padStart(20)}${'VM CLOCK'.padStart(13)}${'ICOUNT'.padStart(11)}`;
  const d = new Date(snapshot.dateSec * 1000);
  const two = (n: number) => String(n).padStart(2, '0');
  const date = `${d.getFullYear()}-${two(d.getMonth() + 1)}-${two(d.getDate())} ${two(d.getHours())}:${two(d.getMinutes())}:${two(d.getSeconds())}`;
  const secs = snapshot.vmClockSec;
  const millis = Math.floor(snapshot.vmClockNsec / 1_000_000) % 1000;
  const clock = `${two(Math.floor(secs / 3600))}:${two(Math.floor(secs / 60) % 60)}:${two(secs % 60)}.${String(millis).padStart(3, '0')}`;
  const icount = snapshot.icount === undefined ? '' : String(snapshot.icount);
  return `${snapshot.id.padEnd(9)} ${snapshot.name.padEnd(16)} ${qemuSize(snapshot.vmStateSize).padStart(8)}${date.padStart(20)}${clock.padStart(13)}${icount.padStart(11)}`;
}

/** qemu's size_to_str: three significant digits ("%0.3g") and a binary unit, switching at 1000. */
export function qemuSize(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB', 'EiB'];
  // frexp(bytes / (1000 / 1024)) gives floor(log2(bytes * 1024 / 1000)) + 1 as its exponent.
  const scaled = bytes / (1000 / 1024);
  const exponent = scaled === 0 ? 0 : Math.floor(Math.log2(scaled)) + 1;
  const unit = Math.max(0, Math.min(units.length - 1, Math.floor((exponent - 1) / 10)));
  const value = bytes / 2 ** (unit * 10);
  return `${String(Number(value.toPrecision(3)))} ${units[unit]}`;
}
