/**
 * `qcow2-stream wrap <raw> <output>`: qcow2 metadata around an existing raw file, which is
 * used as the data file as it is (never modified).
 */

import type { Command } from 'commander';
import { createProgress } from './progress.js';
import type { WrapSummary } from '../write/wrap.js';
import { action, deferWarning, formatBytes, parseInteger, parseSize, processSignal, reportSummary } from './common.js';

interface WrapFlags {
  dataFileName?: string;
  clusterSize?: number;
  refcountBits?: number;
  dataFileRaw: boolean;
  quiet?: boolean;
  /** commander's --no-sync: false when given. */
  sync: boolean;
  force?: boolean;
  json?: boolean;
}

export function registerWrap(program: Command): void {
  program
    .command('wrap')
    .description('Write qcow2 metadata that uses an existing raw file as its data file; the raw file is never modified')
    .argument('<raw>', 'the raw image file (opened read-only)')
    .argument('<output>', "qcow2 metadata file, or '-' for standard output")
    .option('--data-file-name <name>', "the data-file name stored in the image (default: RAW relative to OUTPUT's directory, absolute when outside it)")
    .option('--cluster-size <n>', 'cluster size, a power of two from 512 to 2M', parseSize, 65536)
    .option('--refcount-bits <n>', 'refcount width: 1, 2, 4, 8, 16, 32 or 64', parseInteger, 16)
    .option('--no-data-file-raw', 'clear the raw-data-file bit and leave zero clusters unallocated (reads the raw file once)')
    .option('--force', 'replace existing files at the output paths (never a file this run reads)')
    .option('--no-sync', 'skip the fsync of the outputs before exiting (faster; a crash soon after may lose them)')
    .option('-q, --quiet', 'print nothing on success')
    .option('--json', 'print a JSON summary (to standard error when the metadata goes to standard output)')
    .addHelpText(
      'after',
      `
Unlike 'qemu-img create -o data_file=RAW', this never truncates or rewrites RAW. A raw size that
is not a multiple of 512 is rounded up in the image; qemu reads the missing tail as zeros.
The stored name is RAW relative to OUTPUT's directory (absolute when RAW lies outside it), so
the pair can move together; qemu 7.2 resolves a relative name against its working directory,
so run qemu from OUTPUT's directory (or store an absolute name with --data-file-name).

Example:
  qcow2-stream wrap disk.raw disk.qcow2 && qemu-img info disk.qcow2`,
    )
    .action(
      action(async (raw: string, output: string, flags: WrapFlags) => {
        // Only the sparse mode reads the raw file; the raw mode is instant.
        const progress = await createProgress({ label: 'wrap (scanning)', quiet: Boolean(flags.quiet || flags.json || flags.dataFileRaw) });
        const { wrap } = await import('../write/wrap.js');
        let summary: WrapSummary;
        try {
          summary = await wrap({
            input: raw,
            output,
            sync: flags.sync,
            overwrite: flags.force ?? false,
            clusterSize: flags.clusterSize ?? 65536,
            refcountBits: flags.refcountBits ?? 16,
            dataFileRaw: flags.dataFileRaw,
            signal: processSignal(),
            onProgress: progress.update,
            onWarning: deferWarning,
            ...(flags.dataFileName === undefined ? {} : { dataFileName: flags.dataFileName }),
          });
        } finally {
          progress.stop();
        }
        reportSummary(summary, flags, output === '-', () => describeWrap(output, summary));
      }),
    );
}

export function describeWrap(output: string, s: WrapSummary): string {
  const target = output === '-' ? 'standard output' : output;
  const mode = s.dataFileRaw ? 'raw data file' : `sparse metadata, ${s.dataClusters} data / ${s.zeroClusters} zero clusters`;
  return `${target}: ${formatBytes(s.virtualSize)} virtual over data file ${s.dataFileName} (${mode}); wrote ${formatBytes(s.metadataBytesWritten)} metadata in ${s.seconds.toFixed(2)} s`;
}
