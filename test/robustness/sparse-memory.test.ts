/**
 * A long run on a huge sparse disk keeps memory flat: converting a 64 GiB sparse raw file (a few
 * MiB of data at scattered offsets) peaks no higher than converting a 2 GiB one, give or take
 * 32 MiB, in every layout. Each conversion runs in its own process, whose peak resident set
 * (VmHWM) is the measure.
 *
 * Two ways through the input: with the native hole probe (src/io/extents.ts) holes are skipped,
 * so 64 GiB takes about a second, in each layout; without it (QCOW2_STREAM_NO_NATIVE=1) every
 * byte is read and zero-checked, about 25 s per 64 GiB, so that path is measured on 16 GiB and
 * in the default layout only.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { rmSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { extentProbeKind, NO_NATIVE_ENV } from '../../src/io/extents.js';
import type { ConvertOptions } from '../../src/write/convert.js';
import { writeRawImage, type Extent } from '../helpers/images.js';
import { needQemu, qemuCheck, qemuCompare, tempDir } from '../helpers/qemu.js';
import { runLoad } from './load.js';

const MiB = 2 ** 20;
const GiB = 2 ** 30;
const SMALL = 2 * GiB;
/** The huge image's peak may exceed the small one's by this much (allocator and GC noise). */
const FLAT_MARGIN = 32 * MiB;
/** And stays under this, whatever the small one did (about 85 MiB measured, tsx included). */
const PEAK_LIMIT = 150 * MiB;

/** 16 runs of 256 KiB + 333 bytes spread over the disk (unaligned ends), and its last 1000 bytes. */
function sparseExtents(size: number): Extent[] {
  const stride = size / 16;
  const extents: Extent[] = Array.from({ length: 16 }, (_, i) => ({
    offset: i * stride + ((i * 7919 * 65536) % (stride - MiB)),
    length: 256 * 1024 + 333,
    kind: 'random' as const,
  }));
  extents.push({ offset: size - 1000, length: 1000, kind: 'random' });
  return extents;
}

interface Layout {
  name: string;
  options: (dir: string, tag: string) => Omit<ConvertOptions, 'input'>;
  /** Checks the output of the huge conversion against its input, cheaply (qemu skips holes). */
  verify(dir: string, tag: string): void;
}

const LAYOUTS: Layout[] = [
  {
    name: 'external data file, raw bit',
    options: (dir, tag) => ({ output: join(dir, `${tag}.qcow2`) }),
    verify: (dir, tag) => {
      // With the raw bit the data file is the disk: compare it as raw (both sides sparse, so
      // qemu-img skips the holes), and let qemu-img check the metadata around it.
      assert.equal(qemuCompare(join(dir, `${tag}.raw`), join(dir, `${tag}.data`), dir, 'raw').code, 0, 'the data file differs from the input');
      assert.equal(qemuCheck(join(dir, `${tag}.qcow2`)).code, 0);
      assert.ok(statSync(join(dir, `${tag}.data`)).blocks * 512 < 64 * MiB, 'the data file is not sparse');
    },
  },
  {
    name: 'external data file, sparse metadata',
    options: (dir, tag) => ({ output: join(dir, `${tag}.qcow2`), dataFileRaw: false }),
    verify: (dir, tag) => assert.equal(qemuCompare(join(dir, `${tag}.raw`), join(dir, `${tag}.qcow2`), dir).code, 0),
  },
  {
    name: 'internal',
    options: (dir, tag) => ({ output: join(dir, `${tag}.qcow2`), layout: 'internal' }),
    verify: (dir, tag) => assert.equal(qemuCompare(join(dir, `${tag}.raw`), join(dir, `${tag}.qcow2`), dir).code, 0),
  },
];

const PATHS = [
  { name: 'holes skipped (native probe)', big: 64 * GiB, env: {}, available: () => extentProbeKind() === 'native', layouts: LAYOUTS },
  // About 20 s for one layout: the default one only (the others share its source and zero check).
  { name: 'every byte read (no probe)', big: 16 * GiB, env: { [NO_NATIVE_ENV]: '1' }, available: () => true, layouts: LAYOUTS.slice(0, 1) },
];

for (const path of PATHS) {
  test(`a ${path.big / GiB} GiB sparse disk, ${path.name}: peak memory as for ${SMALL / GiB} GiB`, async (t) => {
    if (!needQemu(t)) return;
    if (!path.available()) {
      t.skip('the native hole probe is not built (npm run build:native)');
      return;
    }
    const dir = tempDir(t);
    for (const [tag, size] of [
      ['small', SMALL],
      ['big', path.big],
    ] as const) {
      writeRawImage(join(dir, `${tag}.raw`), size, sparseExtents(size), 9);
    }
    for (const layout of path.layouts) {
      const peaks: Record<string, number> = {};
      for (const tag of ['small', 'big']) {
        const conversion = { input: join(dir, `${tag}.raw`), options: layout.options(dir, tag) };
        const report = await runLoad(dir, { conversions: [conversion], exports: [] }, path.env);
        peaks[tag] = report.maxRssKiB * 1024;
      }
      layout.verify(dir, 'big');
      for (const tag of ['small', 'big']) for (const ext of ['qcow2', 'data']) rmSync(join(dir, `${tag}.${ext}`), { force: true });
      const [small, big] = [peaks['small']!, peaks['big']!];
      t.diagnostic(`${layout.name}: peak ${(small / MiB).toFixed(1)} MiB for ${SMALL / GiB} GiB, ${(big / MiB).toFixed(1)} MiB for ${path.big / GiB} GiB`);
      assert.ok(big <= small + FLAT_MARGIN, `${layout.name}: ${(big / MiB).toFixed(1)} MiB for ${path.big / GiB} GiB against ${(small / MiB).toFixed(1)} MiB for ${SMALL / GiB} GiB`);
      assert.ok(big < PEAK_LIMIT, `${layout.name}: peak ${(big / MiB).toFixed(1)} MiB`);
    }
  });
}
