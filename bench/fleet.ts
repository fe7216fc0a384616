/**
 * Fleet and object-storage benchmarks (issue 19's targets), each as a ratio within a round:
 *
 *   fleet  N images converted by one `worker --concurrency 2` through Redis, against the same
 *          conversions run one after another with the CLI (target: fleet ≥ 0.9× their speed)
 *   s3     a conversion uploaded to s3:// (data + metadata objects), against lib-storage's
 *          Upload of the raw file alone (target: ≥ 0.8× its throughput)
 *
 *   npm run bench:fleet                                   # 16 × 256 MiB, 2 GiB upload, 3 rounds
 *   npm run bench:fleet -- --count 2 --size 8M --s3-size 16M --rounds 1     # a smoke run
 *   npm run bench:fleet -- --record                       # also writes bench/RESULTS-fleet.md
 *
 * Needs a build (`npm run build`), redis-server and qemu-img; s3rver runs as a child process (it
 * writes to disk, so the s3 figures describe this machine's disk more than a real store).
 */

import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { createReadStream, mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { cli, machineLine, median, parseSize, root } from './common.js';
import { generateImage } from './images.js';
import { startRedis, startS3 } from '../test/helpers/servers.js';


const { values: args } = parseArgs({
  options: {
    count: { type: 'string', default: '16' },
    size: { type: 'string', default: '256M' },
    's3-size': { type: 'string', default: '2G' },
    concurrency: { type: 'string', default: '2' },
    rounds: { type: 'string', default: '3' },
    cases: { type: 'string', default: 'fleet,s3' },
    dir: { type: 'string', default: join(root, 'bench/out-fleet') },
    record: { type: 'boolean', default: false },
  },
});

const dir = args.dir;
const count = Number(args.count);
const rounds = Number(args.rounds);
const cases = new Set(args.cases.split(','));
mkdirSync(dir, { recursive: true });

function sh(command: string, env: NodeJS.ProcessEnv = process.env): void {
  const r = spawnSync('bash', ['-c', command], { stdio: ['ignore', 'ignore', 'inherit'], env });
  if (r.status !== 0) throw new Error(`failed (${r.status}): ${command}`);
}

async function timed(run: () => Promise<void> | void): Promise<number> {
  sh('sync');
  const start = performance.now();
  await run();
  return (performance.now() - start) / 1000;
}

const reported: string[] = [];
function report(line: string): void {
  console.log(line);
  reported.push(line);
}

async function benchFleet(): Promise<void> {
  const size = parseSize(args.size);
  const images = Array.from({ length: count }, (_, i) => join(dir, `f${i}.raw`));
  images.forEach((path, i) => generateImage(path, 'mixed', size, 59 + i));
  const redis = await startRedis();
  const { openQueue, enqueue } = await import('../src/fleet/index.js');
  const queue = openQueue(redis.url, 'bench');
  const worker: ChildProcess = spawn(process.execPath, [cli, 'worker', '--connection', redis.url, '--queue', 'bench', '--concurrency', args.concurrency], {
    stdio: 'ignore',
  });
  const clean = () => sh(`rm -f ${dir}/f*.qcow2 ${dir}/f*.data`);
  const ratios: number[] = [];
  try {
    const runSequential = () =>
      timed(() => {
        for (const path of images) sh(`node ${cli} convert ${path} ${path.replace(/\.raw$/, '.qcow2')} --no-sync -q`);
      });
    const runFleet = (round: number) =>
      timed(async () => {
        const ids = await Promise.all(
          images.map(async (path, i) => (await enqueue(queue, ['convert', path, path.replace(/\.raw$/, '.qcow2'), '--no-sync'], { id: `r${round}-f${i}` })).id),
        );
        for (;;) {
          const states = await Promise.all(ids.map(async (id) => (await queue.getJob(id))?.getState()));
          if (states.some((s) => s === 'failed')) throw new Error('a bench job failed');
          if (states.every((s) => s === 'completed')) break;
          await new Promise((r) => setTimeout(r, 50));
        }
      });
    for (let round = 0; round < rounds; round++) {
      // The order alternates every round; each run starts from no outputs (timed() syncs first).
      let sequential = 0;
      let fleet = 0;
      if (round % 2 === 0) {
        clean();
        sequential = await runSequential();
        clean();
        fleet = await runFleet(round);
      } else {
        clean();
        fleet = await runFleet(round);
        clean();
        sequential = await runSequential();
      }
      // The stored data-file name is relative to the image's directory, which qemu 7.2 resolves from its working directory.
      for (const path of images) sh(`cd ${dir} && qemu-img compare -q -f raw -F qcow2 ${path} ${path.replace(/\.raw$/, '.qcow2')}`, { ...process.env });
      ratios.push(sequential / fleet);
      report(`fleet round ${round + 1}: sequential CLI ${sequential.toFixed(2)} s, fleet (--concurrency ${args.concurrency}) ${fleet.toFixed(2)} s, speed ratio ${(sequential / fleet).toFixed(2)}`);
    }
    report(`fleet: ${count} × ${args.size}, median speed ratio fleet/sequential ${median(ratios).toFixed(2)} (target ≥ 0.90)`);
  } finally {
    worker.kill('SIGTERM');
    await queue.close();
    await redis.stop();
    clean();
    for (const path of images) rmSync(path, { force: true });
  }
}

async function benchS3(): Promise<void> {
  const size = parseSize(args['s3-size']);
  const image = join(dir, 's3.raw');
  generateImage(image, 'mixed', size);
  const s3 = await startS3(['bench']);
  const env = { ...process.env, ...s3.env };
  const { S3Client, DeleteObjectsCommand, ListObjectsV2Command } = await import('@aws-sdk/client-s3');
  const { Upload } = await import('@aws-sdk/lib-storage');
  const client = new S3Client({ forcePathStyle: true });
  const empty = async () => {
    const listed = await client.send(new ListObjectsV2Command({ Bucket: 'bench' }));
    const keys = (listed.Contents ?? []).map((o) => ({ Key: o.Key! }));
    if (keys.length) await client.send(new DeleteObjectsCommand({ Bucket: 'bench', Delete: { Objects: keys } }));
  };
  const ratios: number[] = [];
  try {
    for (let round = 0; round < rounds; round++) {
      const runUpload = () =>
        timed(async () => {
          // The same part size and parallelism our upload picks for this size.
          const { partSizeFor } = await import('../src/io/s3.js');
          const partSize = partSizeFor(size);
          await new Upload({ client, params: { Bucket: 'bench', Key: 'raw', Body: createReadStream(image, { highWaterMark: 2 * 1024 * 1024 }) }, partSize, queueSize: Math.max(1, Math.min(4, Math.floor((64 << 20) / partSize))) }).done();
        });
      const runOurs = () => timed(() => sh(`node ${cli} convert ${image} s3://bench/disk.qcow2 -q`, env));
      // The order alternates every round; each run starts from an empty bucket.
      let upload = 0;
      let ours = 0;
      await empty();
      if (round % 2 === 0) upload = await runUpload();
      else ours = await runOurs();
      await empty();
      if (round % 2 === 0) ours = await runOurs();
      else upload = await runUpload();
      ratios.push(upload / ours);
      report(`s3 round ${round + 1}: lib-storage Upload of the raw file ${upload.toFixed(2)} s, convert to s3:// ${ours.toFixed(2)} s, throughput ratio ${(upload / ours).toFixed(2)}`);
    }
    report(`s3: ${args['s3-size']}, median throughput ratio convert/Upload ${median(ratios).toFixed(2)} (target ≥ 0.80)`);
  } finally {
    client.destroy();
    await s3.stop();
    rmSync(image, { force: true });
  }
}

if (cases.has('fleet')) await benchFleet();
if (cases.has('s3')) await benchS3();
if (args.record) {
  const doc = [
    '# Fleet and object-storage benchmark results',
    '',
    `Recorded ${new Date().toISOString()} with \`npm run bench:fleet -- ${process.argv.slice(2).join(' ')}\`.`,
    '',
    `Machine: ${machineLine()}; Redis from \`redis-server\` on 127.0.0.1; s3rver on local disk (so the s3 figures describe this disk more than a real store).`,
    'Each timed run syncs first (untimed) and starts from no outputs; fleet rounds alternate which side runs first. Targets (issue 19): fleet ≥ 0.90× the sequential CLI runs\' speed; convert to s3:// ≥ 0.80× the throughput of lib-storage\'s Upload of the raw file.',
    '',
    '```',
    ...reported,
    '```',
    '',
  ].join('\n');
  writeFileSync(join(root, 'bench/RESULTS-fleet.md'), doc);
  process.stderr.write('wrote bench/RESULTS-fleet.md\n');
}
