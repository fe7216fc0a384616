/**
 * The BullMQ adapter: jobs of src/fleet/job.ts on BullMQ's own Queue and Worker, so they can
 * join queues an application already runs.
 *
 * - {@link jobProcessor} is the processor function; {@link createWorker} wraps it in a Worker.
 * - {@link enqueue} adds a payload, idempotently by id: the same id twice is one job, and
 *   enqueueing an id that already completed returns the stored result without running again.
 * - {@link jobStatus} reads a job back: state, progress, result or error with its code.
 *
 * Format errors fail at once (UnrecoverableError: no retries); I/O, network and storage errors
 * retry with exponential backoff. Each attempt starts from nothing (runJob). A worker that dies
 * mid-job loses its lock; BullMQ's stalled-job check hands the job to another worker.
 *
 * bullmq (and ioredis, which it loads) are optional peer dependencies, loaded on first use.
 */

import { createRequire } from 'node:module';
import { isDeepStrictEqual } from 'node:util';
import type * as BullMQ from 'bullmq';
import type { ConnectionOptions, Job, Queue, Worker } from 'bullmq';
import { AbortedError, InvalidArgumentError, JobError, MissingDependencyError } from '../errors.js';
import { describeValue } from '../internal/arguments.js';
import { errorCode, isRetryable, parseJob, runJob, type JobPayload, type JobPolicy, type JobProgress, type JobResult } from './job.js';

/** The queue name when none is given. */
export const DEFAULT_QUEUE = 'qcow2-stream';

let bullmq: typeof BullMQ | undefined;

/** BullMQ, loaded on first use; a MissingDependencyError names the packages to install. */
export function loadBullMQ(): typeof BullMQ {
  if (bullmq) return bullmq;
  const require = createRequire(import.meta.url);
  try {
    // A runtime require, so neither tsc's ESM output nor the CLI bundle pulls BullMQ in.
    bullmq = require('bullmq') as typeof BullMQ;
    require.resolve('ioredis');
  } catch (err) {
    throw new MissingDependencyError('The fleet commands need BullMQ and ioredis, which are not installed', ['bullmq', 'ioredis'], {
      cause: err,
      hint: 'npm install bullmq ioredis (next to qcow2-stream)',
    });
  }
  return bullmq;
}

/**
 * Connection options from `redis://[user:password@]host:port[/db]` (or `rediss://` for TLS).
 * The password stays in the options; messages show the URL without it ({@link redactUrl}).
 */
export function redisConnection(url: string): ConnectionOptions {
  if (typeof url !== 'string') throw new InvalidArgumentError(`A Redis connection is a redis:// URL or BullMQ connection options, not ${describeValue(url)}`);
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    throw new JobError(`'${redactUrl(url)}' is not a redis:// URL`, { hint: "e.g. --connection redis://127.0.0.1:6379 (API: connection: 'redis://127.0.0.1:6379')" });
  }
  if (parsed.protocol !== 'redis:' && parsed.protocol !== 'rediss:') throw new JobError(`'${redactUrl(url)}' is not a redis:// URL`);
  const db = parsed.pathname.length > 1 ? Number(parsed.pathname.slice(1)) : 0;
  if (!Number.isSafeInteger(db) || db < 0) throw new JobError(`'${redactUrl(url)}': the database must be a number`);
  return {
    host: parsed.hostname || '127.0.0.1',
    port: parsed.port ? Number(parsed.port) : 6379,
    db,
    ...(parsed.username ? { username: decodeURIComponent(parsed.username) } : {}),
    ...(parsed.password ? { password: decodeURIComponent(parsed.password) } : {}),
    ...(parsed.protocol === 'rediss:' ? { tls: {} } : {}),
    // Workers block on Redis; BullMQ requires this for them.
    maxRetriesPerRequest: null,
  } as ConnectionOptions;
}

/** The URL with any password replaced by `***`, for messages and logs. */
export function redactUrl(url: string): string {
  return url.replace(/^([a-z]+:\/\/[^:/@]*:)[^@/]*@/i, '$1***@');
}

/** Options of {@link jobProcessor}. */
export interface ProcessorOptions extends JobPolicy {
  /** Least time between two progress updates of one job (ms). Default 1000. */
  progressIntervalMs?: number;
  /** Aborts every running job (graceful shutdown past its deadline): they fail and are retried. */
  signal?: AbortSignal;
}

/** The processor: parses the payload (untrusted), runs it, maps errors to retry or no retry. */
export function jobProcessor(options: ProcessorOptions = {}): (job: Job<JobPayload, JobResult>, token?: string, signal?: AbortSignal) => Promise<JobResult> {
  const { UnrecoverableError } = loadBullMQ();
  const interval = options.progressIntervalMs ?? 1000;
  return async (job, _token, signal) => {
    const controller = new AbortController();
    const onAbort = () => controller.abort(new AbortedError('The worker is shutting down: the job will be retried'));
    signal?.addEventListener('abort', onAbort, { once: true });
    options.signal?.addEventListener('abort', onAbort, { once: true });
    if (signal?.aborted || options.signal?.aborted) onAbort();
    let last = 0;
    let pending: Promise<unknown> = Promise.resolve();
    const onProgress = (progress: JobProgress) => {
      const now = Date.now();
      if (now - last < interval && progress.phase !== 'finishing') return;
      last = now;
      // One update at a time, in order; a failed update does not fail the job.
      pending = pending.then(() => job.updateProgress({ ...progress })).catch(() => {});
    };
    try {
      const parsed = parseJob(job.data, options);
      const result = await runJob(parsed, { signal: controller.signal, onProgress });
      await pending;
      return result;
    } catch (err) {
      await pending;
      // The code goes into the message: BullMQ keeps only the message as failedReason.
      const message = `${err instanceof Error ? err.message : String(err)} [${errorCode(err)}]`;
      if (!isRetryable(err)) throw new UnrecoverableError(message);
      throw new Error(message, { cause: err });
    } finally {
      signal?.removeEventListener('abort', onAbort);
      options.signal?.removeEventListener('abort', onAbort);
    }
  };
}

/** Options of {@link createWorker}. */
export interface CreateWorkerOptions extends ProcessorOptions {
  /** A `redis://` URL or BullMQ connection options. */
  connection: string | ConnectionOptions;
  /** Default {@link DEFAULT_QUEUE}. */
  queue?: string;
  /** Jobs run at once. Default 1. */
  concurrency?: number;
  /** How long a job stays owned by a worker that stopped renewing its lock (ms). Default 30000. */
  lockDuration?: number;
  /** How often workers look for jobs whose owner died (ms). Default 30000. */
  stalledInterval?: number;
  /** Times a job may stall (its worker died) before it fails. Default 2. */
  maxStalledCount?: number;
}

/** A BullMQ Worker running qcow2-stream jobs. */
export function createWorker(options: CreateWorkerOptions): Worker<JobPayload, JobResult> {
  const { Worker } = loadBullMQ();
  const connection = typeof options.connection === 'string' ? redisConnection(options.connection) : options.connection;
  const concurrency = options.concurrency ?? 1;
  if (!Number.isSafeInteger(concurrency) || concurrency < 1) throw new JobError(`Invalid concurrency ${concurrency}: a positive whole number`);
  return new Worker<JobPayload, JobResult>(options.queue ?? DEFAULT_QUEUE, jobProcessor(options), {
    connection,
    concurrency,
    lockDuration: options.lockDuration ?? 30_000,
    stalledInterval: options.stalledInterval ?? 30_000,
    maxStalledCount: options.maxStalledCount ?? 2,
  });
}

/** Options of {@link enqueue}. */
export interface EnqueueOptions {
  /** The job id: the idempotency key. Letters, digits, `.`, `_`, `-`; not only digits. Default: BullMQ's own. */
  id?: string;
  /** Attempts in all (retries + 1). Default 5. */
  attempts?: number;
  /** First retry delay (ms), doubled for each next one. Default 30000. */
  backoffDelay?: number;
  /** Keep a completed job (and so its id's dedup) this many seconds. Default 30 days. */
  keepCompletedSeconds?: number;
}

/** What {@link enqueue} did. */
export interface EnqueueResult {
  /** The job's id, given or generated. */
  id: string;
  /** True when the id was already known: nothing was added. */
  existing: boolean;
  /** The job's state now. */
  state: string;
  /** The stored result, when the existing job had completed. */
  result?: JobResult;
}

/** Checks a job id: BullMQ refuses integers and ':'; we also keep ids printable and short. */
export function checkJobId(id: string): string {
  if (!/^[A-Za-z0-9._-]{1,200}$/.test(id) || /^\d+$/.test(id)) {
    throw new JobError(`Invalid job id '${id}': 1-200 of A-Z a-z 0-9 . _ -, not only digits`);
  }
  return id;
}

/**
 * Adds a job (a convert or export command line), validated as the worker will; the same id
 * twice is one job. An id already used for a different command line is a JobError.
 */
export async function enqueue(queue: Queue, argv: readonly string[], options: EnqueueOptions = {}): Promise<EnqueueResult> {
  const payload: JobPayload = { v: 1, argv: [...argv] };
  // Refuse now what the worker would refuse (a worker may still allow --allow-unsafe-paths).
  parseJob(payload, { allowUnsafePaths: true });
  const id = options.id === undefined ? undefined : checkJobId(options.id);
  if (id !== undefined) {
    const known = await queue.getJob(id);
    if (known) return describeExisting(known, payload);
  }
  const job = await queue.add('qcow2-stream', payload, {
    ...(id === undefined ? {} : { jobId: id }),
    attempts: options.attempts ?? 5,
    backoff: { type: 'exponential', delay: options.backoffDelay ?? 30_000 },
    removeOnComplete: { age: options.keepCompletedSeconds ?? 30 * 86_400 },
    removeOnFail: { age: 30 * 86_400 },
  });
  // add() with an id that raced in meanwhile returns a Job built from our arguments; the stored one wins.
  const stored = await queue.getJob(job.id!);
  if (stored && id !== undefined && !isDeepStrictEqual(stored.data, payload)) return describeExisting(stored, payload);
  return { id: job.id!, existing: false, state: stored ? await stored.getState() : 'waiting' };
}

async function describeExisting(job: Job, payload: JobPayload): Promise<EnqueueResult> {
  if (!isDeepStrictEqual(job.data, payload)) {
    throw new JobError(`The job id '${job.id}' is already used for another command line`, { hint: 'Use a new --id (API: enqueue(queue, args, { id })), or the same command line' });
  }
  const state = await job.getState();
  return { id: job.id!, existing: true, state, ...(state === 'completed' ? { result: job.returnvalue as JobResult } : {}) };
}

/** A job as {@link jobStatus} reports it. */
export interface JobStatus {
  /** The job's id. */
  id: string;
  /** BullMQ's state: `waiting`, `active`, `completed`, `failed`, `delayed`… */
  state: string;
  /** The command line the job runs. */
  argv: string[];
  /** Attempts made so far (retries included). */
  attemptsMade: number;
  /** The last progress the job reported. */
  progress?: JobProgress;
  /** The job's result, once completed. */
  result?: JobResult;
  /** Why the last attempt failed, when it did and the job has not completed since. */
  error?: {
    /** The error's message. */
    message: string;
    /** Its `QCOW_ERR_…` code (`QCOW_ERR_INTERNAL` when the failure carried none). */
    code: string;
  };
  /** When the job was added (ms since the epoch). */
  createdAt?: number;
  /** When it finished, completed or failed (ms since the epoch). */
  finishedAt?: number;
}

/** A job's state, progress and outcome; undefined when the id is unknown. */
export async function jobStatus(queue: Queue, id: string): Promise<JobStatus | undefined> {
  const job = await queue.getJob(id);
  if (!job) return undefined;
  return describeJob(job);
}

/** The most recent jobs of every state, newest first. */
export async function listJobs(queue: Queue, limit = 50): Promise<JobStatus[]> {
  const jobs = await queue.getJobs(['active', 'waiting', 'delayed', 'prioritized', 'waiting-children', 'completed', 'failed'], 0, limit - 1, false);
  const out = await Promise.all(jobs.filter((j): j is Job => Boolean(j)).map(describeJob));
  return out.sort((a, b) => (b.createdAt ?? 0) - (a.createdAt ?? 0)).slice(0, limit);
}

async function describeJob(job: Job): Promise<JobStatus> {
  const state = await job.getState();
  const progress = typeof job.progress === 'object' && job.progress !== null ? (job.progress as unknown as JobProgress) : undefined;
  const reason = job.failedReason;
  const code = reason ? (/\[(QCOW_ERR_[A-Z_]+)\]\s*$/.exec(reason)?.[1] ?? 'QCOW_ERR_INTERNAL') : undefined;
  return {
    id: job.id!,
    state,
    argv: (job.data as JobPayload)?.argv ?? [],
    attemptsMade: job.attemptsMade,
    ...(progress ? { progress } : {}),
    ...(state === 'completed' ? { result: job.returnvalue as JobResult } : {}),
    ...(reason && state !== 'completed' ? { error: { message: reason.replace(/\s*\[QCOW_ERR_[A-Z_]+\]\s*$/, ''), code: code! } } : {}),
    ...(job.timestamp ? { createdAt: job.timestamp } : {}),
    ...(job.finishedOn ? { finishedAt: job.finishedOn } : {}),
  };
}

/** A Queue on a connection (the caller closes it). */
export function openQueue(connection: string | ConnectionOptions, name = DEFAULT_QUEUE): Queue {
  const { Queue } = loadBullMQ();
  const options = typeof connection === 'string' ? redisConnection(connection) : connection;
  // A submitter should fail fast when Redis is down, not retry for ever.
  return new Queue(name, { connection: { ...(options as object), maxRetriesPerRequest: 3 } as ConnectionOptions });
}
