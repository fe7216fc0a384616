/**
 * NBD benchmark: our NBD source against nbdcopy, and an incremental (1% of clusters dirty)
 * against a full conversion, interleaved in rounds on the same exports and reported as ratios
 * within each round (the method of bench/run.ts: the machine is shared, ratios hold).
 *
 *   node --import tsx bench/nbd.ts                       # 2 GiB mixed image, 5 rounds
 *   node --import tsx bench/nbd.ts --size 64M --rounds 1 # a smoke run
 *   node --import tsx bench/nbd.ts --record              # also writes bench/RESULTS-nbd.md
 *
 * Needs a build (`npm run build`), qemu-img, qemu-io and qemu-nbd (qemu-utils). The nbdcopy
 * cases need libnbd-bin (`apt-get install -y libnbd-bin`) and are skipped with a message
 * without it. Cases:
 *
 * - nbd/convert-raw-on: `convert NBD-URI out.qcow2` (data file, raw bit) from a raw export;
 *   peers nbd/nbdcopy-raw (nbdcopy into a raw file) and nbd/nbdcopy-qemu-nbd-qcow2 (nbdcopy
 *   into a pre-created qcow2 + raw data file served by qemu-nbd, the only way nbdcopy writes
 *   qcow2). Targets: ≥ 1.0× the first, ≥ 2× the second.
 * - nbd/incremental-1pct: `convert --bitmap b0 --base full.qcow2` from a qcow2 export with 1% of
 *   its clusters dirty; peer nbd/full-qcow2 (a full conversion of the same export). Target: the
 *   incremental takes ≤ 5% of the full time (× peer ≥ 20).
 */

import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { cli, machineLine, median, parseSize, root } from './common.js';
import { generateImage } from './images.js';

const ours = `node ${cli}`;

const { values: args } = parseArgs({
  options: {
    size: { type: 'string', default: '2G' },
    rounds: { type: 'string', default: '5' },
    dir: { type: 'string', default: join(root, 'bench/out/nbd') },
    record: { type: 'boolean', default: false },
  },
});

const onPath = (name: string) => spawnSync('sh', ['-c', `command -v ${name}`], { stdio: 'ignore' }).status === 0;
function sh(command: string): void {
  const r = spawnSync('bash', ['-c', command], { stdio: 'inherit' });
  if (r.status !== 0) throw new Error(`failed: ${command}`);
}

const dir = args.dir;
const size = parseSize(args.size);
const out = (name: string) => join(dir, `out-${name}`);
const servers: ChildProcess[] = [];

/** qemu-nbd serving `image` read-only on a Unix socket until the bench ends; returns the URI. */
async function serve(image: string, format: string, name: string, extra: string[] = []): Promise<string> {
  const socket = join(dir, `${name}.sock`);
  rmSync(socket, { force: true });
  const child = spawn('qemu-nbd', ['-r', '-t', '-e', '4', '-f', format, '--cache=writeback', ...extra, '-k', socket, image], { stdio: 'ignore' });
  servers.push(child);
  for (let i = 0; !existsSync(socket); i++) {
    if (i > 500) throw new Error(`qemu-nbd did not start for ${image}`);
    await new Promise((r) => setTimeout(r, 10));
  }
  return `nbd+unix:///?socket=${socket}`;
}

interface Case {
  name: string;
  peer?: string | undefined;
  outputs: string[];
  command: string;
}

interface Sample {
  seconds: number;
  ok: boolean;
}

function timed(command: string): Sample {
  const start = process.hrtime.bigint();
  const result = spawnSync('bash', ['-c', `set -o pipefail; ${command}`], { stdio: ['ignore', 'ignore', 'pipe'] });
  const seconds = Number(process.hrtime.bigint() - start) / 1e9;
  if (result.status !== 0) process.stderr.write(`FAILED (${result.status}): ${command}\n${result.stderr}\n`);
  return { seconds, ok: result.status === 0 };
}

async function main(): Promise<void> {
  if (!existsSync(cli)) sh(`cd ${root} && npm run build --silent`);
  for (const tool of ['qemu-img', 'qemu-io', 'qemu-nbd']) if (!onPath(tool)) throw new Error(`${tool} is needed (apt-get install -y qemu-utils)`);
  const hasNbdcopy = onPath('nbdcopy');
  if (!hasNbdcopy) process.stderr.write('nbdcopy not installed (apt-get install -y libnbd-bin): skipping the nbdcopy cases\n');
  mkdirSync(dir, { recursive: true });
  const raw = join(dir, 'mixed.raw');
  if (!existsSync(raw) || statSync(raw).size !== size) {
    process.stderr.write(`generating ${raw} (${size} bytes)…\n`);
    generateImage(raw, 'mixed', size);
  }

  // The incremental's disk: the image as qcow2, a full backup, then a bitmap and 1% of the
  // clusters rewritten (every 100th 64 KiB cluster).
  const vm = join(dir, 'vm.qcow2');
  rmSync(vm, { force: true });
  sh(`qemu-img convert -q -f raw -O qcow2 ${raw} ${vm}`);
  const fullUri = await serve(vm, 'qcow2', 'vm-full');
  for (const f of ['base.qcow2', 'base.data']) rmSync(join(dir, f), { force: true });
  sh(`${ours} convert --quiet --no-sync ${fullUri} ${join(dir, 'base.qcow2')} --data-file ${join(dir, 'base.data')}`);
  servers.pop()!.kill();
  await new Promise((r) => setTimeout(r, 200));
  sh(`qemu-img bitmap --add ${vm} b0`);
  const clusters = Math.floor(size / 65536);
  const script = Array.from({ length: Math.ceil(clusters / 100) }, (_, i) => `write -P ${(i % 250) + 1} ${i * 100 * 65536} 64k`).join('\n');
  writeFileSync(join(dir, 'dirty.qemu-io'), `${script}\n`);
  sh(`qemu-io -f qcow2 ${vm} < ${join(dir, 'dirty.qemu-io')} > /dev/null`);

  const rawUri = await serve(raw, 'raw', 'raw');
  const vmUri = await serve(vm, 'qcow2', 'vm', ['-B', 'b0']);
  const cases: Case[] = [
    {
      name: 'nbd/convert-raw-on',
      peer: hasNbdcopy ? 'nbd/nbdcopy-raw' : undefined,
      outputs: [out('o.qcow2'), out('o.data')],
      command: `${ours} convert --quiet --no-sync ${rawUri} ${out('o.qcow2')} --data-file ${out('o.data')} --force`,
    },
    {
      name: 'nbd/convert-raw-on-vs-qemu-nbd',
      peer: hasNbdcopy ? 'nbd/nbdcopy-qemu-nbd-qcow2' : undefined,
      outputs: [out('o2.qcow2'), out('o2.data')],
      command: `${ours} convert --quiet --no-sync ${rawUri} ${out('o2.qcow2')} --data-file ${out('o2.data')} --force`,
    },
    ...(hasNbdcopy
      ? [
          { name: 'nbd/nbdcopy-raw', outputs: [out('n.raw')], command: `nbdcopy --destination-is-zero ${rawUri} ${out('n.raw')}` },
          {
            name: 'nbd/nbdcopy-qemu-nbd-qcow2',
            outputs: [out('nq.qcow2'), out('nq.data')],
            command:
              `qemu-img create -q -f qcow2 -o data_file=${out('nq.data')},data_file_raw=on ${out('nq.qcow2')} ${size} && ` +
              `nbdcopy --destination-is-zero -- ${rawUri} [ qemu-nbd -f qcow2 --cache=unsafe ${out('nq.qcow2')} ]`,
          },
        ]
      : []),
    {
      name: 'nbd/full-qcow2',
      outputs: [out('f.qcow2'), out('f.data')],
      command: `${ours} convert --quiet --no-sync ${vmUri} ${out('f.qcow2')} --data-file ${out('f.data')} --force`,
    },
    {
      name: 'nbd/incremental-1pct',
      peer: 'nbd/full-qcow2',
      outputs: [out('i.qcow2'), out('i.data')],
      command: `${ours} convert --quiet --no-sync ${vmUri} ${out('i.qcow2')} --data-file ${out('i.data')} --bitmap b0 --base ${join(dir, 'base.qcow2')} --force`,
    },
  ];

  const rounds = Number(args.rounds);
  const samples = new Map<string, Sample[]>(cases.map((c) => [c.name, []]));
  for (let round = 0; round < rounds; round++) {
    const order = round % 2 === 0 ? cases : [...cases].reverse();
    for (const c of order) {
      for (const o of c.outputs) rmSync(o, { force: true });
      spawnSync('sync');
      spawnSync('sleep', ['0.3']);
      samples.get(c.name)!.push(timed(c.command));
    }
    process.stderr.write(`round ${round + 1}/${rounds} done\n`);
  }
  // Every output our cases made is checked against its source once.
  const checks: Array<[string, string, string]> = [
    [raw, 'raw', out('o.qcow2')],
    [vm, 'qcow2', out('i.qcow2')],
  ];
  for (const [src, fmt, image] of checks) sh(`cd ${dir} && qemu-img compare -q -f ${fmt} -F qcow2 ${src} ${image}`);

  const lines = ['| case | median s | min s | MB/s (virtual) | × peer (median) | × peer per round |', '| --- | ---: | ---: | ---: | ---: | --- |'];
  for (const c of cases) {
    const s = samples.get(c.name)!;
    const peer = c.peer ? samples.get(c.peer) : undefined;
    const perRound = peer ? s.map((x, i) => peer[i]!.seconds / x.seconds) : undefined;
    const ratio = perRound ? median(perRound) : undefined;
    const failed = s.filter((x) => !x.ok).length;
    lines.push(`| ${c.name}${failed ? ` (${failed} FAILED)` : ''}${c.peer ? ` vs ${c.peer}` : ''} | ${median(s.map((x) => x.seconds)).toFixed(3)} | ${Math.min(...s.map((x) => x.seconds)).toFixed(3)} | ${(size / 1e6 / median(s.map((x) => x.seconds))).toFixed(0)} | ${ratio === undefined ? '' : ratio.toFixed(2)} | ${perRound?.map((x) => x.toFixed(2)).join(' ') ?? ''} |`);
  }
  const table = lines.join('\n');
  process.stdout.write(`${table}\n`);
  if (args.record) {
    const version = (cmd: string) => spawnSync(cmd, ['--version'], { encoding: 'utf8' }).stdout.split('\n')[0];
    const doc = [
      '# NBD benchmark results',
      '',
      `Recorded ${new Date().toISOString()} with \`node --import tsx bench/nbd.ts ${process.argv.slice(2).join(' ')}\`.`,
      '',
      `Machine: ${machineLine()}; ${version('qemu-nbd')}; ${hasNbdcopy ? version('nbdcopy') : 'nbdcopy not installed'}.`,
      `Image: mixed ${size} B (bench/images.ts) served read-only by qemu-nbd over a Unix socket; ${rounds} interleaved rounds, order alternating, outputs deleted and \`sync\` (untimed) before each run.`,
      '',
      '"× peer" is the peer\'s time divided by ours in the same round (above 1.00 we are faster). Targets (issue 18): convert-raw-on ≥ 1.0× nbdcopy into a raw file, ≥ 2× nbdcopy into a qemu-nbd qcow2 target; incremental-1pct ≥ 20× the full conversion (≤ 5% of its time).',
      '',
      table,
      '',
      '## Commands',
      '',
      ...cases.map((c) => `- ${c.name}: \`${c.command}\``),
      '',
    ].join('\n');
    writeFileSync(join(root, 'bench/RESULTS-nbd.md'), doc);
    process.stderr.write('wrote bench/RESULTS-nbd.md\n');
  }
}

main()
  .catch((err: unknown) => {
    process.stderr.write(`${String(err)}\n`);
    process.exitCode = 1;
  })
  .finally(() => {
    for (const s of servers) s.kill();
  });
