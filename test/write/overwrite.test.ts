/**
 * One overwrite rule for every output (issue 15, item 9): an existing file at any output path —
 * the metadata file, the data file, a single-file image, wrap's metadata, an export target, a
 * manifest — is replaced only when asked (`overwrite: true` in the API, `--force` on the command
 * line), the same for every kind. A refused run changes nothing in the directory: no orphan
 * data file beside an old image, no partial files. One table, each output kind × API and CLI.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { pipeline } from 'node:stream/promises';
import { Readable } from 'node:stream';
import { convert } from '../../src/write/convert.js';
import { wrap } from '../../src/write/wrap.js';
import { writeExternal, createExternalSink } from '../../src/write/external-sink.js';
import { createInternalSink, writeInternal } from '../../src/write/internal-sink.js';
import { toBatches, type Block, type BlockBatch } from '../../src/block.js';
import { openImage } from '../../src/read/image.js';
import { exportToFile } from '../../src/read/export.js';
import { isQcow2StreamError } from '../../src/errors.js';
import { OffsetWriter } from '../../src/io/output.js';
import { runCli } from '../helpers/cli.js';
import { needQemu, qemuCheck, tempDir } from '../helpers/qemu.js';
import { randomBytesAt } from '../helpers/images.js';

const CS = 65536;
const RAW = randomBytesAt(11, 0, 4 * CS + 1000);
const PRECIOUS = 'precious: not ours to replace';

/** The input's Blocks as batches, for the iterable and stream sinks. */
function batches(): AsyncGenerator<BlockBatch> {
  const blocks: Block[] = [];
  for (let i = 0; i * CS < RAW.length; i++) blocks.push({ index: i, data: RAW.subarray(i * CS, (i + 1) * CS) });
  return toBatches(blocks, { clusterSize: CS, size: RAW.length });
}

/** `{}` (the default), `{ overwrite: false }` or `{ overwrite: true }`. */
type Overwrite = { overwrite?: boolean };

interface Row {
  /** Which output is in the way (it is always named `keep`). */
  kind: string;
  /** The API run; `overwrite` (spread into its options) is the option under test. */
  api: (dir: string, overwrite: Overwrite) => Promise<unknown>;
  /** The same run on the command line (without --force); undefined for API-only sinks. */
  cli?: string[];
  /** What `keep` is after a replacing run: an image qemu-img checks, or the raw bytes. */
  result: 'image' | 'raw' | 'other';
}

const at = (dir: string, name: string) => join(dir, name);

const ROWS: Row[] = [
  {
    kind: 'metadata file (external layout)',
    api: (dir, overwrite: Overwrite) => convert({ input: at(dir, 'in.raw'), output: at(dir, 'keep'), dataFile: at(dir, 'fresh.data'), ...overwrite, sync: false }),
    cli: ['convert', 'in.raw', 'keep', '--data-file', 'fresh.data'],
    result: 'image',
  },
  {
    kind: 'data file',
    api: (dir, overwrite: Overwrite) => convert({ input: at(dir, 'in.raw'), output: at(dir, 'fresh.qcow2'), dataFile: at(dir, 'keep'), ...overwrite, sync: false }),
    cli: ['convert', 'in.raw', 'fresh.qcow2', '--data-file', 'keep'],
    result: 'raw',
  },
  {
    kind: 'single-file image',
    api: (dir, overwrite: Overwrite) => convert({ input: at(dir, 'in.raw'), output: at(dir, 'keep'), layout: 'internal', ...overwrite, sync: false }),
    cli: ['convert', 'in.raw', 'keep', '--internal'],
    result: 'image',
  },
  {
    kind: 'manifest',
    api: (dir, overwrite: Overwrite) => convert({ input: at(dir, 'in.raw'), output: at(dir, 'fresh.qcow2'), manifest: at(dir, 'keep'), ...overwrite, sync: false }),
    cli: ['convert', 'in.raw', 'fresh.qcow2', '--manifest', 'keep'],
    result: 'other',
  },
  {
    kind: "wrap's metadata file",
    api: (dir, overwrite: Overwrite) => wrap({ input: at(dir, 'in.raw'), output: at(dir, 'keep'), ...overwrite, sync: false }),
    cli: ['wrap', 'in.raw', 'keep'],
    result: 'image',
  },
  {
    kind: 'export target',
    api: async (dir, overwrite: Overwrite) => {
      const image = await openImage(at(dir, 'old.qcow2'));
      try {
        return await exportToFile(image, at(dir, 'keep'), { ...overwrite, sync: false });
      } finally {
        await image.close();
      }
    },
    cli: ['export', 'old.qcow2', 'keep'],
    result: 'raw',
  },
  {
    kind: 'metadata file (writeExternal)',
    api: (dir, overwrite: Overwrite) => writeExternal(batches(), { output: at(dir, 'keep'), dataFile: at(dir, 'fresh.data'), ...overwrite, sync: false }),
    result: 'image',
  },
  {
    kind: 'data file (createExternalSink)',
    api: async (dir, overwrite: Overwrite) => {
      const sink = createExternalSink({ output: at(dir, 'fresh.qcow2'), dataFile: at(dir, 'keep'), ...overwrite, sync: false });
      await pipeline(Readable.from(batches()), sink);
      return sink.finished;
    },
    result: 'raw',
  },
  {
    kind: 'single-file image (writeInternal)',
    api: (dir, overwrite: Overwrite) => writeInternal(batches(), { output: at(dir, 'keep'), ...overwrite, sync: false }),
    result: 'image',
  },
  {
    kind: 'single-file image (createInternalSink)',
    api: async (dir, overwrite: Overwrite) => {
      const sink = createInternalSink({ output: at(dir, 'keep'), ...overwrite, sync: false });
      await pipeline(Readable.from(batches()), sink);
      return sink.finished;
    },
    result: 'image',
  },
  {
    kind: 'OffsetWriter output (the lower level)',
    api: async (dir, overwrite: Overwrite) => {
      const writer = await OffsetWriter.create(at(dir, 'keep'), { label: 'raw image', ...overwrite, sync: false });
      try {
        await writer.write(0, RAW);
        await writer.finish(RAW.length);
        await writer.commit();
      } catch (err) {
        await writer.abort();
        throw err;
      }
    },
    result: 'raw',
  },
];

/** Every file of `dir` with its bytes. */
function snapshot(dir: string): Map<string, Buffer> {
  return new Map(
    readdirSync(dir)
      .sort()
      .map((name) => [name, readFileSync(join(dir, name))]),
  );
}

/** A directory with the input, an earlier image (old.qcow2 + old.data) and the file in the way. */
async function setup(dir: string): Promise<void> {
  writeFileSync(join(dir, 'in.raw'), RAW);
  await convert({ input: join(dir, 'in.raw'), output: join(dir, 'old.qcow2'), sync: false });
  writeFileSync(join(dir, 'keep'), PRECIOUS);
}

function assertReplaced(dir: string, row: Row): void {
  const kept = readFileSync(join(dir, 'keep'));
  assert.notEqual(kept.toString('latin1'), PRECIOUS, `${row.kind}: replaced`);
  if (row.result === 'raw') assert.ok(kept.subarray(0, RAW.length).equals(RAW), `${row.kind}: the guest bytes`);
  if (row.result === 'image') {
    const check = qemuCheck('keep', dir);
    assert.equal(check.code, 0, `${row.kind}: qemu-img check: ${check.stdout}${check.stderr}`);
  }
}

for (const row of ROWS) {
  test(`API: an existing ${row.kind} is refused without overwrite, nothing left behind; replaced with overwrite: true`, async (t) => {
    if (!needQemu(t)) return;
    const dir = tempDir(t);
    await setup(dir);
    const before = snapshot(dir);
    for (const refusing of [{}, { overwrite: false }]) {
      await assert.rejects(row.api(dir, refusing), (err: unknown) => {
        assert.ok(isQcow2StreamError(err), `${row.kind}: a typed error, got ${String(err)}`);
        assert.equal(err.code, 'QCOW_ERR_FILE');
        assert.match(err.message, /'.*keep' already exists/);
        assert.match(err.hint ?? '', /overwrite: true/, 'the hint names the API option');
        return true;
      });
      assert.deepEqual(snapshot(dir), before, `${row.kind} (${JSON.stringify(refusing)}): the directory is as it was`);
    }
    await row.api(dir, { overwrite: true });
    assertReplaced(dir, row);
  });

  if (row.cli) {
    const args = row.cli;
    test(`CLI: an existing ${row.kind} is refused without --force, nothing left behind; replaced with --force`, async (t) => {
      if (!needQemu(t)) return;
      const dir = tempDir(t);
      await setup(dir);
      const before = snapshot(dir);
      const refused = runCli(args, { cwd: dir });
      assert.equal(refused.code, 2, `${args.join(' ')}: ${refused.stderr}`);
      assert.match(refused.stderr, /'keep' already exists \[QCOW_ERR_FILE\]\n {2}hint: .*--force/);
      assert.deepEqual(snapshot(dir), before, `${args.join(' ')}: the directory is as it was`);
      const forced = runCli([...args, '--force', '-q'], { cwd: dir });
      assert.equal(forced.code, 0, `${args.join(' ')} --force: ${forced.stderr}`);
      assertReplaced(dir, row);
    });
  }
}
