/**
 * `qcow2-stream info <image> [--json]`: the header, read from the image file alone. The data
 * file and backing file are shown by their stored names and never opened (CVE-2024-4467).
 */

import type { Command } from 'commander';
import { action, formatBytes, printJson, writeStdout } from './common.js';
import type { ImageInfo } from '../read/info.js';
import { parseFormat } from './export.js';
import type { ImageFormat } from '../read/image.js';

export function registerInfo(program: Command): void {
  program
    .command('info')
    .description("Show an image's header: sizes, features, data file and backing names (never opens them)")
    .argument('<image>', 'the image to inspect')
    .option('-f, --format <format>', 'qcow2 or raw (default: probed)', parseFormat)
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
        const info = await readImageInfo(imagePath, flags.format);
        if (flags.json) printJson(info);
        else writeStdout(formatInfo(info));
      }),
    );
}

/** The human form, laid out like qemu-img info. */
export function formatInfo(info: ImageInfo): string {
  const lines = [
    `image: ${info.filename}`,
    `file format: ${info.format}`,
    `virtual size: ${formatBytes(info['virtual-size'])} (${info['virtual-size']} bytes)`,
    `disk size: ${formatBytes(info['actual-size'])}`,
  ];
  if (info['cluster-size'] !== undefined) lines.push(`cluster_size: ${info['cluster-size']}`);
  if (info['backing-filename'] !== undefined) lines.push(`backing file: ${info['backing-filename']} (not opened)`);
  if (info['backing-filename-format'] !== undefined) lines.push(`backing file format: ${info['backing-filename-format']}`);
  const specific = info['format-specific']?.data;
  if (specific) {
    lines.push('Format specific information:');
    const item = (name: string, value: unknown) => lines.push(`    ${name}: ${String(value)}`);
    item('compat', specific.compat);
    item('compression type', specific['compression-type']);
    item('lazy refcounts', specific['lazy-refcounts']);
    item('refcount bits', specific['refcount-bits']);
    if ('data-file-raw' in specific) {
      item('data file', specific['data-file'] === undefined ? '(not named)' : `${specific['data-file']} (not opened)`);
      item('data file raw', specific['data-file-raw']);
    }
    if (specific.bitmaps) item('bitmaps', specific.bitmaps.consistent ? 'present' : 'present, inconsistent');
    item('corrupt', specific.corrupt);
    item('extended l2', specific['extended-l2']);
    if (info['dirty-flag']) item('dirty', true);
    if (info.features) item('feature bits', `incompatible ${info.features.incompatible}, compatible ${info.features.compatible}, autoclear ${info.features.autoclear}`);
  }
  return `${lines.join('\n')}\n`;
}
