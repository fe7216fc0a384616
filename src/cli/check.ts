/**
 * `qcow2-stream check <image> [--json]`: structural validation like qemu-img check, plus
 * host == guest offsets with an external data file; VMDK, VHDX and dynamic VHD images get a walk
 * of their allocation tables. Exit 0 clean, 1 problems found, 2 error (raw and fixed VHD images
 * have nothing to check: an error, as qemu-img says "This image format does not support checks").
 */

import type { Command } from 'commander';
import { action, ExitCode, printJson, writeStdout } from './common.js';
import { parseFormat } from './export.js';
import type { CheckResult } from '../read/check.js';
import type { ImageFormat } from '../read/image.js';

export function registerCheck(program: Command): void {
  program
    .command('check')
    .description('Check the structure of an image: qcow2 (refcounts, COPIED flags, offsets, data-file rules), VMDK, VHDX, VHD (allocation tables)')
    .argument('<image>', 'the image to check, a path or s3://bucket/key (only it is read: no data file or parent; a VMDK descriptor\'s extent files too)')
    .option('-f, --format <format>', 'qcow2, vmdk, vhdx or vpc (default: probed)', parseFormat)
    .option('--json', 'print JSON (qemu-img check field names, plus the findings)')
    .option('--repair', 'fix the repairable findings in place: COPIED flags whose cluster refcount is right (only those entries are written)')
    .addHelpText(
      'after',
      `
Exit codes: 0 no problems (or all repaired), 1 corruptions or leaks found (listed), 2 the image
cannot be checked (raw and fixed VHD images have no structure to check).

VMDK, VHDX and dynamic VHD: every grain table, grain, block and sector bitmap the tables name
must lie inside its file and share no byte with another one or with the headers and tables.

--repair writes only COPIED flags that disagree with a refcount that is itself right — what
qemu's copy-on-write leaves in a deduplicated image (qemu-img check: "ERROR OFLAG_COPIED data
cluster"). Each entry is rewritten alone and the file synced after each table, so an interrupted
repair can simply be run again. Do not repair an image a VM is using.

Examples:
  qcow2-stream check disk.qcow2
  qcow2-stream check --json disk.qcow2 > report.json   # exit code 1 when findings are listed
  qcow2-stream check --repair dedup.qcow2`,
    )
    .action(
      action(async (imagePath: string, flags: { json?: boolean; repair?: boolean; format?: ImageFormat }) => {
        const { checkImage } = await import('../read/check.js');
        const result = await checkImage(imagePath, { ...(flags.repair ? { repair: true } : {}), ...(flags.format ? { format: flags.format } : {}) });
        if (flags.json) printJson(checkJson(result));
        else writeStdout(formatCheck(result));
        return result.clean ? ExitCode.OK : ExitCode.FINDINGS;
      }),
    );
}

/** The JSON document: qemu-img check's keys, then ours. */
export function checkJson(r: CheckResult): Record<string, unknown> {
  return {
    'image-end-offset': r.imageEndOffset,
    'total-clusters': r.totalClusters,
    'check-errors': r.checkErrors,
    'allocated-clusters': r.allocatedClusters,
    filename: r.filename,
    format: r.format,
    'fragmented-clusters': r.fragmentedClusters,
    'compressed-clusters': r.compressedClusters,
    corruptions: r.corruptions,
    leaks: r.leaks,
    ...(r.repaired ? { 'corruptions-fixed': r.repaired } : {}),
    repairable: r.repairable,
    clean: r.clean,
    findings: r.findings,
    ...(r.omittedFindings ? { 'omitted-findings': r.omittedFindings } : {}),
  };
}

/** The human report, worded like qemu-img check. */
export function formatCheck(r: CheckResult): string {
  const lines: string[] = [];
  for (const f of r.findings) lines.push(f.severity === 'warning' ? `Warning: ${f.message}` : f.message);
  if (r.repaired) lines.push(`The following inconsistencies were found and repaired:`, `    0 leaked clusters`, `    ${r.repaired} corruptions`);
  if (r.omittedFindings) lines.push(`(${r.omittedFindings} more findings not shown)`);
  if (lines.length) lines.push('');
  if (r.corruptions) {
    lines.push(`${r.corruptions} errors were found on the image.`, 'Data may be corrupted, or further writes to the image may corrupt it.');
    if (r.repairable) {
      lines.push(
        `${r.repairable === r.corruptions ? 'All of them are' : `${r.repairable} of them are`} COPIED flags that disagree with a correct refcount (what qemu's copy-on-write leaves in a deduplicated image); the data is intact.`,
        `Run 'qcow2-stream check --repair' (or 'qemu-img check -r all') to fix them.`,
      );
    }
  }
  if (r.leaks) {
    if (r.corruptions) lines.push('');
    lines.push(`${r.leaks} leaked clusters were found on the image.`, 'This means waste of disk space, but no harm to data.');
  }
  if (r.checkErrors) lines.push(`${r.checkErrors} internal errors have occurred during the check.`);
  if (r.clean) lines.push('No errors were found on the image.');
  const pct = (n: number) => (r.totalClusters ? formatPercent((n * 100) / r.totalClusters) : '0.00');
  const fragmented = r.allocatedClusters ? formatPercent((r.fragmentedClusters * 100) / r.allocatedClusters) : '0.00';
  const compressed = r.allocatedClusters ? formatPercent((r.compressedClusters * 100) / r.allocatedClusters) : '0.00';
  lines.push(`${r.allocatedClusters}/${r.totalClusters} = ${pct(r.allocatedClusters)}% allocated, ${fragmented}% fragmented, ${compressed}% compressed clusters`);
  lines.push(`Image end offset: ${r.imageEndOffset}`);
  return `${lines.join('\n')}\n`;
}

/**
 * `value` with two decimals as C's printf("%.2f") prints it, which qemu-img check uses: an exact
 * tie (3.125) rounds to even (3.12), where JS toFixed rounds up (3.13).
 */
export function formatPercent(value: number): string {
  // toFixed(100) is the exact decimal expansion of a double of this magnitude.
  const exact = value.toFixed(100);
  const point = exact.indexOf('.');
  const isTie = exact[point + 3] === '5' && /^0*$/.test(exact.slice(point + 4));
  if (!isTie) return value.toFixed(2);
  const truncated = exact.slice(0, point + 3);
  const lastDigit = Number(exact[point + 2]);
  return lastDigit % 2 === 0 ? truncated : (value + 0.005).toFixed(2);
}
