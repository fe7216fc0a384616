/**
 * The reader's fuzz contract (house style rule 22), as one function run per case:
 *
 * 1. Only this library's typed errors escape (`isQcow2StreamError`): never a TypeError,
 *    RangeError or AssertionError.
 * 2. No hang: every stage of a case ends within {@link STAGE_TIMEOUT_MS}.
 * 3. No allocation beyond the documented limits: array-buffer memory sampled during the case
 *    stays under {@link CASE_MEMORY_LIMIT} above where it started (the cases are small files,
 *    so anything near that means a size from the image drove an allocation unchecked).
 * 4. Nothing leaks: the process has the same open descriptors after the case as before.
 * 5. Nothing is poisoned: after a refused case a valid image still opens and reads correctly,
 *    and the shared zero buffer is still all zeros.
 *
 * Plus one consistency rule for images that open: extents tile [0, virtual size) in order,
 * and a stream export yields exactly the virtual size.
 */

import { writeFileSync } from 'node:fs';
import { openDescriptors } from '../helpers/descriptors.js';
import { join } from 'node:path';
import { isQcow2StreamError } from '../../src/errors.js';
import { openDisk, type DiskImage } from '../../src/read/image.js';
import { exportStream } from '../../src/read/export.js';
import { checkImage } from '../../src/read/check.js';
import { readImageInfo } from '../../src/read/info.js';
import { isAllZero, zeroBuffer } from '../../src/io/buffers.js';

export const STAGE_TIMEOUT_MS = 5000;
/**
 * The fuzz files are at most a few hundred KiB, so every structure in them is small; the
 * largest fixed allocations are a 2 MiB cluster, 2 MiB export chunks and the 8 MiB L2 cache.
 * 96 MiB over the start of a case can only come from a size read from the image.
 */
export const CASE_MEMORY_LIMIT = 96 * 1024 * 1024;
/** Guest bytes a case reads through `read()` at most (big virtual sizes are legitimate). */
const READ_BUDGET = 32 * 1024 * 1024;
/** Images up to this virtual size are also exported through `exportStream`. */
const STREAM_EXPORT_LIMIT = 16 * 1024 * 1024;
const MAX_EXTENTS = 50_000;

/** A broken promise of the contract; carries the stage and the original error. */
export class ContractViolation extends Error {
  constructor(
    readonly stage: string,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(`[${stage}] ${message}`, options);
    this.name = 'ContractViolation';
  }
}

/** How a case ended, for the campaign's statistics. */
export interface CaseOutcome {
  /** The error code of each stage, or 'ok'. */
  open: string;
  read: string | undefined;
  check: string;
  info: string;
  peakBytes: number;
}


function withTimeout<T>(stage: string, work: Promise<T>): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new ContractViolation(stage, `did not finish within ${STAGE_TIMEOUT_MS} ms`)), STAGE_TIMEOUT_MS);
  });
  return Promise.race([work, timeout]).finally(() => clearTimeout(timer));
}

/** Runs one stage; our errors are outcomes, anything else breaks the contract. */
async function stage<T>(name: string, work: () => Promise<T>): Promise<{ value?: T; code: string }> {
  try {
    return { value: await withTimeout(name, work()), code: 'ok' };
  } catch (err) {
    if (err instanceof ContractViolation) throw err;
    if (isQcow2StreamError(err)) return { code: err.code };
    const what = err instanceof Error ? `${err.name}: ${err.message}` : String(err);
    throw new ContractViolation(name, `a foreign error escaped: ${what}`, { cause: err });
  }
}

/** Reads the whole image the ways a user would: a stream export, then every data extent. */
async function readEverything(image: DiskImage): Promise<void> {
  if (image.virtualSize <= STREAM_EXPORT_LIMIT) {
    let streamed = 0;
    for await (const chunk of exportStream(image)) streamed += (chunk as Uint8Array).length;
    if (streamed !== image.virtualSize) throw new ContractViolation('read', `exportStream yielded ${streamed} bytes of ${image.virtualSize}`);
  }
  let expected = 0;
  let extents = 0;
  let budget = READ_BUDGET;
  for await (const extent of image.extents()) {
    if (extent.start !== expected || extent.length <= 0) {
      throw new ContractViolation('read', `extents do not tile the image: got [${extent.start}, +${extent.length}) where ${expected} was next`);
    }
    expected = extent.start + extent.length;
    if (++extents > MAX_EXTENTS) return;
    if (extent.kind === 'data' && budget > 0) {
      const length = Math.min(extent.length, budget);
      await image.read(extent.start, length);
      budget -= length;
    }
  }
  if (expected !== image.virtualSize) throw new ContractViolation('read', `extents end at ${expected}, the image is ${image.virtualSize} bytes`);
}

/** Samples array-buffer memory while a case runs; returns the peak above the start. */
function memorySampler(): () => number {
  const start = process.memoryUsage().arrayBuffers;
  let peak = start;
  const sample = () => {
    peak = Math.max(peak, process.memoryUsage().arrayBuffers);
  };
  const timer = setInterval(sample, 3);
  return () => {
    clearInterval(timer);
    sample();
    return peak - start;
  };
}

/**
 * Writes `bytes` as `name` in `dir` (next to the seeds' data and backing files) and runs open →
 * export/read → check → info on it under the contract. Throws ContractViolation when broken.
 */
export async function runCase(dir: string, name: string, bytes: Uint8Array): Promise<CaseOutcome> {
  const path = join(dir, name);
  writeFileSync(path, bytes);
  const descriptorsBefore = openDescriptors();
  const stopSampler = memorySampler();
  let outcome: CaseOutcome;
  try {
    const opened = await stage('open', () => openDisk(path));
    let read: string | undefined;
    if (opened.value) {
      const image = opened.value;
      try {
        read = (await stage('read', () => readEverything(image))).code;
      } finally {
        await image.close();
      }
    }
    const check = await stage('check', () => checkImage(path));
    const info = await stage('info', () => readImageInfo(path));
    outcome = { open: opened.code, read, check: check.code, info: info.code, peakBytes: 0 };
  } finally {
    const peak = stopSampler();
    if (peak > CASE_MEMORY_LIMIT) throw new ContractViolation('memory', `array buffers grew by ${peak} bytes during the case (limit ${CASE_MEMORY_LIMIT})`);
  }
  const descriptorsAfter = openDescriptors();
  const leaked = descriptorsAfter.filter((d) => !descriptorsBefore.includes(d));
  if (descriptorsAfter.length > descriptorsBefore.length) {
    throw new ContractViolation('descriptors', `${descriptorsAfter.length - descriptorsBefore.length} descriptor(s) left open: ${leaked.join(', ')}`);
  }
  return outcome;
}

/**
 * Opens a known-good image after refused cases and checks it reads exactly `expected`, and that
 * the shared zero buffer was not written into.
 */
export async function assertNotPoisoned(path: string, expected: Uint8Array): Promise<void> {
  const image = await openDisk(path);
  try {
    const bytes = await image.read(0, expected.length);
    if (!Buffer.from(bytes).equals(expected)) throw new ContractViolation('poison', `a valid image read differently after a refused case`);
  } finally {
    await image.close();
  }
  if (!isAllZero(zeroBuffer(1024 * 1024)) || !isAllZero(zeroBuffer(64 * 1024))) {
    throw new ContractViolation('poison', 'the shared zero buffer is no longer all zeros');
  }
}
