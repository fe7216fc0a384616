/**
 * The fleet end to end: a real redis-server, a real S3-compatible server (s3rver), and workers
 * as child processes of the CLI (`qcow2-stream worker`), so one can be killed with SIGKILL.
 * Outputs are checked with qemu-img (check, compare). Images are small: CI runs this 3 times.
 */

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { execFileSync } from 'node:child_process';
import { open, readdir } from 'node:fs/promises';
import { readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { mixedExtents, writeRawImage } from '../helpers/images.js';
import { hasQemuImg, qemuCheck, qemuCompare, tempDir } from '../helpers/qemu.js';
import { CLI_PATH, runCli } from '../helpers/cli.js';
import { downloadObject, hasRedis, listKeys, startRedis, startS3, type RedisServer, type S3Server } from '../helpers/servers.js';
import { hasQemuNbd, startQemuNbd } from '../helpers/nbd.js';
import { enqueue, jobStatus, openQueue } from '../../src/fleet/index.js';
import type { Queue } from 'bullmq';

const MiB = 1024 * 1024;
const tsx = import.meta.resolve('tsx');
const skip = !hasRedis ? 'redis-server not installed (apt-get install redis-server)' : !hasQemuImg ? 'qemu-img not installed' : false;

let redis: RedisServer;
let s3: S3Server;
const workers = new Set<ChildProcess>();

before(async () => {
  if (skip) return;
  redis = await startRedis();
  s3 = await startS3(['fleet']);
});
after(async () => {
  for (const w of workers) if (w.exitCode === null && w.signalCode === null) w.kill('SIGKILL');
  await s3?.stop();
  await redis?.stop();
});

interface Worker {
  child: ChildProcess;
  log: () => string;
  exited: Promise<number | null>;
}

function startWorker(queue: string, extra: string[] = []): Worker {
  const child = spawn(
    process.execPath,
    ['--import', tsx, CLI_PATH, 'worker', '--connection', redis.url, '--queue', queue, '--lock-duration', '3000', '--stalled-interval', '1000', ...extra],
    { env: { ...process.env, ...s3.env }, stdio: ['ignore', 'ignore', 'pipe'] },
  );
  workers.add(child);
  let log = '';
  child.stderr!.on('data', (d) => (log += d));
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  return { child, log: () => log, exited };
}

async function waitFor<T>(what: string, probe: () => Promise<T | undefined | false>, timeoutMs = 120_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await probe();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

async function waitDone(queue: Queue, ids: readonly string[]): Promise<void> {
  await waitFor(`${ids.length} jobs`, async () => {
    const states = await Promise.all(ids.map(async (id) => (await queue.getJob(id))?.getState()));
    return states.every((s) => s === 'completed' || s === 'failed');
  });
}

/** Checks an external image whose two outputs are objects: downloaded side by side, then qemu-img. */
async function checkObjects(dir: string, metadata: string, data: string, raw: string): Promise<void> {
  const sub = join(dir, `dl-${Math.random().toString(16).slice(2)}`);
  execFileSync('mkdir', [sub]);
  await downloadObject(metadata, join(sub, 'm.qcow2'));
  await downloadObject(data, join(sub, data.slice(data.lastIndexOf('/') + 1)));
  assert.equal(qemuCheck('m.qcow2', sub).code, 0, metadata);
  assert.equal(qemuCompare(raw, 'm.qcow2', sub).code, 0, metadata);
}

/** Puts a local file under `uri` with the SDK (the test's own uploader). */
async function uploadObject(path: string, uri: string): Promise<void> {
  const { S3Client, PutObjectCommand } = await import('@aws-sdk/client-s3');
  const [, bucket, key] = /^s3:\/\/([^/]+)\/(.+)$/.exec(uri)!;
  const client = new S3Client({ forcePathStyle: true });
  try {
    await client.send(new PutObjectCommand({ Bucket: bucket, Key: key, Body: readFileSync(path) }));
  } finally {
    client.destroy();
  }
}

test('3 workers, 30 jobs (files, objects and qemu-nbd exports in and out, mixed sizes): every output is qemu-check clean and equal to its input', { skip: skip || (!hasQemuNbd && 'qemu-nbd not installed') }, async (t) => {
  const dir = tempDir(t);
  const queueName = 'many';
  const queue = openQueue(redis.url, queueName);
  t.after(() => queue.close());
  const pool = [startWorker(queueName, ['--concurrency', '2']), startWorker(queueName, ['--concurrency', '2']), startWorker(queueName)];
  const jobs: Array<{ id: string; raw: string; kind: 'file' | 'internal' | 's3' | 'nbd' | 'from-s3' }> = [];
  for (let i = 0; i < 30; i++) {
    const size = [1, 3, 6, 10][i % 4]! * MiB + (i % 3) * 4096;
    const raw = join(dir, `d${i}.raw`);
    writeRawImage(raw, size, mixedExtents(size, 65536, 100 + i), 100 + i);
    const kind = i % 5 === 0 ? 's3' : i % 5 === 1 ? 'internal' : i % 5 === 2 ? 'nbd' : i % 10 === 4 ? 'from-s3' : i % 7 === 3 ? 's3' : 'file';
    let source = raw;
    if (kind === 'nbd') {
      // A live disk as backup systems expose it: qemu-nbd serving it read-only on a Unix socket.
      source = (await startQemuNbd(t, dir, raw, { format: 'raw' })).uri;
    } else if (kind === 'from-s3') {
      // A qcow2 with its data file already in object storage (made by qemu-img), read back with ranged GETs.
      execFileSync('qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'qcow2', '-o', `data_file=src${i}.data,data_file_raw=on`, raw, `src${i}.qcow2`], { cwd: dir });
      await uploadObject(join(dir, `src${i}.qcow2`), `s3://fleet/src/src${i}.qcow2`);
      await uploadObject(join(dir, `src${i}.data`), `s3://fleet/src/src${i}.data`);
      source = `s3://fleet/src/src${i}.qcow2`;
    }
    const argv =
      kind === 's3'
        ? ['convert', raw, `s3://fleet/night/d${i}.qcow2`, '--no-sync']
        : kind === 'internal'
          ? ['convert', raw, join(dir, `d${i}.qcow2`), '--internal', '--dedup', '--no-sync']
          : ['convert', source, join(dir, `d${i}.qcow2`), '--no-sync'];
    const id = `night-d${i}`;
    // A few go through the CLI's own enqueue; the rest through the TypeScript API.
    if (i % 10 === 0) {
      const added = runCli(['enqueue', '--connection', redis.url, '--queue', queueName, '--id', id, '--backoff', '200', '--', ...argv]);
      assert.equal(added.code, 0, added.stderr);
      assert.equal(added.stdout.trim(), id);
    } else {
      const added = await enqueue(queue, argv, { id, backoffDelay: 200 });
      assert.deepEqual([added.id, added.existing], [id, false]);
    }
    jobs.push({ id, raw, kind });
  }
  await waitDone(
    queue,
    jobs.map((j) => j.id),
  );
  for (const job of jobs) {
    const status = await jobStatus(queue, job.id);
    assert.equal(status?.state, 'completed', `${job.id}: ${JSON.stringify(status?.error)}`);
    // The last progress report: every byte done, of the input's size.
    const size = statSync(job.raw).size;
    assert.deepEqual(status?.progress, { phase: 'finishing', bytesDone: size, bytesTotal: size }, job.id);
    const n = job.id.slice('night-d'.length);
    if (job.kind === 's3') await checkObjects(dir, `s3://fleet/night/d${n}.qcow2`, `s3://fleet/night/d${n}.data`, job.raw);
    else {
      assert.equal(qemuCheck(`d${n}.qcow2`, dir).code, 0, job.id);
      assert.equal(qemuCompare(job.raw, `d${n}.qcow2`, dir).code, 0, job.id);
    }
  }
  // Every worker took part.
  for (const w of pool) assert.match(w.log(), /completed/);
  // `jobs ID` shows the outcome; --json carries the summary.
  const shown = runCli(['jobs', '--connection', redis.url, '--queue', queueName, 'night-d3', '--json']);
  assert.equal(shown.code, 0, shown.stderr);
  const parsed = JSON.parse(shown.stdout) as { state: string; result: { summary: { virtualSize: number } } };
  assert.equal(parsed.state, 'completed');
  assert.equal(parsed.result.summary.virtualSize, 10 * MiB);
  // SIGTERM: each worker stops gracefully, with exit code 0.
  for (const w of pool) w.child.kill('SIGTERM');
  for (const w of pool) assert.equal(await w.exited, 0, w.log());
});

test('NBD and s3:// sources in payloads are validated as the CLI validates them; credentials in a URI are refused unseen; a missing server is retried', { skip }, async (t) => {
  const dir = tempDir(t);
  const queueName = 'uris';
  const queue = openQueue(redis.url, queueName);
  t.after(() => queue.close());
  const out = join(dir, 'o.qcow2');
  // Refused when enqueued, by the parsers the run uses (nothing stored).
  for (const [argv, code, message] of [
    [['convert', 'nbd+unix:///?socket=', out], 'QCOW_ERR_INVALID_ARGUMENT', /names no socket/],
    [['convert', 'nbd+unix://host/?socket=/run/x.sock', out], 'QCOW_ERR_INVALID_ARGUMENT', /has no host/],
    [['convert', 's3://Bad_Bucket/disk.qcow2', out], 'QCOW_ERR_INVALID_ARGUMENT', /does not name a bucket/],
    [['convert', 'nbd://admin:hunter2@127.0.0.1/vda', out], 'QCOW_ERR_JOB', /carries a user name or password \(nbd:\/\/\*\*\*@127\.0\.0\.1\/vda\)/],
    [['convert', join(dir, 'd.raw'), 's3://AKIAEXAMPLE:wJalrSECRET@fleet/k.qcow2'], 'QCOW_ERR_JOB', /credentials never go into payloads/],
    [['export', 's3://AKIAEXAMPLE:wJalrSECRET@fleet/k.qcow2', join(dir, 'k.raw')], 'QCOW_ERR_JOB', /\*\*\*@fleet/],
  ] as const) {
    await assert.rejects(enqueue(queue, argv), (err: Error & { code?: string }) => {
      assert.equal(err.code, code, err.message);
      assert.match(err.message, message);
      assert.doesNotMatch(err.message, /hunter2|wJalrSECRET|AKIAEXAMPLE/);
      return true;
    });
  }
  const cli = runCli(['enqueue', '--connection', redis.url, '--queue', queueName, '--', 'convert', 'nbd://admin:hunter2@127.0.0.1/vda', out]);
  assert.equal(cli.code, 2);
  assert.doesNotMatch(cli.stdout + cli.stderr, /hunter2/);
  assert.equal(await queue.count(), 0);

  // A payload written to the queue by something else gets the same checks in the worker: no retry.
  await queue.add('qcow2-stream', { v: 1, argv: ['convert', 'nbd+unix:///?socket=', out] }, { jobId: 'bad-nbd', attempts: 4, backoff: { type: 'fixed', delay: 100 } });
  // An NBD server that is not there is a connection failure: retried, then failed with its code.
  const gone = `nbd+unix:///?socket=${encodeURIComponent(join(dir, 'gone.sock'))}`;
  await enqueue(queue, ['convert', gone, out, '--nbd-timeout', '2'], { id: 'gone-nbd', attempts: 2, backoffDelay: 100 });
  const worker = startWorker(queueName);
  await waitDone(queue, ['bad-nbd', 'gone-nbd']);
  const bad = await jobStatus(queue, 'bad-nbd');
  assert.deepEqual([bad?.state, bad?.attemptsMade, bad?.error?.code], ['failed', 1, 'QCOW_ERR_INVALID_ARGUMENT']);
  const missing = await jobStatus(queue, 'gone-nbd');
  assert.deepEqual([missing?.state, missing?.attemptsMade, missing?.error?.code], ['failed', 2, 'QCOW_ERR_NBD_CONNECTION']);
  assert.deepEqual((await readdir(dir)).filter((n) => n.includes('o.qcow2') || n.includes('o.data')), []);
  worker.child.kill('SIGTERM');
  assert.equal(await worker.exited, 0);
});

test('a worker killed with SIGKILL mid-job: another worker retries the job from nothing and completes it, nothing partial left', { skip }, async (t) => {
  const dir = tempDir(t);
  const queueName = 'kill';
  const queue = openQueue(redis.url, queueName);
  t.after(() => queue.close());
  const size = 8 * MiB;
  const raw = join(dir, 'k.raw');
  writeRawImage(raw, size, [{ offset: 0, length: size, kind: 'random' }], 7);
  const bytes = readFileSync(raw);
  // The input is a FIFO fed by the test, so the first attempt is provably mid-job when killed.
  const fifo = join(dir, 'k.fifo');
  execFileSync('mkfifo', [fifo]);
  const first = startWorker(queueName);
  await enqueue(queue, ['convert', fifo, join(dir, 'k.qcow2'), '--size', String(size), '--no-sync'], { id: 'kill-1', backoffDelay: 200 });
  const feed1 = await open(fifo, 'w');
  await feed1.write(bytes.subarray(0, 3 * MiB));
  // The first attempt has written part of its outputs under temporary names.
  await waitFor('a partial output', async () => (await readdir(dir)).some((n) => n.endsWith('.partial')));
  first.child.kill('SIGKILL');
  await first.exited;
  await feed1.close().catch(() => {});
  assert.ok((await readdir(dir)).some((n) => n.endsWith('.partial')), 'the killed attempt left its temporary files');
  const second = startWorker(queueName);
  // The retry opens the FIFO again: feed it the whole image.
  const feed2 = await open(fifo, 'w');
  await feed2.write(bytes);
  await feed2.close();
  await waitDone(queue, ['kill-1']);
  const status = await jobStatus(queue, 'kill-1');
  assert.equal(status?.state, 'completed', JSON.stringify(status));
  assert.match(second.log(), /job kill-1: completed/);
  assert.equal(qemuCheck('k.qcow2', dir).code, 0);
  assert.equal(qemuCompare(raw, 'k.qcow2', dir).code, 0);
  assert.deepEqual((await readdir(dir)).filter((n) => n.endsWith('.partial')), []);
  second.child.kill('SIGTERM');
  assert.equal(await second.exited, 0);
});

test('a hostile image fails once with its code and is not retried; the same id twice is one job and one output', { skip }, async (t) => {
  const dir = tempDir(t);
  const queueName = 'edge';
  const queue = openQueue(redis.url, queueName);
  t.after(() => queue.close());
  const worker = startWorker(queueName);
  // A qcow2 header claiming 2^40-byte clusters.
  const hostile = join(dir, 'hostile.qcow2');
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', hostile, '1M']);
  const header = readFileSync(hostile);
  header.writeUInt32BE(40, 20);
  writeFileSync(hostile, header);
  await enqueue(queue, ['export', hostile, join(dir, 'hostile.raw')], { id: 'hostile-1', attempts: 5, backoffDelay: 100 });

  const raw = join(dir, 'once.raw');
  writeRawImage(raw, 2 * MiB, mixedExtents(2 * MiB, 65536, 9), 9);
  const argv = ['convert', raw, 's3://fleet/once/once.qcow2', '--no-sync'];
  const a = await enqueue(queue, argv, { id: 'once-1' });
  const b = await enqueue(queue, argv, { id: 'once-1' });
  assert.deepEqual([a.existing, b.existing], [false, true]);
  // The same id for another command line is refused.
  await assert.rejects(enqueue(queue, [...argv, '--force'], { id: 'once-1' }), { code: 'QCOW_ERR_JOB' });
  await waitDone(queue, ['hostile-1', 'once-1']);

  const failed = await jobStatus(queue, 'hostile-1');
  assert.equal(failed?.state, 'failed');
  assert.equal(failed?.attemptsMade, 1);
  assert.match(failed!.error!.code, /^QCOW_ERR_(CORRUPT_IMAGE|LIMIT_EXCEEDED|UNSUPPORTED_FEATURE)$/);
  const shown = runCli(['jobs', '--connection', redis.url, '--queue', queueName, 'hostile-1']);
  assert.equal(shown.code, 1);
  assert.match(shown.stdout, /hostile-1 {2}failed {2}.*\[QCOW_ERR_[A-Z_]+\]/);
  assert.deepEqual((await readdir(dir)).filter((n) => n.includes('hostile.raw')), []);

  // After success, the same id again returns the stored result and runs nothing.
  const c = await enqueue(queue, argv, { id: 'once-1' });
  assert.equal(c.state, 'completed');
  assert.equal((c.result?.summary as { virtualSize: number }).virtualSize, 2 * MiB);
  const again = runCli(['enqueue', '--connection', redis.url, '--queue', queueName, '--id', 'once-1', '--json', '--', ...argv]);
  assert.equal(again.code, 0, again.stderr);
  assert.equal((JSON.parse(again.stdout) as { existing: boolean }).existing, true);
  await new Promise((r) => setTimeout(r, 500));
  assert.equal(worker.log().match(/job once-1: started/g)?.length, 1);
  assert.deepEqual((await listKeys('fleet')).filter((k) => k.startsWith('once/')), ['once/once.data', 'once/once.qcow2']);
  await checkObjects(dir, 's3://fleet/once/once.qcow2', 's3://fleet/once/once.data', raw);

  // Payloads are untrusted: the worker refuses what a job may not ask for, without retries.
  await assert.rejects(enqueue(queue, ['wrap', raw, join(dir, 'w.qcow2')]), { code: 'QCOW_ERR_JOB' });
  await assert.rejects(enqueue(queue, ['convert', raw, '-', '--data-file', join(dir, 'x.data')]), { code: 'QCOW_ERR_JOB' });
  await enqueue(queue, ['convert', raw, join(dir, 'u.qcow2'), '--base', raw, '--allow-unsafe-paths'], { id: 'unsafe-1', backoffDelay: 100 });
  await waitDone(queue, ['unsafe-1']);
  const unsafe = await jobStatus(queue, 'unsafe-1');
  assert.deepEqual([unsafe?.state, unsafe?.attemptsMade, unsafe?.error?.code], ['failed', 1, 'QCOW_ERR_JOB']);
  worker.child.kill('SIGTERM');
  assert.equal(await worker.exited, 0);
});

test('SIGTERM: a worker waits for its running job at most --shutdown-timeout, then cancels it; the job is retried, nothing partial left', { skip }, async (t) => {
  const dir = tempDir(t);
  const queueName = 'term';
  const queue = openQueue(redis.url, queueName);
  t.after(() => queue.close());
  const size = 4 * MiB;
  const raw = join(dir, 't.raw');
  writeRawImage(raw, size, [{ offset: 0, length: size, kind: 'random' }], 8);
  const bytes = readFileSync(raw);
  const fifo = join(dir, 't.fifo');
  execFileSync('mkfifo', [fifo]);
  const worker = startWorker(queueName, ['--shutdown-timeout', '1']);
  await enqueue(queue, ['convert', fifo, join(dir, 't.qcow2'), '--size', String(size), '--no-sync'], { id: 'term-1', backoffDelay: 200 });
  const feed = await open(fifo, 'w');
  await feed.write(bytes.subarray(0, MiB));
  await waitFor('a partial output', async () => (await readdir(dir)).some((n) => n.endsWith('.partial')));
  // The input stalls: the job cannot finish within the timeout.
  worker.child.kill('SIGTERM');
  assert.equal(await worker.exited, 0, worker.log());
  await feed.close().catch(() => {});
  assert.match(worker.log(), /shutdown timeout: cancelling running jobs/);
  const status = await jobStatus(queue, 'term-1');
  assert.ok(status && ['delayed', 'waiting'].includes(status.state), JSON.stringify(status));
  assert.equal(status.attemptsMade, 1);
  assert.equal(status.error?.code, 'QCOW_ERR_ABORTED');
  assert.deepEqual((await readdir(dir)).filter((n) => n.endsWith('.partial') || n.startsWith('t.qcow2') || n.startsWith('t.data')), []);
  // Another worker picks it up and completes it.
  const next = startWorker(queueName);
  const feed2 = await open(fifo, 'w');
  await feed2.write(bytes);
  await feed2.close();
  await waitDone(queue, ['term-1']);
  assert.equal((await jobStatus(queue, 'term-1'))?.state, 'completed');
  assert.equal(qemuCompare(raw, 't.qcow2', dir).code, 0);
  next.child.kill('SIGTERM');
  assert.equal(await next.exited, 0);
});

test('SIGTERM when Redis no longer answers: the worker still stops, after --shutdown-timeout and a short grace, with an error exit', { skip, timeout: 90_000 }, async () => {
  // A Redis of its own, stopped under the worker.
  const own = await startRedis();
  const child = spawn(process.execPath, ['--import', tsx, CLI_PATH, 'worker', '--connection', own.url, '--shutdown-timeout', '1'], { stdio: ['ignore', 'ignore', 'pipe'] });
  workers.add(child);
  let log = '';
  child.stderr!.on('data', (d) => (log += d));
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  await waitFor('the worker to start', async () => log.includes('running on'));
  await own.stop();
  child.kill('SIGTERM');
  assert.equal(await exited, 2, log);
  assert.match(log, /Redis does not answer: stopping/);
});
