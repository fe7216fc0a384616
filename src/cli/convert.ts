/**
 * `qcow2-stream convert <input|-> <output|->`: raw → qcow2 with an external data file.
 */

import type { Command } from 'commander';
import { convert, type ConvertProgress, type ConvertSummary } from '../write/convert.js';
import { action, formatBytes, parseInteger, parseSize, printJson, processSignal } from './common.js';

interface ConvertFlags {
  dataFile?: string;
  dataFileName?: string;
  size?: number;
  clusterSize?: number;
  refcountBits?: number;
  dataFileRaw: boolean;
  force?: boolean;
  quiet?: boolean;
  json?: boolean;
}

export function registerConvert(program: Command): void {
  program
    .command('convert')
    .description('Convert a raw image into qcow2 metadata plus a raw external data file')
    .argument('<input>', "raw image file, or '-' for standard input")
    .argument('<output>', "qcow2 metadata file, or '-' for standard output")
    .option('--data-file <path>', 'the data file to write (default: OUTPUT with its extension replaced by .data; required when OUTPUT is -)')
    .option('--data-file-name <name>', 'the data-file name stored in the image (default: the --data-file path as given)')
    .option('--size <n>', 'input size, e.g. 20G: lets the metadata stream with the data and checks the input length', parseSize)
    .option('--cluster-size <n>', 'cluster size, a power of two from 512 to 2M', parseSize, 65536)
    .option('--refcount-bits <n>', 'refcount width: 1, 2, 4, 8, 16, 32 or 64', parseInteger, 16)
    .option('--no-data-file-raw', 'clear the raw-data-file bit: zero clusters stay unallocated in the metadata')
    .option('--force', 'replace an existing data file')
    .option('-q, --quiet', 'print nothing on success')
    .option('--json', 'print a JSON summary (to standard error when the metadata goes to standard output)')
    .addHelpText(
      'after',
      `
The data file receives the guest data 1:1 (zero clusters become holes); the metadata file holds
the header and the tables. Relative data-file names are stored as given; qemu resolves them
against its working directory, so run qemu from the directory you converted in, or pass an
absolute --data-file.

Examples:
  qcow2-stream convert disk.raw disk.qcow2                      # writes disk.data
  curl -s URL | qcow2-stream convert - disk.qcow2 --size 20G
  qcow2-stream convert disk.raw - --data-file disk.data > disk.qcow2`,
    )
    .action(
      action(async (input: string, output: string, flags: ConvertFlags) => {
        const progress = progressLine(!flags.quiet && !flags.json);
        let summary: ConvertSummary;
        try {
          summary = await convert({
            input,
            output,
            clusterSize: flags.clusterSize ?? 65536,
            refcountBits: flags.refcountBits ?? 16,
            dataFileRaw: flags.dataFileRaw,
            overwrite: flags.force ?? false,
            signal: processSignal(),
            onProgress: progress.update,
            ...(flags.dataFile === undefined ? {} : { dataFile: flags.dataFile }),
            ...(flags.dataFileName === undefined ? {} : { dataFileName: flags.dataFileName }),
            ...(flags.size === undefined ? {} : { size: flags.size }),
          });
        } finally {
          progress.clear();
        }
        if (flags.json) {
          // Standard output may be carrying the image itself: never mix JSON into it.
          if (output === '-') process.stderr.write(`${JSON.stringify(summary, null, 2)}\n`);
          else printJson(summary);
        } else if (!flags.quiet) {
          process.stderr.write(`${describeConvert(output, summary)}\n`);
        }
      }),
    );
}

/** Two lines: what was made, and what it cost. */
export function describeConvert(output: string, s: ConvertSummary): string {
  const target = output === '-' ? 'standard output' : output;
  const mode = s.dataFileRaw ? 'raw data file' : 'sparse metadata';
  return (
    `${target}: ${formatBytes(s.virtualSize)} virtual, ${formatBytes(s.clusterSize)} clusters, ${mode}, data file ${s.dataFile ?? s.dataFileName}\n` +
    `${s.dataClusters} data / ${s.zeroClusters} zero clusters; wrote ${formatBytes(s.dataBytesWritten)} data + ${formatBytes(s.metadataBytesWritten)} metadata in ${s.seconds.toFixed(2)} s`
  );
}

/** A one-line progress display on a terminal's standard error; silent elsewhere. */
function progressLine(enabled: boolean): { update: (p: ConvertProgress) => void; clear: () => void } {
  const active = enabled && process.stderr.isTTY === true;
  let shown = false;
  let last = 0;
  return {
    update(p) {
      if (!active) return;
      const now = Date.now();
      if (now - last < 200) return;
      last = now;
      const total = p.bytesTotal;
      const percent = total ? ` ${((100 * p.bytesDone) / total).toFixed(0).padStart(3)}%` : '';
      process.stderr.write(`\r\x1b[Kconverting:${percent} ${formatBytes(p.bytesDone)}${total ? ` / ${formatBytes(total)}` : ''}`);
      shown = true;
    },
    clear() {
      if (shown) process.stderr.write('\r\x1b[K');
    },
  };
}
