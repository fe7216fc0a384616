/**
 * Where a file's data lies, so a source can skip its holes without reading them: qemu-img asks
 * the kernel with lseek(SEEK_DATA / SEEK_HOLE), and so do we, through a small optional N-API
 * addon (src/io/native.ts). Node's fs has no lseek.
 *
 * Without the addon (the build failed, or QCOW2_STREAM_NO_NATIVE=1 is set) every byte counts as
 * data: the file is read in full and the zero check finds the holes, only more slowly.
 */

import { nativeAddon } from './native.js';

export { NO_NATIVE_ENV } from './native.js';

/**
 * Holes shorter than this are read like data: a separate read for the bytes after a small hole
 * costs more than reading its zeros (the zero check still finds them). Shared by the sources
 * (input files) and export (the files storing an image's data).
 */
export const MIN_SKIPPED_HOLE = 256 * 1024;

/** Which probe `dataExtents` uses right now: `native` skips holes, `none` reads everything. */
export function extentProbeKind(): 'native' | 'none' {
  return nativeAddon() ? 'native' : 'none';
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
  const probe = nativeAddon();
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
