/**
 * A fleet job, engine-free: its payload is exactly a `convert` or `export` command line, parsed
 * by that command's own definition (src/cli/convert.ts, src/cli/export.ts) so every option,
 * every check and every new input kind of the CLI applies to jobs as it is. Adapters (BullMQ in
 * ./bullmq.ts; a Temporal activity could be another) only move payloads, progress and results.
 *
 * Payloads are untrusted input: besides the command's own validation, a worker refuses standard
 * input and output (`-`) and `--allow-unsafe-paths` unless it was started with that itself.
 */

import { Command, CommanderError } from 'commander';
import { readdir, unlink } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { isQcow2StreamError, JobError, ObjectStorageError, type ErrorCode } from '../errors.js';
import { defineConvert, convertOptions, type ConvertFlags } from '../cli/convert.js';
import { defineExport, runExport, type ExportFlags } from '../cli/export.js';
import { defaultDataFilePath } from '../write/paths.js';
import { isS3Uri, parseS3Uri } from '../io/s3-uri.js';
import { isNbdUri, parseNbdUri } from '../io/nbd.js';
import type { ConvertOptions } from '../write/convert.js';
import type { Progress } from '../progress.js';

/** What a queue stores for one job: the command line, versioned. */
export interface JobPayload {
  /** The payload format's version: 1. */
  v: 1;
  /** `['convert', INPUT, OUTPUT, …options]` or `['export', IMAGE, OUTPUT, …options]`. */
  argv: string[];
}

/** A parsed payload, ready to run. */
export type ParsedJob =
  | {
      /** A conversion. */
      command: 'convert';
      /** What the command line asks of convert(). */
      options: ConvertOptions;
      /** Every file the job writes (image, data file, manifest): an earlier attempt's leftovers there are removed first. */
      outputs: string[];
    }
  | {
      /** An export. */
      command: 'export';
      /** The image to export. */
      image: string;
      /** Where the raw bytes go. */
      output: string;
      /** The export command line's options. */
      flags: ExportFlags;
      /** Every file the job writes: an earlier attempt's leftovers there are removed first. */
      outputs: string[];
    };

/** Progress as a job reports it: guest bytes done of the total, and the phase. */
export interface JobProgress {
  /** The command running, or `finishing` once every guest byte is done (flushing, committing). */
  phase: 'convert' | 'export' | 'finishing';
  /** Guest bytes done. */
  bytesDone: number;
  /** Guest bytes in all, when known (not for a pipe of unknown size). */
  bytesTotal?: number;
}

/** What a finished job returns (stored by the engine as the job's result). */
export interface JobResult {
  /** The command the job ran. */
  command: 'convert' | 'export';
  /** Its summary: convert()'s summary, or the export's image, output, sizes and warnings. */
  summary: Record<string, unknown>;
}

/** What the worker allows payloads, beyond what any payload may ask. */
export interface JobPolicy {
  /** Let payloads pass --allow-unsafe-paths (the worker's own opt-in). Default false. */
  allowUnsafePaths?: boolean;
}

/** The most bytes of command line a payload may carry. */
const MAX_ARGV_BYTES = 64 * 1024;

/** Checks a payload's shape and parses it with the command's own definition; throws JobError or InvalidArgumentError. */
export function parseJob(payload: unknown, policy: JobPolicy = {}): ParsedJob {
  const argv = (payload as JobPayload | undefined)?.argv;
  if (typeof payload !== 'object' || payload === null || (payload as JobPayload).v !== 1 || !Array.isArray(argv) || !argv.every((a) => typeof a === 'string')) {
    throw new JobError('A job payload is { v: 1, argv: [command, ...arguments] } with string arguments');
  }
  if (argv.reduce((n, a) => n + Buffer.byteLength(a) + 1, 0) > MAX_ARGV_BYTES) throw new JobError(`A job's command line is limited to ${MAX_ARGV_BYTES} bytes`);
  const [command, ...args] = argv;
  if (command !== 'convert' && command !== 'export') {
    throw new JobError(`A job runs 'convert' or 'export', not '${String(command)}'`, { hint: 'enqueue ... -- convert INPUT OUTPUT [options]' });
  }
  let parsed: { positional: string[]; flags: Record<string, unknown> } | undefined;
  const define = command === 'convert' ? defineConvert : defineExport;
  const cmd = define(new Command(command))
    .exitOverride()
    .configureOutput({ writeOut: () => {}, writeErr: () => {}, outputError: () => {} })
    .action((first: string, second: string, flags: Record<string, unknown>) => {
      parsed = { positional: [first, second], flags };
    });
  try {
    cmd.parse(args, { from: 'user' });
  } catch (err) {
    if (err instanceof CommanderError) {
      throw new JobError(`Invalid ${command} job: ${err.message.replace(/^error: /, '')}`, { cause: err });
    }
    throw err;
  }
  if (!parsed) throw new JobError(`Invalid ${command} job: nothing to run (--help?)`);
  const [input, output] = parsed.positional as [string, string];
  if (input === '-' || output === '-') throw new JobError('A job cannot read standard input or write standard output: name files or objects');
  checkUris([input, output, ...URI_FLAGS.map((flag) => parsed!.flags[flag]).filter((v): v is string => typeof v === 'string')]);
  if (parsed.flags['allowUnsafePaths'] && !policy.allowUnsafePaths) {
    throw new JobError('This worker does not accept --allow-unsafe-paths in jobs', { hint: 'Start the worker with --allow-unsafe-paths (API: allowUnsafePaths: true) to let jobs opt in' });
  }
  if (command === 'convert') {
    const flags = parsed.flags as unknown as ConvertFlags;
    const options = convertOptions(input, output, flags);
    const dataFile = typeof options.dataFile === 'string' ? options.dataFile : options.layout === 'internal' ? undefined : defaultDataFilePath(output);
    const outputs = [output, ...(dataFile ? [dataFile] : []), ...(options.manifest ? [options.manifest] : [])];
    return { command, options, outputs };
  }
  return { command, image: input, output, flags: parsed.flags as unknown as ExportFlags, outputs: [output] };
}

/** Options whose values may be objects or NBD URIs, besides the two positional arguments. */
const URI_FLAGS = ['dataFile', 'base', 'backing', 'manifest', 'baseManifest'] as const;

/**
 * Parses the `s3://` and NBD URIs of a payload with the parsers the run will use, so a malformed
 * one is refused when it is enqueued (and by the worker, without a retry) rather than stored.
 * A URI carrying credentials is refused without echoing them: credentials come from the
 * worker's own configuration, never from a payload that Redis stores and `jobs` prints.
 */
function checkUris(values: readonly string[]): void {
  for (const value of values) {
    const credentialed = /^(s3|nbds?(\+unix)?):\/\/[^/?#]*@/i.exec(value);
    if (credentialed) {
      throw new JobError(`A job's ${credentialed[1]!.toLowerCase()}:// URI carries a user name or password (${redactUserinfo(value)}); credentials never go into payloads`, {
        hint: 'Configure credentials on the worker (the AWS SDK chain, TLS files); the payload names only the location',
      });
    }
    if (isS3Uri(value)) parseS3Uri(value);
    else if (isNbdUri(value)) parseNbdUri(value);
  }
}

function redactUserinfo(uri: string): string {
  return uri.replace(/^([a-z0-9+]+:\/\/)[^/?#]*@/i, '$1***@');
}

/** Hooks an adapter gives a run. */
export interface RunHooks {
  /** Aborts the attempt (its partial outputs are removed). */
  signal?: AbortSignal;
  /** Called as guest bytes are done. */
  onProgress?: (progress: JobProgress) => void;
}

/**
 * Runs one attempt of a job from nothing: leftovers of an earlier attempt that died without
 * cleaning up (temporary `.NAME.XXXXXXXX.partial` files next to the outputs) are removed first.
 */
export async function runJob(job: ParsedJob, hooks: RunHooks = {}): Promise<JobResult> {
  await removeLeftovers(job.outputs);
  const report = (phase: 'convert' | 'export') => (p: Progress) =>
    hooks.onProgress?.({ phase: p.bytesTotal !== undefined && p.bytesDone >= p.bytesTotal ? 'finishing' : phase, bytesDone: p.bytesDone, ...(p.bytesTotal === undefined ? {} : { bytesTotal: p.bytesTotal }) });
  if (job.command === 'convert') {
    const { convert } = await import('../write/convert.js');
    const summary = await convert({
      ...job.options,
      ...(hooks.signal ? { signal: hooks.signal } : {}),
      onProgress: report('convert'),
      progressInterval: 8 * 1024 * 1024,
    });
    return { command: 'convert', summary: { ...summary } };
  }
  const result = await runExport(job.image, job.output, job.flags, {
    ...(hooks.signal ? { signal: hooks.signal } : {}),
    onProgress: report('export'),
  });
  return { command: 'export', summary: { image: job.image, output: job.output, virtualSize: result.bytes, bytesWritten: result.bytesWritten, warnings: result.warnings } };
}

/** Removes `.NAME.<8 hex>.partial` next to each local output: what OffsetWriter leaves when its process is killed. */
async function removeLeftovers(outputs: readonly string[]): Promise<void> {
  for (const output of outputs) {
    if (isS3Uri(output)) continue; // An unfinished upload is invisible; a bucket lifecycle rule expires it.
    const dir = dirname(output);
    const pattern = new RegExp(`^\\.${escapeRegExp(basename(output))}\\.[0-9a-f]{8}\\.partial$`);
    let names: string[];
    try {
      names = await readdir(dir);
    } catch {
      continue;
    }
    for (const name of names) if (pattern.test(name)) await unlink(join(dir, name)).catch(() => {});
  }
}

function escapeRegExp(text: string): string {
  return text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

/**
 * Codes that no retry can fix: the image itself is corrupt or hostile, or the job asks for
 * something impossible. Everything else (files, network, storage, a shutdown) is retried.
 */
const PERMANENT: ReadonlySet<ErrorCode> = new Set<ErrorCode>([
  'QCOW_ERR_INVALID_ARGUMENT',
  'QCOW_ERR_BAD_MAGIC',
  'QCOW_ERR_UNSUPPORTED_VERSION',
  'QCOW_ERR_UNSUPPORTED_FEATURE',
  'QCOW_ERR_CORRUPT_IMAGE',
  'QCOW_ERR_LIMIT_EXCEEDED',
  'QCOW_ERR_UNEXPECTED_EOF',
  'QCOW_ERR_PATH_POLICY',
  'QCOW_ERR_NOT_SEEKABLE',
  'QCOW_ERR_DEDUP_UNSUPPORTED',
  'QCOW_ERR_MISSING_DEPENDENCY',
  'QCOW_ERR_JOB',
]);

/** Whether another attempt could succeed where this one failed. */
export function isRetryable(err: unknown): boolean {
  if (!isQcow2StreamError(err)) return true;
  if (err instanceof ObjectStorageError) return err.reason === 'failed';
  return !PERMANENT.has(err.code);
}

/** The code of an error, `QCOW_ERR_…` for ours (an internal error otherwise). */
export function errorCode(err: unknown): string {
  return isQcow2StreamError(err) ? err.code : 'QCOW_ERR_INTERNAL';
}
