/**
 * `qcow2-stream compare <a> <b> [-f fmt] [-F fmt]`: guest content equality like qemu-img
 * compare. Exit 0 identical, 1 different (first differing sector printed), 2 error.
 */

import type { Command } from 'commander';
import { action, deferWarning, ExitCode, MAX_CHAIN_DEPTH_OPTION, parseChainDepth, printJson, processSignal, writeStdout } from './common.js';
import { createProgress } from './progress.js';
import type { DiskImage, ImageFormat } from '../read/image.js';
import { parseFormat } from './export.js';

interface CompareFlags {
  format?: ImageFormat;
  secondFormat?: ImageFormat;
  allowUnsafePaths?: boolean;
  maxChainDepth?: number;
  quiet?: boolean;
  json?: boolean;
}

export function registerCompare(program: Command): void {
  program
    .command('compare')
    .description('Compare the guest content of two images (each raw or qcow2)')
    .argument('<a>', 'first image, a path or s3://bucket/key')
    .argument('<b>', 'second image, a path or s3://bucket/key')
    .option('-f, --format <format>', 'format of <a>: qcow2, raw, vmdk, vpc or vhdx (default: probed)', parseFormat)
    .option('-F, --second-format <format>', 'format of <b>: qcow2, raw, vmdk, vpc or vhdx (default: probed)', parseFormat)
    .option('--allow-unsafe-paths', 'follow names stored in the images even outside their directories')
    .option(...MAX_CHAIN_DEPTH_OPTION, parseChainDepth)
    .option('-q, --quiet', 'print nothing; the exit code tells (0 identical, 1 different)')
    .option('--json', 'print {"identical", "size-mismatch", "mismatch-offset"} as JSON')
    .addHelpText(
      'after',
      `
Exit codes: 0 identical, 1 different (the first differing offset is printed), 2 error.
When the sizes differ, the longer image's excess must read as zeros, as with qemu-img compare.

Examples:
  qcow2-stream compare disk.raw disk.qcow2
  qcow2-stream compare -f raw -F qcow2 upload.img converted.qcow2 --json`,
    )
    .action(
      action(async (pathA: string, pathB: string, flags: CompareFlags) => {
        const common = {
          ...(flags.allowUnsafePaths ? { allowUnsafePaths: true } : {}),
          ...(flags.maxChainDepth === undefined ? {} : { maxChainDepth: flags.maxChainDepth }),
          onWarning: deferWarning,
        };
        const [{ openDisk }, { compareImages }] = await Promise.all([import('../read/image.js'), import('../read/compare.js')]);
        const a = await openDisk(pathA, { ...common, ...(flags.format ? { format: flags.format } : {}) });
        let b: DiskImage | undefined;
        try {
          b = await openDisk(pathB, { ...common, ...(flags.secondFormat ? { format: flags.secondFormat } : {}) });
          const progress = await createProgress({ label: 'compare', quiet: Boolean(flags.quiet || flags.json) });
          let result;
          try {
            result = await compareImages(a, b, { signal: processSignal(), onProgress: progress.update });
          } finally {
            progress.stop();
          }
          const code = result.identical ? ExitCode.OK : ExitCode.FINDINGS;
          if (flags.json) {
            printJson({ identical: result.identical, 'size-mismatch': result.sizeMismatch, 'mismatch-offset': result.mismatchOffset ?? null });
            return code;
          }
          if (flags.quiet) return code;
          // Like qemu, the size warning comes only once the common part compared equal.
          const commonSize = Math.min(a.virtualSize, b.virtualSize);
          if (result.sizeMismatch && (result.identical || (result.mismatchOffset ?? 0) >= commonSize)) {
            writeStdout('Warning: Image size mismatch!\n');
          }
          writeStdout(result.identical ? 'Images are identical.\n' : `Content mismatch at offset ${result.mismatchOffset ?? 0}!\n`);
          return code;
        } finally {
          await b?.close();
          await a.close();
        }
      }),
    );
}
