/**
 * Runs conversions and exports all at once in a fresh process and reports its peak memory, so
 * a test can bound what the library needs under load without the test runner's own memory in
 * the figure. Usage: node --import tsx load-child.ts SPEC.json; prints one JSON line (LoadReport).
 */

import { createReadStream, readFileSync } from 'node:fs';
import { convert, type ConvertOptions } from '../../src/write/convert.js';
import { openImage } from '../../src/read/image.js';
import { exportToFile } from '../../src/read/export.js';

export interface LoadSpec {
  conversions: Array<{
    input: string;
    /** Read the input as a stream (size unknown unless `options.size` says it). */
    stream?: boolean;
    options: Omit<ConvertOptions, 'input' | 'signal' | 'onProgress'>;
  }>;
  exports: Array<{ image: string; output: string }>;
}

export interface LoadReport {
  /** Peak resident set (KiB) once the modules are loaded, before any work. */
  baselineMaxRssKiB: number;
  /** Peak resident set (KiB) of the whole run. */
  maxRssKiB: number;
}

/**
 * The peak resident set of this program (VmHWM). Not process.resourceUsage().maxRSS: Linux
 * carries that over from the parent through fork and exec, so a child of a big test runner
 * would report the runner's peak.
 */
function peakRssKiB(): number {
  const match = /^VmHWM:\s+(\d+) kB$/m.exec(readFileSync('/proc/self/status', 'utf8'));
  if (!match) throw new Error('no VmHWM in /proc/self/status');
  return Number(match[1]);
}

const spec = JSON.parse(readFileSync(process.argv[2]!, 'utf8')) as LoadSpec;
const baselineMaxRssKiB = peakRssKiB();

await Promise.all([
  ...spec.conversions.map(({ input, stream, options }) => convert({ ...options, input: stream ? createReadStream(input) : input })),
  ...spec.exports.map(async ({ image, output }) => {
    const opened = await openImage(image);
    try {
      await exportToFile(opened, output);
    } finally {
      await opened.close();
    }
  }),
]);

const report: LoadReport = { baselineMaxRssKiB, maxRssKiB: peakRssKiB() };
process.stdout.write(`${JSON.stringify(report)}\n`);
