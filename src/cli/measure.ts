/**
 * `qcow2-stream measure [--size N | IMAGE] [layout options]`: the space a conversion needs, in
 * qemu-img measure's terms (`required`, `fully-allocated`), for the data-file layout (metadata
 * file and data file separately), the internal one, compressed images and overlays.
 */

import type { Command } from 'commander';
import type { MeasureResult } from '../write/measure.js';
import { action, formatBytes, parseInteger, parseSize, printJson, writeStdout } from './common.js';

interface MeasureFlags {
  size?: number;
  internal?: boolean;
  compress?: boolean;
  compressionType?: string;
  threads?: number;
  dedup?: boolean;
  base?: string;
  allowUnsafePaths?: boolean;
  clusterSize?: number;
  refcountBits?: number;
  dataFileRaw: boolean;
  json?: boolean;
}

export function registerMeasure(program: Command): void {
  program
    .command('measure')
    .description('Print the space a conversion needs: required and fully-allocated bytes, like qemu-img measure')
    .argument('[image]', 'the raw image to convert (a regular file); or give --size')
    .option('--size <n>', 'measure an empty image of this virtual size instead, e.g. 20G', parseSize)
    .option('--cluster-size <n>', 'cluster size, a power of two from 512 to 2M', parseSize, 65536)
    .option('--refcount-bits <n>', 'refcount width: 1, 2, 4, 8, 16, 32 or 64', parseInteger, 16)
    .option('--no-data-file-raw', 'clear the raw-data-file bit (only the L2 tables that map data are written)')
    .option('--internal', 'measure one self-contained qcow2 file (no data file)')
    .option('-c, --compress', 'with --internal: compressed clusters (the input is compressed to measure them)')
    .option('--compression-type <type>', 'zlib (default) or zstd; implies --compress')
    .option('--threads <n>', 'compression threads (default: one per core)', parseInteger)
    .option('--dedup', 'with --internal: identical clusters stored once')
    .option('--base <image>', 'measure the overlay over this earlier image')
    .option('--allow-unsafe-paths', 'follow data-file and backing names stored in --base even outside its directory')
    .option('--json', 'print JSON ({"required", "fully-allocated", ...}, as qemu-img measure --output=json)')
    .addHelpText(
      'after',
      `
With the default data-file layout the metadata file and the data file are reported separately
(the data file's length is always the virtual size; "required" counts the bytes it allocates).
Compressed sizes come from compressing the input as convert would; with --size alone they
cannot be known, and fully-allocated is the uncompressed bound.

Examples:
  qcow2-stream measure disk.raw                         # data-file layout
  qcow2-stream measure disk.raw --internal --compress
  qcow2-stream measure --size 20G --internal --json`,
    )
    .action(
      action(async (image: string | undefined, flags: MeasureFlags) => {
        const { measure } = await import('../write/measure.js');
        const result = await measure({
          ...(image === undefined ? {} : { input: image }),
          ...(flags.size === undefined ? {} : { size: flags.size }),
          layout: flags.internal ? 'internal' : 'external',
          clusterSize: flags.clusterSize ?? 65536,
          refcountBits: flags.refcountBits ?? 16,
          ...(flags.dataFileRaw ? {} : { dataFileRaw: false }),
          ...(flags.compress || flags.compressionType !== undefined ? { compression: (flags.compressionType ?? 'zlib') as 'zlib' | 'zstd' } : {}),
          ...(flags.threads === undefined ? {} : { compressionThreads: flags.threads }),
          ...(flags.dedup ? { dedup: true } : {}),
          ...(flags.base === undefined ? {} : { base: flags.base }),
          ...(flags.allowUnsafePaths ? { allowUnsafePaths: true } : {}),
        });
        if (flags.json) printJson(toJson(result));
        else writeStdout(describeMeasure(result));
      }),
    );
}

/** qemu-img measure's JSON names, plus our per-file split. */
function toJson(r: MeasureResult): Record<string, unknown> {
  return {
    required: r.required,
    'fully-allocated': r.fullyAllocated,
    layout: r.layout,
    'virtual-size': r.virtualSize,
    'cluster-size': r.clusterSize,
    ...(r.files
      ? {
          metadata: { required: r.files.metadata.required, 'fully-allocated': r.files.metadata.fullyAllocated },
          'data-file': { required: r.files.dataFile.required, 'fully-allocated': r.files.dataFile.fullyAllocated },
        }
      : {}),
    ...(r.compression ? { compression: r.compression.type, 'required-is': r.compression.required === 'measured' ? 'measured' : 'unknown (no input)' } : {}),
  };
}

function describeMeasure(r: MeasureResult): string {
  const lines = [`required size: ${r.required}`, `fully allocated size: ${r.fullyAllocated}`];
  if (r.files) {
    lines.push(
      `  metadata file: required ${r.files.metadata.required} (${formatBytes(r.files.metadata.required)}), fully allocated ${r.files.metadata.fullyAllocated}`,
      `  data file:     required ${r.files.dataFile.required} (${formatBytes(r.files.dataFile.required)}), fully allocated ${r.files.dataFile.fullyAllocated}`,
    );
  }
  if (r.compression) {
    lines.push(
      r.compression.required === 'measured'
        ? `  compressed (${r.compression.type}): required measured by compressing the input; fully allocated is the uncompressed bound`
        : `  compressed (${r.compression.type}): required unknown without an input (empty image shown); fully allocated is the uncompressed bound`,
    );
  }
  return `${lines.join('\n')}\n`;
}
