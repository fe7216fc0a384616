/** createExportStream: the export as one stream-chain Duplex, with a stage of the user's own and a typed finished. */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createWriteStream, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { pipeline } from 'node:stream/promises';
import { convert, createExportStream, openImage } from '../../src/index.js';
import { mixedExtents, writeRawImage } from '../helpers/images.js';
import { tempDir } from '../helpers/qemu.js';
import { MiB } from '../write/helpers.js';

test('createExportStream: the guest bytes through a user stage, and finished with the counts', async (t) => {
  const dir = tempDir(t);
  const size = 5 * MiB + 512;
  writeRawImage(join(dir, 'in.raw'), size, mixedExtents(size, 65536, 3), 3);
  await convert({ input: join(dir, 'in.raw'), output: join(dir, 'i.qcow2'), sync: false });
  const image = await openImage(join(dir, 'i.qcow2'));
  try {
    let chunks = 0;
    const stream = createExportStream(image, { stages: [(chunk: Uint8Array) => (chunks++, chunk)] });
    await pipeline(stream, createWriteStream(join(dir, 'out.raw')));
    const result = await stream.finished;
    assert.equal(result.bytes, size);
    assert.equal(result.bytesWritten, size);
    assert.ok(chunks > 0);
    assert.ok(readFileSync(join(dir, 'out.raw')).equals(readFileSync(join(dir, 'in.raw'))));
  } finally {
    await image.close();
  }
});
