/**
 * Where a file's data lies, so a source can skip its holes without reading them: qemu-img asks
 * the kernel with lseek(SEEK_DATA / SEEK_HOLE), and so do we, through a small optional N-API
 * addon (src/native, built at install). Node's fs has no lseek.
 *
 * Without the addon (the build failed, or QCOW2_STREAM_NO_NATIVE=1 is set) every byte counts as
 * data: the file is read in full and the zero check finds the holes, only more slowly.
 */

import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';

/** The addon's interface (src/native/extents.c). Offsets past the end answer the file size. */
interface NativeExtentProbe {
  /** The first data byte at or after `offset`, or the file size when there is none. */
  nextData(fd: number, offset: number): number;
  /** The first hole byte at or after `offset` (the end of the file counts as a hole). */
  nextHole(fd: number, offset: number): number;
}

/** Set to any value but '' or '0' to ignore the addon (tests cover both paths with it). */
export const NO_NATIVE_ENV = 'QCOW2_STREAM_NO_NATIVE';

/**
 * Where node-gyp leaves the addon, relative to this module: from src/io (tsx, tests) and from
 * dist/src/io (the built package).
 */
const ADDON_PATHS = ['../native/build/Release/qcow2_extents.node', '../../../src/native/build/Release/qcow2_extents.node'];

/** undefined: not tried yet; null: not available. */
let addon: NativeExtentProbe | null | undefined;

function loadAddon(): NativeExtentProbe | null {
  if (addon !== undefined) return addon;
  addon = null;
  const require = createRequire(import.meta.url);
  for (const relative of ADDON_PATHS) {
    const path = fileURLToPath(new URL(relative, import.meta.url));
    if (!existsSync(path)) continue;
    try {
      addon = require(path) as NativeExtentProbe;
      break;
    } catch {
      // Built for another platform or a broken build: the pure-JS path still works.
    }
  }
  return addon;
}

function nativeDisabled(): boolean {
  const value = process.env[NO_NATIVE_ENV];
  return value !== undefined && value !== '' && value !== '0';
}

/** Which probe `dataExtents` uses right now: `native` skips holes, `none` reads everything. */
export function extentProbeKind(): 'native' | 'none' {
  return !nativeDisabled() && loadAddon() ? 'native' : 'none';
}

/** A byte range [start, end) of a file that holds data. */
export interface DataExtent {
  start: number;
  end: number;
}

/**
 * The data extents of the open file `fd` within [start, end), in increasing order and clipped to
 * the range; every byte between them is a hole (reads as zero). Extents come from the file
 * system, so their edges fall on its block size, not on any cluster size. Asked lazily, one
 * extent at a time, so a badly fragmented file costs no memory up front.
 *
 * Without the probe, or where the file system cannot answer (EINVAL), the rest of the range is
 * one extent: reading it is always correct.
 */
export function* dataExtents(fd: number, start: number, end: number): Generator<DataExtent> {
  const probe = nativeDisabled() ? null : loadAddon();
  let position = start;
  while (position < end) {
    if (!probe) {
      yield { start: position, end };
      return;
    }
    let dataStart: number;
    let dataEnd: number;
    try {
      dataStart = probe.nextData(fd, position);
      if (dataStart >= end) return;
      dataEnd = Math.min(end, probe.nextHole(fd, dataStart));
    } catch {
      yield { start: position, end };
      return;
    }
    // No hole after dataStart means it is the end of the file (shorter than `end`): no more data.
    if (dataEnd <= dataStart) return;
    yield { start: dataStart, end: dataEnd };
    position = dataEnd;
  }
}
