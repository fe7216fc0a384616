/**
 * `qcow2-stream/fleet`: conversions as jobs on BullMQ, for ingestion that outgrows one machine.
 *
 * ```ts
 * import { Queue } from 'bullmq';
 * import { createWorker, enqueue } from 'qcow2-stream/fleet';
 *
 * const worker = createWorker({ connection: 'redis://127.0.0.1:6379', concurrency: 2 });
 * const queue = new Queue('qcow2-stream', { connection: { host: '127.0.0.1', port: 6379 } });
 * const { id } = await enqueue(queue, ['convert', 'vm1.raw', 's3://backups/vm1.qcow2'], { id: 'vm1-2026-12-02' });
 * ```
 *
 * bullmq and ioredis are optional peer dependencies: install them next to qcow2-stream.
 * The engine-free part (payload parsing, running, retry classification) is in job.ts, so
 * adapters for other engines can reuse it.
 *
 * @packageDocumentation
 */

export { parseJob, runJob, isRetryable, errorCode } from './job.js';
export type { JobPayload, ParsedJob, JobProgress, JobResult, JobPolicy, RunHooks } from './job.js';
export {
  DEFAULT_QUEUE,
  createWorker,
  enqueue,
  jobProcessor,
  jobStatus,
  listJobs,
  openQueue,
  redisConnection,
  redactUrl,
  checkJobId,
} from './bullmq.js';
export type { CreateWorkerOptions, ProcessorOptions, EnqueueOptions, EnqueueResult, JobStatus } from './bullmq.js';
