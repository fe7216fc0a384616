/**
 * `qcow2-stream convert <input|-> <output|->`: raw → qcow2 with an external data file.
 */

import { Command } from 'commander';
import type { ConvertOptions, ConvertSummary } from '../write/convert.js';
import { createProgress } from './progress.js';
import type { ImageFormat } from '../read/image.js';
import { parseFormat } from './export.js';
import { action, deferWarning, formatBytes, MAX_CHAIN_DEPTH_OPTION, parseChainDepth, parseInteger, parseSize, processSignal, reportSummary } from './common.js';

/** convert's parsed options, as commander hands them over. */
export interface ConvertFlags {
  format?: ImageFormat;
  internal?: boolean;
  dedup?: boolean;
  dedupIndexLimit?: number;
  compress?: boolean;
  compressionType?: string;
  threads?: number;
  base?: string;
  baseName?: string;
  baseManifest?: string;
  manifest?: string;
  allowUnsafePaths?: boolean;
  maxChainDepth?: number;
  dataFile?: string;
  dataFileName?: string;
  size?: number;
  clusterSize?: number;
  refcountBits?: number;
  dataFileRaw: boolean;
  force?: boolean;
  quiet?: boolean;
  /** commander's --no-sync: false when given. */
  sync: boolean;
  json?: boolean;
  bitmap?: string;
  tlsCa?: string;
  tlsCert?: string;
  tlsKey?: string;
  nbdTimeout?: number;
}

export function registerConvert(program: Command): void {
  program.addCommand(
    defineConvert(new Command('convert')).action(
      action(async (input: string, output: string, flags: ConvertFlags) => {
        const progress = await createProgress({ label: 'convert', quiet: Boolean(flags.quiet || flags.json) });
        const { convert } = await import('../write/convert.js');
        let summary: ConvertSummary;
        try {
          summary = await convert({
            ...convertOptions(input, output, flags),
            signal: processSignal(),
            onProgress: progress.update,
            // Often enough for a smooth bar on a slow pipe; the bar itself redraws at most every 100 ms.
            progressInterval: 1024 * 1024,
            onWarning: deferWarning,
          });
        } finally {
          progress.stop();
        }
        reportSummary(summary, flags, output === '-', () => describeConvert(output, summary));
      }),
    ),
  );
}

/**
 * convert's arguments, options and help on `command`, without an action: the CLI adds one,
 * and fleet jobs (src/fleet/job.ts) parse their payloads with exactly the same definition.
 */
export function defineConvert(command: Command): Command {
  return command
    .description('Convert a disk image into qcow2 metadata plus a raw external data file')
    .argument('<input>', "the image to read (raw, qcow2, vmdk, vpc, vhdx; probed), s3://bucket/key (probed like a file), '-' for standard input, or an NBD URI (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH, nbds://…)")
    .argument('<output>', "qcow2 metadata file, s3://bucket/key, or '-' for standard output")
    .option('-f, --format <format>', 'format of <input> (default: probed; raw for standard input)', parseFormat)
    .option('--data-file <path>', 'the data file to write, a path or s3://bucket/key (default: OUTPUT with its extension replaced by .data; required when OUTPUT is -)')
    .option('--data-file-name <name>', "the data-file name stored in the image (default: the data file relative to OUTPUT's directory, absolute when outside it)")
    .option('--size <n>', 'input size, e.g. 20G: lets the metadata stream with the data and checks the input length', parseSize)
    .option('--cluster-size <n>', 'cluster size, a power of two from 512 to 2M', parseSize, 65536)
    .option('--refcount-bits <n>', 'refcount width: 1, 2, 4, 8, 16, 32 or 64', parseInteger, 16)
    .option('--no-data-file-raw', 'clear the raw-data-file bit: zero clusters stay unallocated in the metadata')
    .option('--internal', 'write one self-contained qcow2 file (no data file); OUTPUT must be a regular file')
    .option('--dedup', 'with --internal: store identical clusters once (matches confirmed byte for byte)')
    .option('-c, --compress', 'with --internal: store clusters compressed (zlib unless --compression-type), like qemu-img convert -c')
    .option('--compression-type <type>', 'zlib (default) or zstd (Node.js 22.15+); implies --compress')
    .option('--threads <n>', 'compression threads (default: one per core; the image is the same whatever the count)', parseInteger)
    .option('--dedup-index-limit <n>', 'most distinct clusters the dedup index holds (~23 bytes each); past it, new content is not deduplicated', parseInteger)
    .option('--base <image>', 'an earlier image of this disk: write an overlay backed by it, holding only the clusters that changed')
    .option('--base-name <name>', 'the backing-file name stored in the overlay (default: --base relative to OUTPUT\'s directory)')
    .option('--base-manifest <path>', "compare with this manifest of --base instead of reading it (made with --manifest)")
    .option('--manifest <path>', 'also write the fingerprint of every cluster to this file, for a later --base-manifest')
    .option('--allow-unsafe-paths', 'follow data-file and backing names stored in the input and --base even outside their directory')
    .option(...MAX_CHAIN_DEPTH_OPTION, parseChainDepth)
    .option('--bitmap <name>', 'NBD input: read only the clusters this dirty bitmap marks (qemu:dirty-bitmap:NAME), into an overlay of --base')
    .option('--tls-ca <file>', 'nbds:// input: the CA certificate (PEM) the server\'s certificate must chain to')
    .option('--tls-cert <file>', 'nbds:// input: our client certificate (PEM), for servers that check clients')
    .option('--tls-key <file>', 'nbds:// input: the private key (PEM) of --tls-cert')
    .option('--nbd-timeout <seconds>', 'NBD input: give up when the server sends nothing for this long', parseInteger, 30)
    .option('--force', 'replace existing files or s3:// objects at the output paths (never a file this run reads)')
    .option('--no-sync', 'skip the fsync of the outputs before exiting (faster; a crash soon after may lose them)')
    .option('-q, --quiet', 'print nothing on success')
    .option('--json', 'print a JSON summary (to standard error when the metadata goes to standard output)')
    .addHelpText(
      'after',
      `
The data file receives the guest data 1:1 (zero clusters become holes); the metadata file holds
the header and the tables. The stored data-file name is relative to OUTPUT's directory (absolute
when the data file lies outside it), so the pair can move together. qemu 7.2 resolves a
relative name against its working directory: run qemu from OUTPUT's directory, or store an
absolute name with --data-file-name.

Objects (s3://bucket/key, for the input, OUTPUT and --data-file) use the AWS SDK's standard
configuration (AWS_PROFILE, AWS_REGION, AWS_ACCESS_KEY_ID…; AWS_ENDPOINT_URL for S3-compatible
stores, path-style). They upload as multipart streams that appear only when complete, and an
existing object is not replaced without --force. Objects are not sparse: every zero cluster of
a data file is uploaded and stored as bytes. For mostly-empty disks in object storage use
--internal: zero clusters are left out of the one object. (--no-data-file-raw marks them
unallocated, so readers skip them, but the data object still holds them as zeros.)

Overlays (--base) always clear the raw-data-file bit: the spec forbids it with a backing file.
Dedup and --compress need --internal: with a data file every cluster must sit at its own guest
offset, so no two clusters can share storage, and the spec forbids compressed clusters.

Examples:
  qcow2-stream convert disk.raw disk.qcow2                      # writes disk.data
  qcow2-stream convert disk.raw disk.qcow2 --internal --dedup   # one file, duplicates stored once
  qcow2-stream convert disk.raw disk.qcow2 --internal --compress # one compressed file (zlib)
  qcow2-stream convert day2.raw day2.qcow2 --data-file day2.data --base day1.qcow2 --manifest day2.xxh
  curl -s URL | qcow2-stream convert - disk.qcow2 --size 20G
  qcow2-stream convert disk.raw - --data-file disk.data > disk.qcow2
  qcow2-stream convert 'nbd+unix:///vda?socket=/run/backup.sock' full.qcow2     # reads only allocated data
  qcow2-stream convert 'nbd+unix:///vda?socket=/run/backup.sock' day2.qcow2 --bitmap b1 --base full.qcow2
  qcow2-stream convert disk.raw s3://backups/vm1/disk.qcow2     # + s3://backups/vm1/disk.data`,
    );
}

/** The convert() options a command line asks for (everything but signal and progress). */
export function convertOptions(input: string, output: string, flags: ConvertFlags): ConvertOptions {
  return {
    sync: flags.sync,
    input,
    ...(flags.format ? { inputFormat: flags.format } : {}),
    output,
    layout: flags.internal ? 'internal' : 'external',
    clusterSize: flags.clusterSize ?? 65536,
    refcountBits: flags.refcountBits ?? 16,
    // --no-data-file-raw clears the bit; otherwise convert() picks (overlays clear it).
    ...(flags.dataFileRaw ? {} : { dataFileRaw: false }),
    overwrite: flags.force ?? false,
    ...(flags.compress || flags.compressionType !== undefined ? { compression: (flags.compressionType ?? 'zlib') as 'zlib' | 'zstd' } : {}),
    ...(flags.threads === undefined ? {} : { compressionThreads: flags.threads }),
    ...(flags.dedup ? { dedup: flags.dedupIndexLimit === undefined ? true : { maxEntries: flags.dedupIndexLimit } } : {}),
    ...(flags.base === undefined ? {} : { base: flags.base }),
    ...(flags.baseName === undefined ? {} : { baseName: flags.baseName }),
    ...(flags.baseManifest === undefined ? {} : { baseManifest: flags.baseManifest }),
    ...(flags.manifest === undefined ? {} : { manifest: flags.manifest }),
    ...(flags.allowUnsafePaths ? { allowUnsafePaths: true } : {}),
    ...(flags.maxChainDepth === undefined ? {} : { maxChainDepth: flags.maxChainDepth }),
    ...(flags.dataFile === undefined ? {} : { dataFile: flags.dataFile }),
    ...(flags.dataFileName === undefined ? {} : { dataFileName: flags.dataFileName }),
    ...(flags.size === undefined ? {} : { size: flags.size }),
    ...(flags.bitmap === undefined ? {} : { bitmap: flags.bitmap }),
    nbd: {
      timeout: (flags.nbdTimeout ?? 30) * 1000,
      ...(flags.tlsCa || flags.tlsCert || flags.tlsKey
        ? { tls: { ...(flags.tlsCa ? { ca: flags.tlsCa } : {}), ...(flags.tlsCert ? { cert: flags.tlsCert } : {}), ...(flags.tlsKey ? { key: flags.tlsKey } : {}) } }
        : {}),
    },
  };
}

/** Two lines: what was made, and what it cost. */
export function describeConvert(output: string, s: ConvertSummary): string {
  const target = output === '-' ? 'standard output' : output;
  const shape =
    s.layout === 'internal'
      ? `single file${s.compression ? `, ${s.compression.clusters} clusters compressed (${s.compression.type})` : ''}`
      : `${s.dataFileRaw ? 'raw data file' : 'sparse metadata'}, data file ${s.dataFile ?? s.dataFileName}`;
  const backing = s.backingFile === undefined ? '' : `, overlay of ${s.backingFile}`;
  const counts = [
    `${s.dataClusters} data`,
    `${s.zeroClusters} zero`,
    ...(s.duplicateClusters ? [`${s.duplicateClusters} duplicate`] : []),
    ...(s.unchangedClusters || s.backingFile !== undefined ? [`${s.unchangedClusters} unchanged`] : []),
  ].join(' / ');
  return (
    `${target}: ${formatBytes(s.virtualSize)} virtual, ${formatBytes(s.clusterSize)} clusters, ${shape}${backing}\n` +
    `${counts} clusters; wrote ${formatBytes(s.dataBytesWritten)} data + ${formatBytes(s.metadataBytesWritten)} metadata in ${s.seconds.toFixed(2)} s`
  );
}
