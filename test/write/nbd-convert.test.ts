import assert from 'node:assert/strict';
import { readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { convert } from '../../src/write/convert.js';
import { ClusterSweep, nbdBatches, openNbdInput } from '../../src/write/nbd-source.js';
import { NbdClient, BASE_ALLOCATION, NBD_FLAG } from '../../src/io/nbd.js';
import { BufferPool } from '../../src/write/sources.js';
import type { Block, BlockBatch } from '../../src/block.js';
import { InvalidArgumentError, NbdConnectionError, NbdServerError } from '../../src/errors.js';
import { runCli } from '../helpers/cli.js';
import { mixedExtents, writeRawImage } from '../helpers/images.js';
import { needQemuNbd, startFakeServer, startQemuNbd } from '../helpers/nbd.js';
import { randomBytes } from 'node:crypto';
import { qemuCheck, qemuImg, qemuIo, tempDir } from '../helpers/qemu.js';

const MiB = 1024 * 1024;
const KiB = 1024;

/** `qemu-img compare` of the served image with a converted one (0 = identical). */
function compareWith(served: string, servedFormat: string, image: string, cwd: string): void {
  const r = qemuImg(['compare', '-f', servedFormat, '-F', 'qcow2', served, image], cwd);
  assert.equal(r.code, 0, r.stdout + r.stderr);
  const check = qemuCheck(image, cwd);
  assert.equal(check.code, 0, check.stdout + check.stderr);
}

/** The guest ranges an image itself stores (depth 0 in qemu-img map), with their zero flag. */
function ownExtents(image: string, cwd: string): Array<{ start: number; length: number; zero: boolean }> {
  const r = qemuImg(['map', '--output=json', image], cwd);
  assert.equal(r.code, 0, r.stderr);
  const out: Array<{ start: number; length: number; zero: boolean }> = [];
  for (const e of JSON.parse(r.stdout) as Array<{ start: number; length: number; depth: number; zero: boolean }>) {
    if (e.depth !== 0) continue;
    const last = out[out.length - 1];
    if (last && last.start + last.length === e.start && last.zero === e.zero) last.length += e.length;
    else out.push({ start: e.start, length: e.length, zero: e.zero });
  }
  return out;
}

test('ClusterSweep: extents become cluster runs; a cluster touched by two kinds is read', () => {
  const sweep = new ClusterSweep(10 * 1024 + 100, 1024);
  const runs = [
    ...sweep.add(0, 2048, 'zero'),
    ...sweep.add(2048, 2560, 'clean'),
    ...sweep.add(2560, 3072, 'zero'), // cluster 2: clean + zero → read
    ...sweep.add(3072, 5000, 'clean'), // clusters 3, and 4 partly
    ...sweep.add(5000, 5120, 'clean'), // cluster 4 finishes clean
    ...sweep.add(5120, 10 * 1024 + 100, 'zero'), // through the short last cluster
    ...sweep.finish(),
  ];
  assert.deepEqual(runs, [
    { index: 0, count: 2, kind: 'zero' },
    { index: 2, count: 1, kind: 'read' },
    { index: 3, count: 2, kind: 'clean' },
    { index: 5, count: 6, kind: 'zero' },
  ]);
});

test('convert from NBD: a qcow2 served on a Unix socket, every layout, equal to the served image', async (t) => {
  if (!needQemuNbd(t)) return;
  const dir = tempDir(t);
  const raw = join(dir, 'src.raw');
  const size = 24 * MiB + 3 * 512;
  writeRawImage(raw, size, mixedExtents(size, 65536, 7));
  const served = join(dir, 'served.qcow2');
  assert.equal(qemuImg(['convert', '-f', 'raw', '-O', 'qcow2', raw, served]).code, 0);
  const server = await startQemuNbd(t, dir, served, { format: 'qcow2' });

  const ext = await convert({ input: server.uri, output: join(dir, 'ext.qcow2'), sync: false });
  assert.equal(ext.virtualSize, size);
  assert.equal(ext.dataFileRaw, true);
  compareWith(served, 'qcow2', 'ext.qcow2', dir);
  const sparse = await convert({ input: server.uri, output: join(dir, 'sparse.qcow2'), dataFileRaw: false, clusterSize: 4096, sync: false });
  assert.equal(sparse.clusterSize, 4096);
  compareWith(served, 'qcow2', 'sparse.qcow2', dir);
  const internal = await convert({ input: server.uri, output: join(dir, 'int.qcow2'), layout: 'internal', sync: false });
  assert.equal(internal.layout, 'internal');
  compareWith(served, 'qcow2', 'int.qcow2', dir);
  // Only the data qemu stores was transferred: never more than the served image's allocation.
  const allocated = (JSON.parse(qemuImg(['map', '--output=json', served]).stdout) as Array<{ length: number; data: boolean }>).filter((e) => e.data).reduce((n, e) => n + e.length, 0);
  assert.ok(ext.sourceBytesRead! <= allocated, `${ext.sourceBytesRead} read, ${allocated} allocated`);
});

test('convert from NBD: holes inside read clusters (OFFSET_HOLE) read as zeros through recycled buffers', async (t) => {
  if (!needQemuNbd(t)) return;
  const dir = tempDir(t);
  const served = join(dir, 'half.qcow2');
  assert.equal(qemuImg(['create', '-q', '-f', 'qcow2', served, '32M']).code, 0);
  // Each 2 MiB: 1 MiB of data, then 1 MiB never written. With 2 MiB clusters every cluster is
  // read, and qemu answers its second half with a hole chunk, not bytes.
  const writes = Array.from({ length: 16 }, (_, i) => ['-c', `write -P ${0x10 + i} ${i * 2}M 1M`]).flat();
  assert.equal(qemuIo([...writes, served]).code, 0);
  const server = await startQemuNbd(t, dir, served, { format: 'qcow2' });
  const summary = await convert({ input: server.uri, output: join(dir, 'out.qcow2'), clusterSize: 2 * MiB, sync: false });
  assert.equal(summary.sourceBytesRead, 16 * MiB, 'the holes were not transferred');
  compareWith(served, 'qcow2', 'out.qcow2', dir);
  const internal = await convert({ input: server.uri, output: join(dir, 'int.qcow2'), clusterSize: 2 * MiB, layout: 'internal', sync: false });
  assert.equal(internal.dataClusters, 16);
  compareWith(served, 'qcow2', 'int.qcow2', dir);
});

test('convert from NBD: extended headers and a 4 KiB maximum block size (hundreds of requests per read), against our fake server', async (t) => {
  const dir = tempDir(t);
  // 3 MiB: random, zeros (reported as holes), random.
  const disk = Buffer.concat([randomBytes(MiB + 65536), Buffer.alloc(MiB), randomBytes(MiB - 65536)]);
  writeFileSync(join(dir, 'disk.raw'), disk);
  const server = await startFakeServer(t, dir, disk, { extendedHeaders: true, maxBlock: 4096 });
  const summary = await convert({ input: server.uri, output: join(dir, 'out.qcow2'), sync: false });
  assert.equal(summary.sourceBytesRead, 2 * MiB);
  compareWith(join(dir, 'disk.raw'), 'raw', 'out.qcow2', dir);
  // The fake publishes b0 with every other 64 KiB block dirty.
  writeFileSync(join(dir, 'zero.raw'), Buffer.alloc(disk.length));
  assert.equal(qemuImg(['convert', '-q', '-f', 'raw', '-O', 'qcow2', join(dir, 'zero.raw'), join(dir, 'base.qcow2')]).code, 0);
  const inc = await convert({ input: server.uri, output: join(dir, 'inc.qcow2'), base: join(dir, 'base.qcow2'), bitmap: 'b0', sync: false });
  assert.equal(inc.unchangedClusters, 24);
  assert.equal(inc.sourceBytesRead, 16 * 65536);
});

test('convert from NBD: a sparse raw file over TCP reads only its data', async (t) => {
  if (!needQemuNbd(t)) return;
  const dir = tempDir(t);
  const raw = join(dir, 'sparse.raw');
  const size = 256 * MiB;
  // 3 data extents (2 MiB + 64 KiB + 1 MiB) in a 256 MiB hole.
  writeRawImage(raw, size, [
    { offset: 0, length: 2 * MiB, kind: 'random' },
    { offset: 100 * MiB, length: 64 * KiB, kind: 'random' },
    { offset: 255 * MiB, length: MiB, kind: 'random' },
  ]);
  const server = await startQemuNbd(t, dir, raw, { format: 'raw', tcp: true });
  const summary = await convert({ input: server.uri, output: join(dir, 'out.qcow2'), sync: false });
  assert.equal(summary.sourceBytesRead, 2 * MiB + 64 * KiB + MiB);
  assert.equal(summary.dataClusters, (2 * MiB + 64 * KiB + MiB) / 65536);
  compareWith(raw, 'raw', 'out.qcow2', dir);
});

test('convert --bitmap: an overlay of exactly the dirty clusters, equal to the served image, and its manifest', async (t) => {
  if (!needQemuNbd(t)) return;
  const dir = tempDir(t);
  const disk = join(dir, 'vm.qcow2');
  assert.equal(qemuImg(['create', '-q', '-f', 'qcow2', disk, '32M']).code, 0);
  assert.equal(qemuIo(['-c', 'write -P 0x11 0 4M', '-c', 'write -P 0x22 16M 2M', disk]).code, 0);
  // The first backup: full, with a manifest. Then the bitmap starts (as a checkpoint would).
  let server = await startQemuNbd(t, dir, disk, { format: 'qcow2' });
  await convert({ input: server.uri, output: join(dir, 'full.qcow2'), manifest: join(dir, 'full.xxh'), sync: false });
  server.kill();
  assert.equal(qemuImg(['bitmap', '--add', disk, 'b0']).code, 0);
  // The day's writes: new data, a rewrite, a zeroed range over old data, a write of 1 KiB
  // inside a cluster (the whole cluster must come along).
  assert.equal(
    qemuIo(['-c', 'write -P 0x33 1M 128K', '-c', 'write -P 0x44 24M 64K', '-c', 'write -z 16M 128K', '-c', 'write -P 0x55 3M 1K', disk]).code,
    0,
  );
  server = await startQemuNbd(t, dir, disk, { format: 'qcow2', bitmap: 'b0' });
  const inc = await convert({
    input: server.uri,
    output: join(dir, 'inc.qcow2'),
    base: join(dir, 'full.qcow2'),
    bitmap: 'b0',
    baseManifest: join(dir, 'full.xxh'),
    manifest: join(dir, 'inc.xxh'),
    sync: false,
  });
  assert.equal(inc.backingFile, 'full.qcow2');
  compareWith(disk, 'qcow2', 'inc.qcow2', dir);
  // Allocated in the overlay: the dirty clusters, and nothing else; the zeroed range zero-flagged.
  assert.deepEqual(ownExtents('inc.qcow2', dir), [
    { start: 1 * MiB, length: 128 * KiB, zero: false },
    { start: 3 * MiB, length: 64 * KiB, zero: false },
    { start: 16 * MiB, length: 128 * KiB, zero: true },
    { start: 24 * MiB, length: 64 * KiB, zero: false },
  ]);
  // Only dirty data crossed the wire: the zeroed range is known from block status.
  assert.equal(inc.sourceBytesRead, 128 * KiB + 64 * KiB + 64 * KiB);
  assert.equal(inc.unchangedClusters, 512 - 6);
  // The updated manifest is the one a full conversion of today's disk records.
  await convert({ input: server.uri, output: join(dir, 'today.qcow2'), manifest: join(dir, 'today.xxh'), sync: false });
  assert.ok(readFileSync(join(dir, 'inc.xxh')).equals(readFileSync(join(dir, 'today.xxh'))), 'manifest of the incremental = manifest of a full run');
  // The same through the CLI.
  const cli = runCli(['convert', server.uri, 'cli.qcow2', '--bitmap', 'b0', '--base', 'full.qcow2', '--json', '--no-sync'], { cwd: dir });
  assert.equal(cli.code, 0, cli.stderr);
  assert.equal((JSON.parse(cli.stdout) as { dataClusters: number }).dataClusters, 4);
  compareWith(disk, 'qcow2', 'cli.qcow2', dir);
});

test('convert --bitmap: a bitmap the server does not publish fails before any output exists', async (t) => {
  if (!needQemuNbd(t)) return;
  const dir = tempDir(t);
  const disk = join(dir, 'vm.qcow2');
  assert.equal(qemuImg(['create', '-q', '-f', 'qcow2', disk, '4M']).code, 0);
  const server = await startQemuNbd(t, dir, disk, { format: 'qcow2' });
  writeFileSync(join(dir, 'base.qcow2'), readFileSync(disk));
  const out = join(dir, 'out');
  const before = readdirSync(dir).sort();
  await assert.rejects(
    convert({ input: server.uri, output: join(dir, 'inc.qcow2'), base: join(dir, 'base.qcow2'), bitmap: 'missing' }),
    (err: unknown) => err instanceof NbdServerError && /does not publish the dirty bitmap 'missing'/.test(err.message),
  );
  assert.deepEqual(readdirSync(dir).sort(), before);
  const cli = runCli(['convert', server.uri, out, '--bitmap', 'missing', '--base', 'base.qcow2'], { cwd: dir });
  assert.equal(cli.code, 2);
  assert.match(cli.stderr, /^qcow2-stream: The NBD server at .* does not publish the dirty bitmap 'missing'/);
  assert.doesNotMatch(cli.stderr, /\n\s+at /, 'no stack trace');
  assert.deepEqual(readdirSync(dir).sort(), before);
  // --bitmap without --base, or on a file input: refused up front.
  await assert.rejects(convert({ input: server.uri, output: out, bitmap: 'b0' }), InvalidArgumentError);
  await assert.rejects(convert({ input: disk, output: out, bitmap: 'b0', base: join(dir, 'base.qcow2') }), InvalidArgumentError);
});

test('convert from NBD: a server killed mid-transfer → NbdConnectionError and no output', async (t) => {
  if (!needQemuNbd(t)) return;
  const dir = tempDir(t);
  const raw = join(dir, 'big.raw');
  writeRawImage(raw, 64 * MiB, [{ offset: 0, length: 64 * MiB, kind: 'random' }]);
  const server = await startQemuNbd(t, dir, raw, { format: 'raw' });
  const before = readdirSync(dir).sort();
  let killed = false;
  await assert.rejects(
    convert({
      input: server.uri,
      output: join(dir, 'out.qcow2'),
      progressInterval: MiB,
      onProgress: () => {
        if (!killed) server.kill();
        killed = true;
      },
    }),
    (err: unknown) => err instanceof NbdConnectionError && err.uri === server.uri,
  );
  assert.ok(killed);
  assert.deepEqual(readdirSync(dir).sort(), before);
});

/** The guest bytes a stream of batches describes (zero runs and missing clusters read as zeros), releasing pooled views. */
async function assemble(batches: AsyncIterable<BlockBatch>, size: number, pool?: BufferPool): Promise<{ bytes: Buffer; batches: BlockBatch[]; blocks: Block[] }> {
  const bytes = Buffer.alloc(size);
  const seen: BlockBatch[] = [];
  const blocks: Block[] = [];
  for await (const batch of batches) {
    seen.push(batch);
    for (const block of batch.blocks) {
      blocks.push(block);
      if (block.count === undefined && !block.zero) bytes.set(block.data, block.index * batch.clusterSize);
      pool?.release(block.data);
    }
  }
  return { bytes, batches: seen, blocks };
}

test('nbdBatches over several connections: requests go to the least loaded, the bytes are the export\'s', async (t) => {
  const dir = tempDir(t);
  // 6 MiB: random, 1 MiB of zeros (block status says zero: never read), random.
  const disk = Buffer.concat([randomBytes(3 * MiB), Buffer.alloc(MiB), randomBytes(2 * MiB)]);
  const server = await startFakeServer(t, dir, disk, { flags: 1 | 2 | 256, maxBlock: 4 * MiB });
  const client = await NbdClient.connect(server.uri, { metaContexts: [BASE_ALLOCATION] });
  const siblings = await Promise.all([client.connectSibling(), client.connectSibling(), client.connectSibling()]);
  const connections = [client, ...siblings];
  const pool = new BufferPool();
  const { bytes, batches } = await assemble(nbdBatches(client, { connections, pool }), disk.length, pool);
  assert.ok(bytes.equals(disk));
  assert.equal(batches[batches.length - 1]!.inputEnd, disk.length);
  // 5 MiB of data in 512 KiB requests, all issued at once: spread over the four connections.
  assert.equal(server.reads.reduce((a, b) => a + b, 0), 10);
  assert.ok(server.reads.every((n) => n > 0), `reads per connection: ${server.reads}`);
  assert.equal(connections.reduce((n, c) => n + c.stats.dataBytes, 0), 5 * MiB);
  await Promise.all(connections.map((c) => c.close()));
});

test('nbdBatches with a dirty bitmap: scattered dirty clusters share one read buffer, clean ones are runs', async (t) => {
  const dir = tempDir(t);
  const disk = randomBytes(4 * MiB);
  // The fake's b0 marks every other 64 KiB block dirty: 32 of the 64 clusters.
  const server = await startFakeServer(t, dir, disk);
  const client = await NbdClient.connect(server.uri, { metaContexts: [BASE_ALLOCATION, 'qemu:dirty-bitmap:b0'] });
  const { blocks, batches } = await assemble(nbdBatches(client, { dirtyContext: 'qemu:dirty-bitmap:b0' }), disk.length);
  const data = blocks.filter((b) => !b.sameAsBase);
  assert.deepEqual(
    data.map((b) => b.index),
    Array.from({ length: 32 }, (_, i) => 2 * i),
  );
  assert.ok(data.every((b) => Buffer.from(b.data).equals(disk.subarray(b.index * 65536, (b.index + 1) * 65536))));
  assert.equal(new Set(data.map((b) => b.data.buffer)).size, 1, 'the 32 dirty clusters were read into one buffer');
  assert.deepEqual(
    blocks.filter((b) => b.sameAsBase).map((b) => [b.index, b.count]),
    Array.from({ length: 32 }, (_, i) => [2 * i + 1, 1]),
  );
  assert.equal(batches.filter((b) => b.blocks.some((x) => !x.sameAsBase)).length, 1, 'one batch for the one buffer');
  assert.equal(client.stats.dataBytes, 2 * MiB);
  await client.close();
});

/**
 * Reads an opened export through its batches; past `waitAt` bytes, waits (bounded polling)
 * until `connections` connections are up, so that the siblings take part deterministically.
 */
async function readAll(input: Awaited<ReturnType<typeof openNbdInput>>, waitAt: number, connections: number): Promise<Buffer> {
  const pool = new BufferPool();
  const bytes = Buffer.alloc(input.size);
  for await (const batch of input.batches(65536, pool)) {
    for (const block of batch.blocks) {
      if (block.count === undefined && !block.zero) bytes.set(block.data, block.index * 65536);
      pool.release(block.data);
    }
    const last = batch.blocks[batch.blocks.length - 1];
    if (last && last.index * 65536 >= waitAt) {
      for (let i = 0; i < 500 && input.connections.length < connections; i++) await new Promise((r) => setTimeout(r, 10));
    }
  }
  return bytes;
}

test('convert from NBD over several connections (qemu-nbd allows 8): siblings join once the job proves long, equal to the served image', async (t) => {
  if (!needQemuNbd(t)) return;
  const dir = tempDir(t);
  const raw = join(dir, 'data.raw');
  writeRawImage(raw, 96 * MiB, [{ offset: 0, length: 96 * MiB, kind: 'random' }]);
  const server = await startQemuNbd(t, dir, raw, { format: 'raw' });
  const input = await openNbdInput(server.uri, {});
  t.after(() => input.close());
  assert.ok(input.client.flags & NBD_FLAG.CAN_MULTI_CONN);
  assert.equal(input.connections.length, 1, 'no sibling before the reads pass 64 MiB');
  // Siblings start when 64 MiB are requested (the consumer, 16 MiB behind, is at 48): wait for them at 56.
  const bytes = await readAll(input, 56 * MiB, 4);
  assert.ok(bytes.equals(readFileSync(raw)));
  assert.equal(input.connections.length, 4);
  assert.ok(input.connections.every((c) => c.stats.reads > 0), `reads per connection: ${input.connections.map((c) => c.stats.reads)}`);
  assert.equal(input.bytesRead, 96 * MiB);
  await input.close();

  // A short job (under 64 MiB of reads) stays on one connection.
  const small = join(dir, 'small.raw');
  writeRawImage(small, 16 * MiB, mixedExtents(16 * MiB, 65536));
  const smallServer = await startQemuNbd(t, dir, small, { format: 'raw' });
  const short = await openNbdInput(smallServer.uri, {});
  assert.ok((await readAll(short, Infinity, 1)).equals(readFileSync(small)));
  assert.equal(short.connections.length, 1);
  await short.close();
  // Through convert.
  await convert({ input: server.uri, output: join(dir, 'out.qcow2'), sync: false });
  compareWith(raw, 'raw', 'out.qcow2', dir);
});

test('convert from NBD: a server that admits fewer clients than it allows connections for (qemu-nbd -e 2) — the extra attempts are cancelled, not waited for', async (t) => {
  if (!needQemuNbd(t)) return;
  const dir = tempDir(t);
  const raw = join(dir, 'r.raw');
  writeRawImage(raw, 80 * MiB, [{ offset: 0, length: 80 * MiB, kind: 'random' }]);
  const server = await startQemuNbd(t, dir, raw, { format: 'raw', args: ['-e', '2'] });
  // Two of the three siblings wait for a greeting that never comes; with a 10-minute timeout,
  // only cancellation at close lets this finish (the runner's 5-minute limit fails it otherwise).
  const input = await openNbdInput(server.uri, { nbd: { timeout: 600_000 } });
  assert.ok((await readAll(input, 52 * MiB, 2)).equals(readFileSync(raw)));
  assert.equal(input.connections.length, 2, 'the one sibling the server admits');
  await input.close();
  // The server is free again for the next client, and convert goes the same way.
  const summary = await convert({ input: server.uri, output: join(dir, 'out.qcow2'), sync: false, nbd: { timeout: 600_000 } });
  assert.equal(summary.sourceBytesRead, 80 * MiB);
  compareWith(raw, 'raw', 'out.qcow2', dir);
});

test('nbdBatches: a long data run is read a buffer at a time — 8 buffers ahead, not the whole run at once', async (t) => {
  const dir = tempDir(t);
  const disk = randomBytes(64 * MiB);
  const server = await startFakeServer(t, dir, disk, { maxBlock: 4 * MiB });
  const client = await NbdClient.connect(server.uri, { metaContexts: [BASE_ALLOCATION] });
  t.after(() => client.close());
  const batches = nbdBatches(client);
  const first = await batches.next();
  assert.equal(first.done, false);
  // One run of 1024 clusters: the first buffer and 8 more at most were asked for (512 KiB requests).
  assert.ok(client.stats.reads <= 9 * 4, `${client.stats.reads} requests issued after the first batch`);
  const { bytes } = await assemble(
    (async function* () {
      yield first.value as BlockBatch;
      yield* batches;
    })(),
    disk.length,
  );
  assert.ok(bytes.equals(disk));
  assert.equal(client.stats.reads, 128);
});
