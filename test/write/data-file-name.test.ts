/**
 * Portable data-file names (issue 15, item 10). Natural API code — `dataFile: join(dir,
 * 'disk.data')` — used to store the absolute path, so the pair could not move: after moving both
 * files our own reader refused the image. The default stored name is now the data file's path
 * relative to the image's directory when it lies there or below (absolute otherwise, with a
 * warning from every writer: our readers refuse such a name). And what qemu 7.2 does with a
 * relative name, as the README states it: it resolves it against its working directory.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { convert, createConvertStream } from '../../src/write/convert.js';
import { wrap } from '../../src/write/wrap.js';
import { createExternalSink, writeExternal } from '../../src/write/external-sink.js';
import { toBatches, type Block } from '../../src/block.js';
import { openImage } from '../../src/read/image.js';
import { exportStream } from '../../src/read/export.js';
import { PathPolicyError } from '../../src/errors.js';
import { needQemu, qemuCompare, tempDir } from '../helpers/qemu.js';
import { randomBytesAt } from '../helpers/images.js';
import { decodeImage, qemuFacts } from './helpers.js';

const CS = 65536;
const RAW = randomBytesAt(21, 0, 3 * CS + 777);

function batches() {
  const blocks: Block[] = [];
  for (let i = 0; i * CS < RAW.length; i++) blocks.push({ index: i, data: RAW.subarray(i * CS, (i + 1) * CS) });
  return toBatches(blocks, { clusterSize: CS, size: RAW.length });
}

type Write = (input: string, output: string, dataFile: string, onWarning: (message: string) => void) => Promise<{ dataFileName: string | undefined; warnings: readonly string[] }>;

/** Every API writer that stores a data-file name, given the raw input, the output, the data file and onWarning. */
const WRITERS: Array<{ name: string; write: Write }> = [
  { name: 'convert', write: (input, output, dataFile, onWarning) => convert({ input, output, dataFile, onWarning, sync: false }) },
  {
    name: 'createConvertStream',
    write: async (_input, output, dataFile, onWarning) => {
      const stream = createConvertStream({ output, dataFile, onWarning, sync: false });
      await pipeline(Readable.from([RAW]), stream);
      return stream.finished;
    },
  },
  { name: 'writeExternal', write: (_input, output, dataFile, onWarning) => writeExternal(batches(), { output, dataFile, onWarning, sync: false }) },
  {
    name: 'createExternalSink',
    write: async (_input, output, dataFile, onWarning) => {
      const sink = createExternalSink({ output, dataFile, onWarning, sync: false });
      await pipeline(Readable.from(batches()), sink);
      return sink.finished;
    },
  },
  {
    // wrap's data file exists already: the input itself, copied there first.
    name: 'wrap',
    write: (_input, output, dataFile, onWarning) => {
      writeFileSync(dataFile, RAW);
      return wrap({ input: dataFile, output, onWarning, sync: false });
    },
  },
];

async function readAll(path: string): Promise<Buffer> {
  const image = await openImage(path);
  try {
    const chunks: Buffer[] = [];
    for await (const chunk of exportStream(image)) chunks.push(chunk as Buffer);
    return Buffer.concat(chunks);
  } finally {
    await image.close();
  }
}

for (const writer of WRITERS) {
  test(`${writer.name}: a data file in the image's directory (or below) is stored relative to it, and the pair moves`, async (t) => {
    if (!needQemu(t)) return;
    const dir = tempDir(t);
    const rawPath = join(dir, 'in.raw');
    writeFileSync(rawPath, RAW);
    for (const [sub, stored] of [
      ['disk.data', 'disk.data'],
      [join('data', 'disk.data'), 'data/disk.data'],
    ] as const) {
      const a = join(dir, `a-${stored.length}`);
      mkdirSync(join(a, 'data'), { recursive: true });
      const warnings: string[] = [];
      const summary = await writer.write(rawPath, join(a, 'disk.qcow2'), join(a, sub), (m) => warnings.push(m));
      assert.equal(summary.dataFileName, stored);
      assert.equal(decodeImage(readFileSync(join(a, 'disk.qcow2'))).header.dataFileName, stored);
      assert.deepEqual(summary.warnings, []);
      assert.deepEqual(warnings, []);

      // Both files move together: our reader still finds the data file, from any working directory.
      const b = join(dir, `b-${stored.length}`);
      mkdirSync(join(b, 'data'), { recursive: true });
      renameSync(join(a, 'disk.qcow2'), join(b, 'disk.qcow2'));
      renameSync(join(a, sub), join(b, sub));
      assert.ok((await readAll(join(b, 'disk.qcow2'))).subarray(0, RAW.length).equals(RAW), `${writer.name}: read after the move`);
      // qemu 7.2 resolves the relative name against its working directory: from the image's
      // directory it reads the moved pair.
      const fromImageDir = qemuCompare(rawPath, 'disk.qcow2', b);
      assert.equal(fromImageDir.code, 0, fromImageDir.stdout + fromImageDir.stderr);
    }
  });
}

test("qemu 7.2 resolves a relative data-file name against its working directory, not the image's (as the README says)", async (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  const rawPath = join(dir, 'in.raw');
  writeFileSync(rawPath, RAW);
  mkdirSync(join(dir, 'img'));
  mkdirSync(join(dir, 'elsewhere'));
  await convert({ input: rawPath, output: join(dir, 'img', 'disk.qcow2'), sync: false });
  assert.equal(qemuFacts(join(dir, 'img', 'disk.qcow2'), dir).dataFile, 'disk.data');
  // From another directory qemu looks for ./disk.data there: missing…
  const missing = qemuCompare(rawPath, join(dir, 'img', 'disk.qcow2'), join(dir, 'elsewhere'));
  assert.equal(missing.code, 2, missing.stdout);
  assert.match(missing.stderr, /Could not open 'disk\.data': No such file or directory/);
  // …or another file of that name, which it reads instead.
  writeFileSync(join(dir, 'elsewhere', 'disk.data'), Buffer.alloc(RAW.length));
  const decoy = qemuCompare(rawPath, join(dir, 'img', 'disk.qcow2'), join(dir, 'elsewhere'));
  assert.equal(decoy.code, 1, `qemu read the working directory's disk.data: ${decoy.stdout}${decoy.stderr}`);
  // Our reader resolves it from the image's directory, wherever it runs.
  assert.ok((await readAll(join(dir, 'img', 'disk.qcow2'))).subarray(0, RAW.length).equals(RAW));
});

for (const writer of WRITERS) {
  test(`${writer.name}: a data file outside the image's directory is stored absolute, with the warning our readers' refusal needs`, async (t) => {
    if (!needQemu(t)) return;
    const dir = tempDir(t);
    const rawPath = join(dir, 'in.raw');
    writeFileSync(rawPath, RAW);
    mkdirSync(join(dir, 'img'));
    mkdirSync(join(dir, 'dat'));
    const warnings: string[] = [];
    const summary = await writer.write(rawPath, join(dir, 'img', 'disk.qcow2'), join(dir, 'dat', 'disk.data'), (m) => warnings.push(m));
    assert.equal(summary.dataFileName, join(dir, 'dat', 'disk.data'));
    assert.equal(warnings.length, 1, 'onWarning once');
    assert.match(warnings[0]!, /does not lead from the image's directory to the data file, or leads outside it/);
    assert.deepEqual(summary.warnings, warnings);
    // An absolute name: qemu opens it from anywhere; our reader refuses it, as warned.
    const fromElsewhere = qemuCompare(rawPath, join(dir, 'img', 'disk.qcow2'), join(dir, 'dat'));
    assert.equal(fromElsewhere.code, 0, fromElsewhere.stdout + fromElsewhere.stderr);
    await assert.rejects(openImage(join(dir, 'img', 'disk.qcow2')), PathPolicyError);
  });
}
