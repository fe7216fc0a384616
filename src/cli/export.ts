/**
 * `qcow2-stream export <image> <output|->`: qcow2 (or raw) → raw bytes. A regular-file output
 * is sparse (zero ranges become holes) and appears only when complete; `-` writes every byte to
 * standard output.
 */

import { isatty } from 'node:tty';
import { createProgress } from './progress.js';
import { Command, InvalidArgumentError as CommanderInvalidArgument } from 'commander';
import { action, deferWarning, formatBytes, MAX_CHAIN_DEPTH_OPTION, parseChainDepth, printJson, processSignal } from './common.js';
import { InvalidArgumentError } from '../errors.js';
import type { ImageFormat } from '../read/image.js';
import type { ExportResult } from '../read/export.js';
import type { Progress } from '../progress.js';

/** export's parsed options, as commander hands them over. */
export interface ExportFlags {
  format?: ImageFormat;
  dataFile?: string;
  backing?: string;
  backingFormat?: ImageFormat;
  allowUnsafePaths?: boolean;
  maxChainDepth?: number;
  quiet?: boolean;
  /** commander's --no-sync: false when given. */
  sync: boolean;
  force?: boolean;
  json?: boolean;
}

export function registerExport(program: Command): void {
  program.addCommand(
    defineExport(new Command('export')).action(
      action(async (imagePath: string, output: string, flags: ExportFlags) => {
        if (output === '-' && isatty(1)) {
          throw new InvalidArgumentError('Refusing to write a disk image to a terminal', { hint: "Redirect standard output, e.g. '> disk.raw' or '| gzip > disk.raw.gz'" });
        }
        const progress = await createProgress({ label: 'export', quiet: Boolean(flags.quiet || flags.json) });
        let result;
        try {
          result = await runExport(imagePath, output, flags, {
            signal: processSignal(),
            onProgress: progress.update,
            onWarning: deferWarning,
          });
        } finally {
          progress.stop();
        }
        if (flags.json) {
          const summary = { image: imagePath, output, 'virtual-size': result.bytes, 'bytes-written': result.bytesWritten, warnings: result.warnings };
          // Standard output may be carrying the image itself.
          if (output === '-') process.stderr.write(`${JSON.stringify(summary)}\n`);
          else printJson(summary);
        } else if (!flags.quiet && output !== '-') {
          process.stderr.write(`Exported ${formatBytes(result.bytes)} to '${output}' (${formatBytes(result.bytesWritten)} written)\n`);
        }
      }),
    ),
  );
}

/** export's arguments, options and help on `command`, without an action (fleet jobs parse with it too). */
export function defineExport(command: Command): Command {
  return command
    .description('Write the guest bytes of an image as a raw image (sparse file, or a stream with -)')
    .argument('<image>', 'the image to read (qcow2, raw, vmdk, vpc, vhdx), a path or s3://bucket/key')
    .argument('<output>', "the raw file to write, s3://bucket/key, or '-' for standard output")
    .option('-f, --format <format>', 'format of <image>: qcow2, raw, vmdk, vpc or vhdx (default: probed)', parseFormat)
    .option('--data-file <path>', "use this external data file instead of the name stored in the image")
    .option('--backing <path>', 'use this backing image instead of the name stored in the image')
    .option('--backing-format <format>', 'format of --backing: qcow2 or raw (default: probed)', parseFormat)
    .option('--allow-unsafe-paths', 'follow data-file and backing names stored in the image even outside its directory')
    .option(...MAX_CHAIN_DEPTH_OPTION, parseChainDepth)
    .option('--force', 'replace existing files or s3:// objects at the output paths (never a file this run reads)')
    .option('--no-sync', 'skip the fsync of the outputs before exiting (faster; a crash soon after may lose them)')
    .option('-q, --quiet', 'no progress or summary')
    .option('--json', 'print a JSON summary (to standard error when the image goes to standard output)')
    .addHelpText(
      'after',
      `
A regular-file output is sparse (zero ranges become holes) and appears only once complete.
Names stored in the image (data file, backing file) are resolved inside its directory (for an
s3:// image: keys beside it, under the same prefix).

Examples:
  qcow2-stream export disk.qcow2 disk.raw
  qcow2-stream export disk.qcow2 - | gzip > disk.raw.gz
  qcow2-stream export moved.qcow2 moved.raw --data-file /mnt/backup/disk.data
  qcow2-stream export disk.qcow2 s3://backups/disk.raw    # multipart upload; zeros are sent as bytes
  qcow2-stream export s3://backups/vm1/disk.qcow2 disk.raw # reads s3://backups/vm1/disk.data too`,
    );
}

/** Opens the image as the flags say and exports it to `output`. */
export async function runExport(
  imagePath: string,
  output: string,
  flags: ExportFlags,
  hooks: { signal?: AbortSignal; onProgress?: (progress: Progress) => void; onWarning?: (message: string) => void },
): Promise<ExportResult> {
  const [{ openDisk }, { exportToFile }] = await Promise.all([import('../read/image.js'), import('../read/export.js')]);
  const image = await openDisk(imagePath, {
    ...(flags.format ? { format: flags.format } : {}),
    ...(flags.dataFile ? { dataFile: flags.dataFile } : {}),
    ...(flags.backing ? { backing: flags.backing } : {}),
    ...(flags.backingFormat ? { backingFormat: flags.backingFormat } : {}),
    ...(flags.allowUnsafePaths ? { allowUnsafePaths: true } : {}),
    ...(flags.maxChainDepth === undefined ? {} : { maxChainDepth: flags.maxChainDepth }),
    ...(hooks.onWarning ? { onWarning: hooks.onWarning } : {}),
  });
  try {
    return await exportToFile(image, output, {
      ...(hooks.signal ? { signal: hooks.signal } : {}),
      ...(hooks.onProgress ? { onProgress: hooks.onProgress } : {}),
      sync: flags.sync,
      overwrite: flags.force ?? false,
    });
  } finally {
    await image.close();
  }
}

/**
 * Parses -f/--backing-format values. Throws commander's InvalidArgumentError, which commander
 * reports as a usage error next to the option (any other error would escape as a stack trace).
 */
export function parseFormat(value: string): ImageFormat {
  if (value === 'qcow2' || value === 'raw' || value === 'vpc' || value === 'vmdk' || value === 'vhdx') return value;
  if (value === 'vhd') return 'vpc';
  throw new CommanderInvalidArgument(`Unknown image format '${value}' (qcow2, raw, vmdk, vpc, vhdx)`);
}
