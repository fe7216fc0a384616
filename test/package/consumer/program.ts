/**
 * A user's program, written from the README alone, that test/package/tarball.test.ts compiles
 * in fresh projects that installed the packed tarball: as ESM (`moduleResolution: nodenext`,
 * type-checked with `node10` too) and as CommonJS (the same source compiled to require() calls).
 * Run in a directory of its own, it converts a generated raw image, reads it back, provokes
 * a few failures and prints what it saw as JSON for the test to compare.
 *
 * No top-level await and no import.meta: the same file must also be a CommonJS module.
 */

import { closeSync, ftruncateSync, openSync, writeFileSync, writeSync } from 'node:fs';
import { convert, openImage, checkImage, isQcow2StreamError } from 'qcow2-stream';
import { createHasher } from 'qcow2-stream/transforms';
import { parseJob } from 'qcow2-stream/fleet';

const MiB = 1024 * 1024;
const SIZE = 3 * MiB;
/** Data at these offsets, holes elsewhere. */
const DATA_AT = [0, 2 * MiB];

function pattern(seed: number): Uint8Array {
  const bytes = new Uint8Array(64 * 1024);
  for (let i = 0; i < bytes.length; i++) bytes[i] = (i * 31 + seed) & 0xff;
  return bytes;
}

/**
 * One line per failure, by its stable code; the compiler checks that every code is handled, and
 * each case narrows the error to its class (its own fields, no instanceof).
 */
function describe(error: unknown): string {
  if (!isQcow2StreamError(error)) return `not a Qcow2StreamError: ${String(error)}`;
  switch (error.code) {
    case 'QCOW_ERR_FILE':
      return `${error.code} ${error.path} (${error.systemCode ?? 'no system code'}, errno ${error.errno ?? 'none'})`;
    case 'QCOW_ERR_STREAM':
      return `${error.code} from ${error.stream}`;
    case 'QCOW_ERR_BAD_MAGIC':
    case 'QCOW_ERR_UNSUPPORTED_FORMAT':
    case 'QCOW_ERR_UNSUPPORTED_VERSION':
    case 'QCOW_ERR_UNSUPPORTED_FEATURE':
    case 'QCOW_ERR_CORRUPT_IMAGE':
    case 'QCOW_ERR_LIMIT_EXCEEDED':
    case 'QCOW_ERR_UNEXPECTED_EOF':
      return `${error.code} (not an image we can read)`;
    case 'QCOW_ERR_JOB':
      return `${error.code} (a job payload the fleet refuses)`;
    case 'QCOW_ERR_INVALID_ARGUMENT':
    case 'QCOW_ERR_PATH_POLICY':
    case 'QCOW_ERR_INPUT_SIZE':
    case 'QCOW_ERR_NOT_SEEKABLE':
    case 'QCOW_ERR_DEDUP_UNSUPPORTED':
    case 'QCOW_ERR_COMPRESSION_UNSUPPORTED':
    case 'QCOW_ERR_ABORTED':
    case 'QCOW_ERR_NBD_CONNECTION':
    case 'QCOW_ERR_NBD_PROTOCOL':
    case 'QCOW_ERR_NBD_SERVER':
    case 'QCOW_ERR_OBJECT_STORAGE':
    case 'QCOW_ERR_MISSING_DEPENDENCY':
      return `${error.code} (unexpected here)`;
    default: {
      const unhandled: never = error;
      return `unknown code ${(unhandled as { code: string }).code}`;
    }
  }
}

async function failure(run: () => unknown): Promise<string> {
  try {
    await run();
    return 'no error';
  } catch (error) {
    return describe(error);
  }
}

async function main(): Promise<void> {
  const raw = openSync('disk.raw', 'w');
  ftruncateSync(raw, SIZE);
  for (const [i, offset] of DATA_AT.entries()) writeSync(raw, pattern(i), 0, 64 * 1024, offset);
  closeSync(raw);

  await convert({ input: 'disk.raw', output: 'disk.qcow2', dataFile: 'disk.data' });

  const hasher = await createHasher();
  const image = await openImage('disk.qcow2');
  let sameBytes = true;
  let sameHashes = true;
  try {
    for (const [i, offset] of DATA_AT.entries()) {
      const read = await image.read(offset, 64 * 1024);
      sameBytes &&= Buffer.from(read).equals(pattern(i));
      sameHashes &&= hasher.hash64(read) === hasher.hash64(pattern(i));
    }
    const hole = await image.read(MiB, 64 * 1024);
    sameBytes &&= hole.every((byte) => byte === 0);
  } finally {
    await image.close();
  }
  const check = await checkImage('disk.qcow2');

  writeFileSync('junk.qcow2', 'this is not a qcow2 image\n');
  const job = parseJob({ v: 1, argv: ['convert', 'disk.raw', 'job.qcow2'] });
  const report = {
    sameBytes,
    sameHashes,
    clean: check.clean,
    job: job.command,
    failures: [
      await failure(() => openImage('missing.qcow2')),
      await failure(() => openImage('junk.qcow2')),
      await failure(() => parseJob({ v: 1, argv: ['format-disk', 'disk.raw'] })),
    ],
  };
  process.stdout.write(`${JSON.stringify(report)}\n`);
}

main().catch((error: unknown) => {
  process.stderr.write(`${describe(error)}\n${error instanceof Error ? error.stack : ''}\n`);
  process.exitCode = 1;
});
