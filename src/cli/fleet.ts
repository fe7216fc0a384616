/**
 * The fleet commands over BullMQ (src/fleet/): `worker` runs jobs, `enqueue` adds one (a convert
 * or export command line), `jobs` shows them. BullMQ loads only when one of these runs.
 */

import type { Command } from 'commander';
import { JobError } from '../errors.js';
import { action, ExitCode, formatBytes, parseInteger, printJson, writeStdout } from './common.js';
import type { JobStatus } from '../fleet/bullmq.js';

/** After the shutdown timeout, how long a worker waits for Redis to take back its jobs (ms). */
const CLOSE_GRACE_MS = 5000;

interface ConnectionFlags {
  connection: string;
  queue?: string;
}

const CONNECTION_HELP = 'Redis, as redis://[user:password@]HOST:PORT[/DB] (rediss:// for TLS)';

export function registerFleet(program: Command): void {
  program
    .command('worker')
    .description('Run conversion jobs from a queue until SIGTERM or Ctrl-C')
    .requiredOption('--connection <url>', CONNECTION_HELP)
    .option('--queue <name>', 'the queue (default: qcow2-stream)')
    .option('--concurrency <n>', 'jobs run at once', parseInteger, 1)
    .option('--shutdown-timeout <seconds>', 'on SIGTERM, wait this long for running jobs before cancelling them (they are retried elsewhere)', parseInteger, 30)
    .option('--lock-duration <ms>', 'how long a job stays owned by a worker that stopped answering', parseInteger, 30000)
    .option('--stalled-interval <ms>', 'how often to look for jobs whose worker died', parseInteger, 30000)
    .option('--allow-unsafe-paths', 'let jobs pass --allow-unsafe-paths (refused by default: payloads are untrusted)')
    .addHelpText(
      'after',
      `
Each job is a convert or export command line (see enqueue), parsed and checked exactly as the
CLI does. Corrupt or hostile images fail at once; I/O, network and storage errors are retried
with exponential backoff, each attempt from nothing. A worker killed mid-job loses its lock and
another worker takes the job over after --lock-duration.

Example:
  qcow2-stream worker --connection redis://127.0.0.1:6379 --concurrency 2`,
    )
    .action(
      action(async (flags: ConnectionFlags & { concurrency: number; shutdownTimeout: number; lockDuration: number; stalledInterval: number; allowUnsafePaths?: boolean }) => {
        const { createWorker, redactUrl } = await import('../fleet/bullmq.js');
        const shutdown = new AbortController();
        const worker = createWorker({
          connection: flags.connection,
          ...(flags.queue ? { queue: flags.queue } : {}),
          concurrency: flags.concurrency,
          lockDuration: flags.lockDuration,
          stalledInterval: flags.stalledInterval,
          signal: shutdown.signal,
          ...(flags.allowUnsafePaths ? { allowUnsafePaths: true } : {}),
        });
        const log = (line: string) => process.stderr.write(`qcow2-stream worker: ${line}\n`);
        worker.on('active', (job) => log(`job ${job.id}: started (attempt ${job.attemptsMade + 1})`));
        worker.on('completed', (job) => log(`job ${job.id}: completed`));
        worker.on('failed', (job, err) => log(`job ${job?.id}: failed: ${err.message}${job && job.attemptsMade < (job.opts.attempts ?? 1) && err.name !== 'UnrecoverableError' ? ' (will retry)' : ''}`));
        worker.on('error', (err) => log(`error: ${err.message}`));
        await worker.waitUntilReady();
        log(`running on ${redactUrl(flags.connection)}, queue ${worker.name}, concurrency ${flags.concurrency}`);
        await new Promise<void>((resolve) => {
          let stopping = false;
          const stop = (signal: string) => {
            if (stopping) {
              // A second signal: cancel the running jobs now.
              shutdown.abort();
              return;
            }
            stopping = true;
            log(`${signal}: finishing running jobs (at most ${flags.shutdownTimeout} s)`);
            const timer = setTimeout(() => {
              log('shutdown timeout: cancelling running jobs (they will be retried)');
              shutdown.abort();
              // close() waits for Redis: one that no longer answers must not keep the worker
              // alive. Jobs it could not hand back are retried once their locks expire.
              setTimeout(() => {
                log('Redis does not answer: stopping without handing back the jobs (they are retried once their locks expire)');
                process.exit(ExitCode.ERROR);
              }, CLOSE_GRACE_MS).unref();
            }, flags.shutdownTimeout * 1000);
            worker.close().finally(() => {
              clearTimeout(timer);
              resolve();
            });
          };
          process.on('SIGTERM', () => stop('SIGTERM'));
          process.on('SIGINT', () => stop('SIGINT'));
        });
        log('stopped');
      }),
    );

  program
    .command('enqueue')
    .description('Add a conversion job: a convert or export command line, after --')
    .requiredOption('--connection <url>', CONNECTION_HELP)
    .option('--queue <name>', 'the queue (default: qcow2-stream)')
    .option('--id <id>', 'job id and idempotency key (A-Z a-z 0-9 . _ -): the same id twice is one job')
    .option('--attempts <n>', 'attempts in all for I/O, network and storage failures', parseInteger, 5)
    .option('--backoff <ms>', 'delay before the first retry, doubled for each next one', parseInteger, 30000)
    .option('--json', 'print the outcome as JSON')
    .argument('<command...>', "after '--': convert INPUT OUTPUT [options], or export IMAGE OUTPUT [options]")
    .addHelpText(
      'after',
      `
Prints the job id. The command line is checked now exactly as the worker will check it. Paths
are resolved by the worker, in its working directory: use absolute paths or s3:// objects.
Enqueueing an id that already exists adds nothing; if that job completed, its stored result is
printed (the conversion is not run again).

Examples:
  qcow2-stream enqueue --connection redis://127.0.0.1:6379 --id vm1-disk0-2026-12-02 -- \\
      convert /srv/vm1/disk0.raw s3://backups/vm1/disk0.qcow2
  qcow2-stream enqueue --connection redis://127.0.0.1:6379 -- export /srv/a.qcow2 /srv/a.raw`,
    )
    .action(
      action(async (argv: string[], flags: ConnectionFlags & { id?: string; attempts: number; backoff: number; json?: boolean }) => {
        const { enqueue, openQueue } = await import('../fleet/bullmq.js');
        const queue = openQueue(flags.connection, flags.queue);
        try {
          const result = await enqueue(queue, argv, {
            ...(flags.id === undefined ? {} : { id: flags.id }),
            attempts: flags.attempts,
            backoffDelay: flags.backoff,
          });
          if (flags.json) printJson(result);
          else {
            writeStdout(`${result.id}\n`);
            if (result.existing) process.stderr.write(`job ${result.id} already exists (${result.state}); nothing added\n`);
          }
        } finally {
          await queue.close();
        }
      }),
    );

  program
    .command('jobs')
    .description('Show jobs: state, progress, and the summary or the error')
    .requiredOption('--connection <url>', CONNECTION_HELP)
    .option('--queue <name>', 'the queue (default: qcow2-stream)')
    .option('--json', 'print JSON')
    .argument('[id]', 'one job (default: the 50 most recent)')
    .addHelpText(
      'after',
      `
One line per job: id, state, progress (phase, bytes done of total) or the summary, or the error
with its code, attempts made, the command line. Exit code 1 when the job asked for has failed.

Examples:
  qcow2-stream jobs --connection redis://127.0.0.1:6379
  qcow2-stream jobs --connection redis://127.0.0.1:6379 vm1-disk0-2026-12-02 --json`,
    )
    .action(
      action(async (id: string | undefined, flags: ConnectionFlags & { json?: boolean }) => {
        const { jobStatus, listJobs, openQueue } = await import('../fleet/bullmq.js');
        const queue = openQueue(flags.connection, flags.queue);
        try {
          if (id !== undefined) {
            const status = await jobStatus(queue, id);
            if (!status) throw new JobError(`No job '${id}' in queue ${queue.name}`);
            if (flags.json) printJson(status);
            else writeStdout(`${describeJob(status)}\n`);
            return status.state === 'failed' ? ExitCode.FINDINGS : ExitCode.OK;
          }
          const all = await listJobs(queue);
          if (flags.json) printJson(all);
          else writeStdout(all.map(describeJob).join('\n') + (all.length ? '\n' : ''));
          return ExitCode.OK;
        } finally {
          await queue.close();
        }
      }),
    );
}

/** One line per job: id, state, progress or outcome. */
function describeJob(s: JobStatus): string {
  const parts = [s.id, s.state];
  if (s.progress && s.state !== 'completed') {
    const { bytesDone, bytesTotal, phase } = s.progress;
    parts.push(`${phase} ${formatBytes(bytesDone)}${bytesTotal === undefined ? '' : ` of ${formatBytes(bytesTotal)} (${bytesTotal ? Math.floor((100 * bytesDone) / bytesTotal) : 100}%)`}`);
  }
  if (s.result) {
    const sum = s.result.summary as { virtualSize?: number; dataBytesWritten?: number; seconds?: number };
    parts.push(`${s.result.command} done: ${formatBytes(sum.virtualSize ?? 0)} virtual${sum.seconds === undefined ? '' : ` in ${sum.seconds.toFixed(1)} s`}`);
  }
  if (s.error) parts.push(`${s.error.message} [${s.error.code}]`);
  parts.push(`attempts ${s.attemptsMade}`);
  parts.push(s.argv.join(' '));
  return parts.join('  ');
}
