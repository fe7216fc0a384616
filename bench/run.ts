/**
 * Benchmark runner: our commands side by side with qemu-img, cp and dd, interleaved in rounds
 * on the same input, reported as ratios measured within each round (the machine is shared and
 * write timings are bimodal, so absolute times drift; ratios within a round do not).
 *
 *   npm run bench                          # the default cases on all three images, 5 rounds
 *   npm run bench -- --size 512M --rounds 3 --cases convert
 *   npm run bench -- --record              # also writes bench/RESULTS.md
 *
 * Needs a build (`npm run build`, done by `npm ci`) and qemu-img on the PATH.
 */

import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { cli, machineLine, median, parseSize, root } from './common.js';
import { generateImage, type ImageKind, type ImageStats } from './images.js';


const { values: args } = parseArgs({
  options: {
    size: { type: 'string', default: '2G' },
    'sparse-size': { type: 'string', default: '64G' },
    rounds: { type: 'string', default: '5' },
    cases: { type: 'string', default: '' },
    dir: { type: 'string', default: join(root, 'bench/out') },
    record: { type: 'boolean', default: false },
  },
});

interface Case {
  name: string;
  /** The image this case reads. */
  image: ImageKind;
  /** Which peer case its ratio is against (same round). */
  peer?: string;
  /** Outputs to delete before each run. */
  outputs: string[];
  /** A shell command line (bash). */
  command: string;
  /** Runs once before the rounds (e.g. makes the qcow2 that export reads). */
  setup?: string;
  /** The output whose size is reported (and compared with the peer's: compressed images). */
  sized?: string;
}

const dir = args.dir;
const sizes: Record<ImageKind, number> = { mixed: parseSize(args.size), sparse: parseSize(args['sparse-size']), dedup: parseSize(args.size) };
const img = (kind: ImageKind) => join(dir, `${kind}.raw`);
const out = (name: string) => join(dir, `out-${name}`);
const ours = `node ${cli}`;
// Our commands run with --no-sync because qemu-img convert does not flush either (its default
// cache mode for the target skips the flush); both then measure the same page-cache work.

/** Cases that push the whole virtual size through a pipe: for the sparse image that is 64 GiB of zeros, which measures the pipe. */
const PIPE_CASES = /convert-stdin|export-stdout|cat-pipe|api-/;

/**
 * Sparse-image cases left out unless named with --cases: they read or write all 64 GiB (dd
 * reads the holes, ~45 s; both exports read every byte of the raw data file, 20–30 s), which
 * alone would take the default run past 10 minutes. The sparse image is there for raw → qcow2.
 */
const SLOW_ON_SPARSE = /\/(dd-read|qemu-export|export-file)$/;

/** Cases run on the mixed image only (the compressed ones would take minutes on the others). */
const MIXED_ONLY = /\/(qemu-convert-qcow2|convert-internal-stdout|cat-pipe-image|qemu-convert-compress|convert-compress|convert-compress-stdout)$/;
/** The cases that read a VMDK or VHD made from the image (issue 16). */
const FOREIGN_CASES = /-(vmdk|vhd)-/;

/** The dedup-heavy image is there for dedup: only its internal conversions (and cp, the × cp reference) run. */
const DEDUP_IMAGE_CASES = /\/(cp-sparse|convert-internal|convert-internal-dedup)$/;

/**
 * The environment of the timed commands. NODE_EXTRA_CA_CERTS (set on some machines) makes every
 * Node process parse a CA bundle at startup, ~60 ms of CPU that no conversion needs and that
 * qemu-img does not pay: it is left out so the comparison is of the tools, not of that setting.
 */
const timedEnv = Object.fromEntries(Object.entries(process.env).filter(([name]) => name !== 'NODE_EXTRA_CA_CERTS'));

function casesFor(kind: ImageKind): Case[] {
  const raw = img(kind);
  const k = kind;
  const all: Case[] = [
    { name: `${k}/dd-read`, image: kind, outputs: [], command: `dd if=${raw} of=/dev/null bs=1M status=none` },
    { name: `${k}/cp-sparse`, image: kind, outputs: [out(`${k}-cp.raw`)], command: `cp --sparse=always ${raw} ${out(`${k}-cp.raw`)}` },
    {
      name: `${k}/qemu-convert-raw-on`,
      image: kind,
      outputs: [out(`${k}-q.qcow2`), out(`${k}-q.data`)],
      command: `qemu-img convert -f raw -O qcow2 -o data_file=${out(`${k}-q.data`)},data_file_raw=on ${raw} ${out(`${k}-q.qcow2`)}`,
    },
    {
      name: `${k}/convert-raw-on`,
      image: kind,
      peer: `${k}/qemu-convert-raw-on`,
      outputs: [out(`${k}-o.qcow2`), out(`${k}-o.data`)],
      command: `${ours} convert --quiet --no-sync ${raw} ${out(`${k}-o.qcow2`)} --data-file ${out(`${k}-o.data`)} --force`,
    },
    {
      name: `${k}/qemu-convert-raw-off`,
      image: kind,
      outputs: [out(`${k}-qs.qcow2`), out(`${k}-qs.data`)],
      command: `qemu-img convert -f raw -O qcow2 -o data_file=${out(`${k}-qs.data`)} ${raw} ${out(`${k}-qs.qcow2`)}`,
    },
    {
      name: `${k}/convert-raw-off`,
      image: kind,
      peer: `${k}/qemu-convert-raw-off`,
      outputs: [out(`${k}-os.qcow2`), out(`${k}-os.data`)],
      command: `${ours} convert --quiet --no-sync --no-data-file-raw ${raw} ${out(`${k}-os.qcow2`)} --data-file ${out(`${k}-os.data`)} --force`,
    },
    // Pipe-in cases against a plain pipe copy into a file: `cat IN | cat > OUT`.
    { name: `${k}/cat-pipe-file`, image: kind, outputs: [out(`${k}-cat.raw`)], command: `cat ${raw} | cat > ${out(`${k}-cat.raw`)}` },
    {
      name: `${k}/convert-stdin-files`,
      image: kind,
      peer: `${k}/cat-pipe-file`,
      outputs: [out(`${k}-pf.qcow2`), out(`${k}-pf.data`)],
      command: `cat ${raw} | ${ours} convert --quiet --no-sync - ${out(`${k}-pf.qcow2`)} --size ${sizes[kind]} --data-file ${out(`${k}-pf.data`)} --force`,
    },
    {
      name: `${k}/convert-stdin-stdout`,
      image: kind,
      peer: `${k}/cat-pipe-file`,
      outputs: [out(`${k}-p.qcow2`), out(`${k}-p.data`)],
      command: `cat ${raw} | ${ours} convert --quiet --no-sync - - --size ${sizes[kind]} --data-file ${out(`${k}-p.data`)} --force > ${out(`${k}-p.qcow2`)}`,
    },
    // The library: convert() on the file, and a pipeline a user composes (bench/api.mjs), against it.
    {
      name: `${k}/api-convert`,
      image: kind,
      outputs: [out(`${k}-ac.qcow2`), out(`${k}-ac.data`)],
      command: `node ${join(root, 'bench/api.mjs')} convert ${raw} ${out(`${k}-ac.qcow2`)} ${out(`${k}-ac.data`)}`,
    },
    {
      name: `${k}/api-composed`,
      image: kind,
      peer: `${k}/api-convert`,
      outputs: [out(`${k}-ap.qcow2`), out(`${k}-ap.data`)],
      command: `node ${join(root, 'bench/api.mjs')} composed ${raw} ${out(`${k}-ap.qcow2`)} ${out(`${k}-ap.data`)}`,
    },
    {
      name: `${k}/convert-internal`,
      image: kind,
      outputs: [out(`${k}-i.qcow2`)],
      command: `${ours} convert --quiet --no-sync --internal ${raw} ${out(`${k}-i.qcow2`)}`,
    },
    {
      // Dedup's cost is measured against our own plain internal convert (the budget: ≤ 15%).
      name: `${k}/convert-internal-dedup`,
      image: kind,
      peer: `${k}/convert-internal`,
      outputs: [out(`${k}-d.qcow2`)],
      command: `${ours} convert --quiet --no-sync --internal --dedup ${raw} ${out(`${k}-d.qcow2`)}`,
    },
    {
      name: `${k}/qemu-convert-qcow2`,
      image: kind,
      outputs: [out(`${k}-qi.qcow2`)],
      command: `qemu-img convert -f raw -O qcow2 ${raw} ${out(`${k}-qi.qcow2`)}`,
    },
    {
      // A single-file image to a pipe (plan, then emit) against qemu-img writing a file: the
      // issue's target is ≥ 1.0× (qcow2-to-stdout.py, the one peer that writes to a pipe, was ~0.7×).
      name: `${k}/convert-internal-stdout`,
      image: kind,
      peer: `${k}/qemu-convert-qcow2`,
      outputs: [out(`${k}-ip.qcow2`)],
      command: `${ours} convert --quiet --no-sync --internal ${raw} - | cat > ${out(`${k}-ip.qcow2`)}`,
    },
    {
      // The pipe's own ceiling for that case: an image of the same size through `cat | cat > file`.
      name: `${k}/cat-pipe-image`,
      image: kind,
      outputs: [out(`${k}-cpi.qcow2`)],
      setup: `qemu-img convert -f raw -O qcow2 ${raw} ${out(`${k}-src-i.qcow2`)}`,
      command: `cat ${out(`${k}-src-i.qcow2`)} | cat > ${out(`${k}-cpi.qcow2`)}`,
    },
    {
      name: `${k}/qemu-convert-compress`,
      image: kind,
      outputs: [out(`${k}-qc.qcow2`)],
      sized: out(`${k}-qc.qcow2`),
      command: `qemu-img convert -c -f raw -O qcow2 ${raw} ${out(`${k}-qc.qcow2`)}`,
    },
    {
      // Compression on every core against qemu-img -c (target ≥ 2.0× on 2 cores, output ≤ 2% larger, RSS ≤ 150 MiB).
      name: `${k}/convert-compress`,
      image: kind,
      peer: `${k}/qemu-convert-compress`,
      outputs: [out(`${k}-c.qcow2`)],
      sized: out(`${k}-c.qcow2`),
      command: `${ours} convert --quiet --no-sync --internal --compress ${raw} ${out(`${k}-c.qcow2`)}`,
    },
    {
      // Into a pipe the input is compressed twice (once to plan the layout): this is its cost.
      name: `${k}/convert-compress-stdout`,
      image: kind,
      peer: `${k}/qemu-convert-compress`,
      outputs: [out(`${k}-cp.qcow2`)],
      sized: out(`${k}-cp.qcow2`),
      command: `${ours} convert --quiet --no-sync --internal --compress ${raw} - | cat > ${out(`${k}-cp.qcow2`)}`,
    },
    {
      name: `${k}/qemu-export`,
      image: kind,
      outputs: [out(`${k}-qe.raw`)],
      setup: `qemu-img convert -f raw -O qcow2 -o data_file=${out(`${k}-src.data`)},data_file_raw=on ${raw} ${out(`${k}-src.qcow2`)}`,
      command: `cd ${dir} && qemu-img convert -f qcow2 -O raw ${out(`${k}-src.qcow2`)} ${out(`${k}-qe.raw`)}`,
    },
    {
      name: `${k}/export-file`,
      image: kind,
      peer: `${k}/qemu-export`,
      outputs: [out(`${k}-e.raw`)],
      command: `${ours} export --quiet --no-sync ${out(`${k}-src.qcow2`)} ${out(`${k}-e.raw`)}`,
    },
    // Export to a pipe against a plain pipe read of the same bytes: `cat IN | cat > /dev/null`.
    { name: `${k}/cat-pipe-null`, image: kind, outputs: [], command: `cat ${raw} | cat > /dev/null` },
    {
      name: `${k}/export-stdout`,
      image: kind,
      peer: `${k}/cat-pipe-null`,
      outputs: [],
      command: `${ours} export --quiet --no-sync ${out(`${k}-src.qcow2`)} - | cat > /dev/null`,
    },
    // Foreign inputs → qcow2 + data file (issue 16): the same image file for both tools.
    {
      name: `${k}/qemu-convert-vmdk-stream`,
      image: kind,
      outputs: [out(`${k}-qv.qcow2`), out(`${k}-qv.data`)],
      setup: `qemu-img convert -f raw -O vmdk -o subformat=streamOptimized ${raw} ${out(`${k}-src.vmdk`)}`,
      command: `qemu-img convert -f vmdk -O qcow2 -o data_file=${out(`${k}-qv.data`)},data_file_raw=on ${out(`${k}-src.vmdk`)} ${out(`${k}-qv.qcow2`)}`,
    },
    {
      name: `${k}/convert-vmdk-stream`,
      image: kind,
      peer: `${k}/qemu-convert-vmdk-stream`,
      outputs: [out(`${k}-ov.qcow2`), out(`${k}-ov.data`)],
      command: `${ours} convert --quiet --no-sync ${out(`${k}-src.vmdk`)} ${out(`${k}-ov.qcow2`)} --data-file ${out(`${k}-ov.data`)} --force`,
    },
    {
      name: `${k}/convert-vmdk-stream-stdin`,
      image: kind,
      peer: `${k}/qemu-convert-vmdk-stream`,
      outputs: [out(`${k}-pv.qcow2`), out(`${k}-pv.data`)],
      command: `cat ${out(`${k}-src.vmdk`)} | ${ours} convert --quiet --no-sync - ${out(`${k}-pv.qcow2`)} --data-file ${out(`${k}-pv.data`)} --force`,
    },
    {
      name: `${k}/qemu-convert-vhd-dynamic`,
      image: kind,
      outputs: [out(`${k}-qh.qcow2`), out(`${k}-qh.data`)],
      setup: `qemu-img convert -f raw -O vpc -o subformat=dynamic ${raw} ${out(`${k}-src.vhd`)}`,
      command: `qemu-img convert -f vpc -O qcow2 -o data_file=${out(`${k}-qh.data`)},data_file_raw=on ${out(`${k}-src.vhd`)} ${out(`${k}-qh.qcow2`)}`,
    },
    {
      name: `${k}/convert-vhd-dynamic`,
      image: kind,
      peer: `${k}/qemu-convert-vhd-dynamic`,
      outputs: [out(`${k}-oh.qcow2`), out(`${k}-oh.data`)],
      command: `${ours} convert --quiet --no-sync ${out(`${k}-src.vhd`)} ${out(`${k}-oh.qcow2`)} --data-file ${out(`${k}-oh.data`)} --force`,
    },
  ];
  // Single-file and compressed images are measured on the mixed image, and so are the
  // foreign-format cases (a 64 GiB VMDK or VHD would mostly measure qemu-img making it).
  if (kind === 'sparse') return all.filter((c) => !MIXED_ONLY.test(c.name) && !PIPE_CASES.test(c.name) && !FOREIGN_CASES.test(c.name));
  if (kind === 'dedup') return all.filter((c) => DEDUP_IMAGE_CASES.test(c.name));
  if (kind !== 'mixed') return all.filter((c) => !MIXED_ONLY.test(c.name) && !FOREIGN_CASES.test(c.name));
  return all;
}

interface Sample {
  seconds: number;
  rssKiB: number;
  ok: boolean;
  /** Bytes of the case's `sized` output. */
  bytes?: number;
}

function timed(command: string): Sample {
  const rssFile = join(dir, '.rss');
  const start = process.hrtime.bigint();
  const result = spawnSync('/usr/bin/time', ['-f', '%M', '-o', rssFile, 'bash', '-c', `set -o pipefail; ${command}`], { stdio: ['ignore', 'ignore', 'pipe'], env: timedEnv });
  const seconds = Number(process.hrtime.bigint() - start) / 1e9;
  const rssKiB = existsSync(rssFile) ? Number(readFileSync(rssFile, 'utf8').trim().split('\n').pop()) : NaN;
  if (result.status !== 0) process.stderr.write(`FAILED (${result.status}): ${command}\n${result.stderr}\n`);
  return { seconds, rssKiB, ok: result.status === 0 };
}

function sh(command: string): void {
  const r = spawnSync('bash', ['-c', command], { stdio: 'inherit' });
  if (r.status !== 0) throw new Error(`failed: ${command}`);
}

function main(): void {
  if (!existsSync(cli)) sh(`cd ${root} && npm run build --silent`);
  mkdirSync(dir, { recursive: true });
  const filter = args.cases ? new RegExp(args.cases) : undefined;
  const wanted = (['mixed', 'sparse', 'dedup'] as ImageKind[])
    .flatMap(casesFor)
    .filter((c) => (filter ? filter.test(c.name) : c.image !== 'sparse' || !SLOW_ON_SPARSE.test(c.name)));
  // Peers are always run with the cases that are measured against them.
  const names = new Set(wanted.map((c) => c.name));
  for (const c of wanted) if (c.peer) names.add(c.peer);
  const cases = (['mixed', 'sparse', 'dedup'] as ImageKind[]).flatMap(casesFor).filter((c) => names.has(c.name));
  const kinds = [...new Set(cases.map((c) => c.image))];
  const stats = new Map<ImageKind, ImageStats>();
  for (const kind of kinds) {
    const path = img(kind);
    if (!existsSync(path) || statSync(path).size !== sizes[kind]) {
      process.stderr.write(`generating ${path} (${sizes[kind]} bytes)…\n`);
      stats.set(kind, generateImage(path, kind, sizes[kind]));
    }
  }
  for (const c of cases) if (c.setup) sh(c.setup);

  const rounds = Number(args.rounds);
  const samples = new Map<string, Sample[]>(cases.map((c) => [c.name, []]));
  for (let round = 0; round < rounds; round++) {
    // Alternate the order each round to cancel order effects.
    const order = round % 2 === 0 ? cases : [...cases].reverse();
    for (const c of order) {
      for (const o of c.outputs) rmSync(o, { force: true });
      spawnSync('sync');
      spawnSync('sleep', ['0.3']);
      const sample = timed(c.command);
      if (c.sized && existsSync(c.sized)) sample.bytes = statSync(c.sized).size;
      samples.get(c.name)!.push(sample);
    }
    process.stderr.write(`round ${round + 1}/${rounds} done\n`);
  }

  const rows = cases.map((c) => {
    const s = samples.get(c.name)!;
    const times = s.map((x) => x.seconds);
    const peerSamples = c.peer ? samples.get(c.peer) : undefined;
    const perRound = peerSamples ? s.map((x, i) => peerSamples[i]!.seconds / x.seconds) : undefined;
    const ratio = perRound ? median(perRound) : undefined;
    const cpSamples = samples.get(`${c.image}/cp-sparse`);
    const vsCp = cpSamples ? median(s.map((x, i) => cpSamples[i]!.seconds / x.seconds)) : undefined;
    return {
      name: c.name,
      median: median(times),
      min: Math.min(...times),
      mbps: sizes[c.image] / 1e6 / median(times),
      ratio,
      perRound,
      peer: c.peer,
      vsCp,
      rssMiB: Math.max(...s.map((x) => x.rssKiB)) / 1024,
      // Output size over the peer's (compressed images: ≤ 1.02 is the target).
      sizeRatio: s[0]?.bytes !== undefined && peerSamples?.[0]?.bytes ? s[0].bytes / peerSamples[0].bytes : undefined,
      failures: s.filter((x) => !x.ok).length,
      command: c.command,
    };
  });

  const header = '| case | median s | min s | MB/s (virtual) | peer | × peer (median) | × peer per round | × cp | peak RSS MiB | size × peer |';
  const lines = [header, '| --- | ---: | ---: | ---: | --- | ---: | --- | ---: | ---: | ---: |'];
  for (const r of rows) {
    lines.push(
      `| ${r.name}${r.failures ? ` (${r.failures} FAILED)` : ''} | ${r.median.toFixed(3)} | ${r.min.toFixed(3)} | ${r.mbps.toFixed(0)} | ${r.peer?.split('/')[1] ?? ''} | ${r.ratio === undefined ? '' : r.ratio.toFixed(2)} | ${r.perRound?.map((x) => x.toFixed(2)).join(' ') ?? ''} | ${r.vsCp === undefined ? '' : r.vsCp.toFixed(2)} | ${r.rssMiB.toFixed(0)} | ${r.sizeRatio === undefined ? '' : r.sizeRatio.toFixed(3)} |`,
    );
  }
  const table = lines.join('\n');
  process.stdout.write(`${table}\n`);

  if (args.record) {
    const qemuVersion = spawnSync('qemu-img', ['--version'], { encoding: 'utf8' }).stdout.split('\n')[0];
    const doc = [
      '# Benchmark results',
      '',
      `Recorded ${new Date().toISOString()} with \`npm run bench -- ${process.argv.slice(2).join(' ')}\`.`,
      '',
      `Machine: ${machineLine()}; ${qemuVersion}.`,
      `Images: mixed ${sizes.mixed} B, sparse ${sizes.sparse} B, dedup ${sizes.dedup} B (bench/images.ts); ${rounds} interleaved rounds, order alternating.`,
      '',
      '"× peer" is the peer\'s time divided by ours in the same round (a throughput ratio: above 1.00 we are faster), listed per round and as the median over rounds. Peers: qemu-img for file conversions and exports to a file; `cat IN | cat > OUT` for the pipe-in cases; `cat IN | cat > /dev/null` for export to a pipe; `convert()` for the pipeline a user composes from the public stages (bench/api.mjs); plain `--internal` for `--internal --dedup`. Before each timed run its outputs are deleted and `sync` runs (untimed); the order of the cases alternates every round.',
      '',
      table,
      '',
      '## What these numbers do not measure',
      '',
      '- Nothing is flushed to disk: our commands run with `--no-sync` and qemu-img convert does not flush by default, so every command leaves its writes in the page cache. Durable throughput is bounded by the disk (our default, without `--no-sync`, fsyncs every output).',
      '- The timed commands run without NODE_EXTRA_CA_CERTS: where it is set, every Node process parses a CA bundle at startup (~60 ms of CPU), which no conversion needs.',
      '- The sparse image skips the cases that push its whole virtual size through a pipe (64 GiB of zeros measure the pipe, not the converter), and by default dd and the exports, which read all 64 GiB (select them with `--cases`). The dedup-heavy image runs only cp and the internal conversions, with and without dedup.',
      '- Inputs are warm in the page cache; cold reads from a slow disk would shift every ratio towards 1.',
      '- Write timings on these VMs are bimodal (see shared/reference/packages-and-io.md §6.4); compare within a round, not across runs.',
      '- Peak RSS is measured with GNU time over the whole shell command (for pipelines, the largest process).',
      '',
      '## Commands',
      '',
      ...rows.map((r) => `- ${r.name}: \`${r.command}\``),
      '',
    ].join('\n');
    writeFileSync(join(root, 'bench/RESULTS.md'), doc);
    process.stderr.write('wrote bench/RESULTS.md\n');
  }
  for (const [kind, s] of stats) process.stderr.write(`${kind}: ${JSON.stringify(s)}\n`);
}

main();
