/**
 * Real servers for the object-storage and fleet tests, started per test file on a free port of
 * 127.0.0.1 and stopped at the end: s3rver (an S3-compatible server from npm, in-process, files
 * in a temporary directory) and Debian's redis-server (a child process, no persistence).
 */

import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { connect, createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createRequire } from 'node:module';
import type { TestContext } from 'node:test';

export const hasRedis = spawnSync('sh', ['-c', 'command -v redis-server'], { stdio: 'ignore' }).status === 0;

/** Skips the test (returns false) when redis-server is not installed. */
export function needRedis(t: TestContext): boolean {
  if (hasRedis) return true;
  t.skip('redis-server not installed (apt-get install redis-server)');
  return false;
}

/** A free TCP port on 127.0.0.1 (asked of the kernel, then released). */
export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.on('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address() as { port: number };
      server.close(() => resolve(port));
    });
  });
}

export interface S3Server {
  /** The endpoint, for AWS_ENDPOINT_URL. */
  endpoint: string;
  /** Environment for a child process (endpoint, region, dummy credentials, path-style). */
  env: Record<string, string>;
  dir: string;
  stop(): Promise<void>;
}

/**
 * Starts s3rver (as a child process: tests also run the CLI synchronously, which would block an
 * in-process server) with the given buckets, and points this process's SDK chain at it through
 * the environment, as a user would. Its credentials are s3rver's fixed test pair, not secrets.
 */
export async function startS3(buckets: readonly string[]): Promise<S3Server> {
  const bin = createRequire(import.meta.url).resolve('s3rver/bin/s3rver.js');
  const dir = mkdtempSync(join(tmpdir(), 'qcow2-s3rver-'));
  const port = await freePort();
  const child = spawn(
    process.execPath,
    [bin, '-d', dir, '-a', '127.0.0.1', '-p', String(port), '--silent', ...buckets.flatMap((name) => ['--configure-bucket', name])],
    { stdio: ['ignore', 'ignore', 'pipe'] },
  );
  let output = '';
  child.stderr!.on('data', (d) => (output += d));
  await waitForPort(port, child, () => output);
  const endpoint = `http://127.0.0.1:${port}`;
  const env = {
    AWS_ENDPOINT_URL: endpoint,
    AWS_REGION: 'us-east-1',
    AWS_ACCESS_KEY_ID: 'S3RVER',
    AWS_SECRET_ACCESS_KEY: 'S3RVER',
    // s3rver checks no checksums, and the SDK's CRC32 of every part only costs time here.
    AWS_REQUEST_CHECKSUM_CALCULATION: 'WHEN_REQUIRED',
    AWS_RESPONSE_CHECKSUM_VALIDATION: 'WHEN_REQUIRED',
  };
  Object.assign(process.env, env);
  return {
    endpoint,
    env,
    dir,
    async stop() {
      await stopChild(child);
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

async function waitForPort(port: number, child: ChildProcess, output: () => string): Promise<void> {
  const deadline = Date.now() + 15_000;
  for (;;) {
    const open = await new Promise<boolean>((resolve) => {
      const socket = connect(port, '127.0.0.1');
      socket.once('connect', () => {
        socket.destroy();
        resolve(true);
      });
      socket.once('error', () => resolve(false));
    });
    if (open) return;
    if (child.exitCode !== null || Date.now() > deadline) {
      child.kill('SIGKILL');
      throw new Error(`server on port ${port} did not start: ${output()}`);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
}

async function stopChild(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((r) => child.once('exit', r));
  child.kill('SIGTERM');
  await exited;
}

export interface RedisServer {
  url: string;
  port: number;
  stop(): Promise<void>;
}

/** Starts redis-server on a free port with no persistence; resolves once it accepts commands. */
export async function startRedis(): Promise<RedisServer> {
  const port = await freePort();
  const dir = mkdtempSync(join(tmpdir(), 'qcow2-redis-'));
  const child: ChildProcess = spawn(
    'redis-server',
    ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--dir', dir, '--loglevel', 'warning'],
    { stdio: ['ignore', 'pipe', 'pipe'] },
  );
  let output = '';
  child.stdout!.on('data', (d) => (output += d));
  child.stderr!.on('data', (d) => (output += d));
  const deadline = Date.now() + 10_000;
  for (;;) {
    const ping = spawnSync('redis-cli', ['-p', String(port), 'ping'], { encoding: 'utf8' });
    if (ping.stdout?.trim() === 'PONG') break;
    if (child.exitCode !== null || Date.now() > deadline) {
      child.kill('SIGKILL');
      throw new Error(`redis-server did not start: ${output}`);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  return {
    url: `redis://127.0.0.1:${port}`,
    port,
    async stop() {
      await stopChild(child);
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** Downloads an object to a local file with the SDK (the test's own reader, not ours). */
export async function downloadObject(uri: string, path: string): Promise<void> {
  const { S3Client, GetObjectCommand } = await import('@aws-sdk/client-s3');
  const { writeFileSync } = await import('node:fs');
  const [, bucket, key] = /^s3:\/\/([^/]+)\/(.+)$/.exec(uri)!;
  const client = new S3Client({ forcePathStyle: true });
  try {
    const got = await client.send(new GetObjectCommand({ Bucket: bucket, Key: key }));
    writeFileSync(path, await got.Body!.transformToByteArray());
  } finally {
    client.destroy();
  }
}

/** The keys in a bucket (to prove nothing partial was left). */
export async function listKeys(bucket: string): Promise<string[]> {
  const { S3Client, ListObjectsV2Command } = await import('@aws-sdk/client-s3');
  const client = new S3Client({ forcePathStyle: true });
  try {
    const listed = await client.send(new ListObjectsV2Command({ Bucket: bucket }));
    return (listed.Contents ?? []).map((o) => o.Key!).sort();
  } finally {
    client.destroy();
  }
}
