/**
 * `qcow2-stream compare <a> <b> [-f fmt] [-F fmt]`: guest content equality like qemu-img
 * compare. Exit 0 identical, 1 different (first differing sector printed), 2 error.
 */

import type { Command } from 'commander';
import { action, ExitCode, processSignal } from './common.js';
import { openDisk, type DiskImage, type ImageFormat } from '../read/image.js';
import { compareImages } from '../read/compare.js';
import { parseFormat } from './export.js';

interface CompareFlags {
  format?: ImageFormat;
  secondFormat?: ImageFormat;
  allowUnsafePaths?: boolean;
}

export function registerCompare(program: Command): void {
  program
    .command('compare')
    .description('Compare the guest content of two images (each raw or qcow2)')
    .argument('<a>', 'first image')
    .argument('<b>', 'second image')
    .option('-f, --format <format>', 'format of <a>: qcow2 or raw (default: probed)', parseFormat)
    .option('-F, --second-format <format>', 'format of <b>: qcow2 or raw (default: probed)', parseFormat)
    .option('--allow-unsafe-paths', 'follow names stored in the images even outside their directories')
    .action(
      action(async (pathA: string, pathB: string, flags: CompareFlags) => {
        const common = {
          ...(flags.allowUnsafePaths ? { allowUnsafePaths: true } : {}),
          onWarning: (message: string) => process.stderr.write(`qcow2-stream: warning: ${message}\n`),
        };
        const a = await openDisk(pathA, { ...common, ...(flags.format ? { format: flags.format } : {}) });
        let b: DiskImage | undefined;
        try {
          b = await openDisk(pathB, { ...common, ...(flags.secondFormat ? { format: flags.secondFormat } : {}) });
          const result = await compareImages(a, b, { signal: processSignal() });
          // Like qemu, the size warning comes only once the common part compared equal.
          const commonSize = Math.min(a.virtualSize, b.virtualSize);
          if (result.sizeMismatch && (result.identical || (result.mismatchOffset ?? 0) >= commonSize)) {
            process.stdout.write('Warning: Image size mismatch!\n');
          }
          if (result.identical) {
            process.stdout.write('Images are identical.\n');
            return ExitCode.OK;
          }
          process.stdout.write(`Content mismatch at offset ${result.mismatchOffset ?? 0}!\n`);
          return ExitCode.FINDINGS;
        } finally {
          await b?.close();
          await a.close();
        }
      }),
    );
}
