/**
 * Faults in the middle of a write (raw → qcow2), injected through the file layer: ENOSPC and EIO
 * on the data file, on the metadata file and on a single-file image, for every way the library
 * writes them (metadata streamed while the data flows, metadata at the end after an input of
 * unknown size, the internal layout, wrap), plus failing fsyncs, length changes and directory
 * fsyncs. Each must end in a typed error naming the file, leave the directory exactly as it was
 * (no final name, no `.partial`, files that were there untouched, the input unchanged) and leave
 * no descriptor open.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { createReadStream, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { convert } from '../../src/write/convert.js';
import { wrap } from '../../src/write/wrap.js';
import { isQcow2StreamError, type FileError } from '../../src/errors.js';
import { mixedExtents, writeRawImage } from '../helpers/images.js';
import { tempDir } from '../helpers/qemu.js';
import { leakedSince, openDescriptors } from '../helpers/descriptors.js';
import { withoutNative } from '../write/helpers.js';
import { COPIES_IN_FLIGHT } from '../../src/io/output.js';
import { errnoError, failOn, traceCalls, type FaultableMethod } from './faults.js';

const MiB = 1024 * 1024;
/** Several data writes (runs are at most 8 MiB) and several metadata writes. */
const SIZE = 24 * MiB;

type Errno = 'ENOSPC' | 'EIO';
const REASON: Record<Errno, string> = { ENOSPC: 'no space left on device', EIO: 'input/output error' };

/** How the run writes: each one the library has a different code path for. */
interface Writer {
  title: string;
  run(dir: string): Promise<unknown>;
  /** The files it writes: what the error calls them, and their final name. */
  outputs: Array<{ label: string; final: string }>;
  /** When the metadata is written, for the external layout. */
  metadataLayout?: 'streamed' | 'at-end';
}

const input = (dir: string) => join(dir, 'in.raw');

const WRITERS: Writer[] = [
  {
    title: 'convert, size known (metadata streamed)',
    run: (dir) => convert({ input: input(dir), output: join(dir, 'out.qcow2') }),
    outputs: [
      { label: 'data file', final: 'out.data' },
      { label: 'metadata file', final: 'out.qcow2' },
    ],
    metadataLayout: 'streamed',
  },
  {
    // The same run through Blocks: what every conversion does without the native data mover.
    title: 'convert, size known, without the native addon',
    run: (dir) => withoutNative(() => convert({ input: input(dir), output: join(dir, 'out.qcow2') })),
    outputs: [
      { label: 'data file', final: 'out.data' },
      { label: 'metadata file', final: 'out.qcow2' },
    ],
    metadataLayout: 'streamed',
  },
  {
    title: 'convert, size unknown (metadata at the end)',
    run: (dir) => convert({ input: createReadStream(input(dir)), output: join(dir, 'out.qcow2'), dataFile: join(dir, 'out.data') }),
    outputs: [
      { label: 'data file', final: 'out.data' },
      { label: 'metadata file', final: 'out.qcow2' },
    ],
    metadataLayout: 'at-end',
  },
  {
    title: 'convert, internal layout',
    run: (dir) => convert({ input: input(dir), output: join(dir, 'out.qcow2'), layout: 'internal' }),
    outputs: [{ label: 'image', final: 'out.qcow2' }],
  },
  {
    title: 'wrap',
    run: (dir) => wrap({ input: input(dir), output: join(dir, 'out.qcow2'), dataFileName: 'in.raw' }),
    outputs: [{ label: 'metadata file', final: 'out.qcow2' }],
  },
  {
    title: 'wrap, sparse mode',
    run: (dir) => wrap({ input: input(dir), output: join(dir, 'out.qcow2'), dataFileName: 'in.raw', dataFileRaw: false }),
    outputs: [{ label: 'metadata file', final: 'out.qcow2' }],
  },
];

function makeInput(dir: string): void {
  writeRawImage(input(dir), SIZE, mixedExtents(SIZE, 65536, 7), 7);
}

/** Every name in the directory, hidden ones included, with a digest of its bytes. */
function snapshot(dir: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const name of readdirSync(dir).sort()) out[name] = createHash('sha256').update(readFileSync(join(dir, name))).digest('hex');
  return out;
}

const temporaryOf = (final: string) => (path: string) => path.includes(`/.${final}.`) && path.endsWith('.partial');

/** Node's errno of each OS error these tests raise (Linux numbers). */
const ERRNO = { EIO: -5, ENOSPC: -28, EEXIST: -17 } as const;

/** Runs `work` expecting a FileError for the OS error `systemCode` whose message starts with `action` and names `final`. */
async function expectFileError(work: Promise<unknown>, systemCode: keyof typeof ERRNO, action: string, final: string, reason: string): Promise<void> {
  await assert.rejects(work, (err: unknown) => {
    assert.ok(isQcow2StreamError(err), `expected a typed error, got ${String(err)}`);
    assert.equal(err.code, 'QCOW_ERR_FILE', err.message);
    assert.equal((err as FileError).systemCode, systemCode, err.message);
    // Node's errno is the negative number (errnoError gives the Linux ones).
    assert.equal((err as FileError).errno, ERRNO[systemCode], err.message);
    assert.ok(err.message.startsWith(`${action} '`), err.message);
    assert.ok(err.message.endsWith(`/${final}': ${reason}`), err.message);
    return true;
  });
}

/** Removes what a clean run made, so the directory is back to its snapshot. */
function removeOutputs(dir: string, writer: Writer): void {
  for (const { final } of writer.outputs) rmSync(join(dir, final), { force: true });
}

for (const writer of WRITERS) {
  for (const { label, final } of writer.outputs) {
    test(`${writer.title}: ENOSPC and EIO on the ${label}'s first, second and last write leave the directory as it was`, async (t) => {
      const dir = tempDir(t);
      makeInput(dir);
      const before = snapshot(dir);
      // A clean run first: how many writes there are (several, or there is no "middle").
      const trace = await traceCalls(t, 'writev', temporaryOf(final));
      const summary = (await writer.run(dir)) as { metadataLayout?: string };
      trace.stop();
      removeOutputs(dir, writer);
      const writes = trace.calls.length;
      assert.ok(writes >= 3, `${writes} writes to the ${label}: first, middle and last must differ`);
      assert.equal(summary.metadataLayout, writer.metadataLayout);
      // The internal layout writes its header (at offset 0) last: the last fault hits the metadata.
      if (label === 'image') assert.equal(trace.calls.at(-1)?.[1], 0);

      const descriptors = openDescriptors();
      for (const okCalls of [0, 1, writes - 1]) {
        for (const errno of ['ENOSPC', 'EIO'] as const) {
          await t.test(`${errno} after ${okCalls} of ${writes} writes`, async (c) => {
            const seen = await failOn(c, 'writev', temporaryOf(final), okCalls, errnoError(errno, 'write'));
            await expectFileError(writer.run(dir), errno, `Cannot write the ${label}`, final, REASON[errno]);
            // Copies already in flight when the fault fires still run (and fail too); none starts once it is seen.
            assert.ok(seen.calls > okCalls && seen.calls <= okCalls + COPIES_IN_FLIGHT, `${seen.calls} calls: the fault did not fire where intended`);
            assert.deepEqual(snapshot(dir), before, 'the directory changed');
          });
        }
      }
      assert.deepEqual(leakedSince(descriptors), []);
    });
  }
}

/** The other calls that make a file durable and complete, each failing once. */
const FINISHING: Array<{ method: FaultableMethod; action: string }> = [
  { method: 'truncate', action: 'set the length of the' },
  { method: 'sync', action: 'finish the' },
];

for (const writer of WRITERS) {
  test(`${writer.title}: a failing length change or fsync of any output leaves the directory as it was`, async (t) => {
    const dir = tempDir(t);
    makeInput(dir);
    const before = snapshot(dir);
    const descriptors = openDescriptors();
    for (const { label, final } of writer.outputs) {
      for (const { method, action } of FINISHING) {
        await t.test(`${method} of the ${label}`, async (c) => {
          const seen = await failOn(c, method, temporaryOf(final), 0, errnoError('EIO', method));
          await expectFileError(writer.run(dir), 'EIO', `Cannot ${action} ${label}`, final, REASON.EIO);
          assert.equal(seen.calls, 1, 'the fault did not fire');
          assert.deepEqual(snapshot(dir), before, 'the directory changed');
        });
      }
    }
    // The directory fsync comes after a rename: the file is already at its final name and must
    // be taken away again. One directory fsync per output, in the order they are committed.
    for (const [index, { label, final }] of writer.outputs.entries()) {
      await t.test(`directory fsync after the ${label}'s rename`, async (c) => {
        const seen = await failOn(c, 'sync', (path) => path === dir, index, errnoError('EIO', 'fsync'));
        await expectFileError(writer.run(dir), 'EIO', `Cannot finish the ${label}`, final, REASON.EIO);
        assert.equal(seen.calls, index + 1, 'the fault did not fire');
        assert.deepEqual(snapshot(dir), before, 'the directory changed');
      });
    }
    assert.deepEqual(leakedSince(descriptors), []);
  });
}

test('a failure with --force leaves the files it would have replaced untouched', async (t) => {
  const dir = tempDir(t);
  makeInput(dir);
  writeFileSync(join(dir, 'out.qcow2'), 'an older image');
  writeFileSync(join(dir, 'out.data'), 'an older data file');
  const before = snapshot(dir);
  for (const final of ['out.data', 'out.qcow2']) {
    await t.test(final, async (c) => {
      await failOn(c, 'writev', temporaryOf(final), 1, errnoError('ENOSPC', 'write'));
      const label = final === 'out.data' ? 'data file' : 'metadata file';
      await expectFileError(convert({ input: input(dir), output: join(dir, 'out.qcow2'), overwrite: true }), 'ENOSPC', `Cannot write the ${label}`, final, REASON.ENOSPC);
      assert.deepEqual(snapshot(dir), before);
    });
  }
});

test('an existing data file is not touched without overwrite, not even when it appears mid-run', async (t) => {
  const dir = tempDir(t);
  makeInput(dir);
  writeFileSync(join(dir, 'out.data'), 'somebody else’s data');
  const before = snapshot(dir);
  await assert.rejects(convert({ input: input(dir), output: join(dir, 'out.qcow2') }), (err: unknown) => {
    assert.ok(isQcow2StreamError(err));
    assert.equal((err as FileError).systemCode, 'EEXIST');
    assert.equal((err as FileError).errno, -17);
    return true;
  });
  assert.deepEqual(snapshot(dir), before);

  // Another job creates the data file while this one writes its own under a temporary name:
  // the commit must fail rather than rename over it.
  rmSync(join(dir, 'out.data'));
  const whole = readFileSync(input(dir));
  async function* racing(): AsyncGenerator<Uint8Array> {
    for (let offset = 0; offset < whole.length; offset += MiB) {
      if (offset === 8 * MiB) {
        assert.ok(readdirSync(dir).some((name) => name.startsWith('.out.data.')), 'the data file is being written');
        writeFileSync(join(dir, 'out.data'), 'somebody else’s data');
      }
      yield whole.subarray(offset, offset + MiB);
    }
  }
  await expectFileError(
    convert({ input: racing(), output: join(dir, 'out.qcow2'), dataFile: join(dir, 'out.data') }),
    'EEXIST',
    'Cannot finish the data file',
    'out.data',
    'file already exists',
  );
  assert.deepEqual(snapshot(dir), before);
});

test('after a fault the process still converts correctly', async (t) => {
  const dir = tempDir(t);
  makeInput(dir);
  await t.test('the fault', async (c) => {
    await failOn(c, 'writev', temporaryOf('out.data'), 1, errnoError('EIO', 'write'));
    await assert.rejects(convert({ input: input(dir), output: join(dir, 'out.qcow2') }));
  });
  const summary = await convert({ input: input(dir), output: join(dir, 'out.qcow2') });
  assert.equal(summary.virtualSize, SIZE);
  assert.ok(readFileSync(join(dir, 'out.data')).equals(readFileSync(input(dir))));
});
