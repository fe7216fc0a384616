/**
 * `qcow2-stream map <image> [--json]`: the image's extents. JSON uses qemu-img map's field
 * names (start, length, depth, present, zero, data, offset); the human table is qemu's.
 */

import type { Command } from 'commander';
import { action, deferWarning, MAX_CHAIN_DEPTH_OPTION, parseChainDepth, writeStdout } from './common.js';
import type { ImageFormat } from '../read/image.js';
import { parseFormat } from './export.js';

interface MapFlags {
  json?: boolean;
  format?: ImageFormat;
  dataFile?: string;
  backing?: string;
  allowUnsafePaths?: boolean;
  maxChainDepth?: number;
}

export function registerMap(program: Command): void {
  program
    .command('map')
    .description('List the extents of an image: data, zero, unallocated, and where the data lives')
    .argument('<image>', 'the image to map, a path or s3://bucket/key')
    .option('-f, --format <format>', 'qcow2, raw, vmdk, vpc or vhdx (default: probed)', parseFormat)
    .option('--data-file <path>', 'use this external data file instead of the name stored in the image')
    .option('--backing <path>', 'use this backing image instead of the name stored in the image')
    .option('--allow-unsafe-paths', 'follow names stored in the image even outside its directory')
    .option(...MAX_CHAIN_DEPTH_OPTION, parseChainDepth)
    .option('--json', 'print JSON like qemu-img map --output=json')
    .addHelpText(
      'after',
      `
Examples:
  qcow2-stream map disk.qcow2
  qcow2-stream map --json overlay.qcow2 | jq '.[] | select(.data)'`,
    )
    .action(
      action(async (imagePath: string, flags: MapFlags) => {
        const [{ openDisk }, { formatMapHumanRow, formatMapJsonEntry, MAP_HUMAN_HEADER, mapImage }] = await Promise.all([
          import('../read/image.js'),
          import('../read/map.js'),
        ]);
        const image = await openDisk(imagePath, {
          ...(flags.format ? { format: flags.format } : {}),
          ...(flags.dataFile ? { dataFile: flags.dataFile } : {}),
          ...(flags.backing ? { backing: flags.backing } : {}),
          ...(flags.allowUnsafePaths ? { allowUnsafePaths: true } : {}),
          ...(flags.maxChainDepth === undefined ? {} : { maxChainDepth: flags.maxChainDepth }),
          onWarning: deferWarning,
        });
        try {
          // Entries are printed as they come: a map of a huge image never sits in memory.
          const out: string[] = [];
          const flush = () => {
            if (out.length) writeStdout(out.join(''));
            out.length = 0;
          };
          if (flags.json) {
            let first = true;
            for await (const entry of mapImage(image)) {
              out.push(`${first ? '[' : ',\n'}${formatMapJsonEntry(entry)}`);
              first = false;
              if (out.length >= 256) flush();
            }
            out.push(first ? '[]\n' : ']\n');
          } else {
            out.push(`${MAP_HUMAN_HEADER}\n`);
            for await (const entry of mapImage(image)) {
              const row = formatMapHumanRow(entry);
              if (row !== undefined) out.push(`${row}\n`);
              if (out.length >= 256) flush();
            }
          }
          flush();
        } finally {
          await image.close();
        }
      }),
    );
}
