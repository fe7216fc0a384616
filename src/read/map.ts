/**
 * `qemu-img map`'s view of an image: one entry per coalesced extent with qemu's field names
 * (`start, length, depth, present, zero, data, offset`), so scripts written against
 * `qemu-img map --output=json` can switch.
 *
 * Like qemu, the file below is asked for its holes (SEEK_DATA / SEEK_HOLE, src/io/extents.ts)
 * where qemu asks it: always under a raw layer (a hole reads `zero: true, data: false`), and
 * under a qcow2 layer that qemu's heuristic takes for metadata-preallocated
 * (src/read/preallocation.ts; a hole then reads `zero: true, data: true`). A 0-byte image is one
 * entry of length 0, as qemu prints it. Differences from qemu, on purpose: compressed extents get
 * `compressed: true` instead of failing the human output; and without the native addon (or
 * QCOW2_STREAM_NO_NATIVE=1) there is no hole probe, so holes of the file below read as data.
 */

import { dataExtents } from '../io/extents.js';
import { checkDiskImage } from '../internal/arguments.js';
import { extentFile, type DiskImage, type Extent } from './image.js';
import { detectMetadataPreallocation } from './preallocation.js';

/** One map entry, qemu-img map's JSON fields plus `file` and `compressed`. */
export interface MapEntry {
  /** Guest offset of the range. */
  start: number;
  /** Bytes in the range. */
  length: number;
  /** The layer that answered: 0 = the image, 1 = its backing file, … */
  depth: number;
  /** Some layer allocates the range (data or a zero flag). */
  present: boolean;
  /** The range reads as zeros. */
  zero: boolean;
  /** The range's bytes are stored in a file. */
  data: boolean;
  /** Offset in `file` (absent for unallocated, plain zero and compressed ranges). */
  offset?: number;
  /** The file holding the bytes: the image, its data file or a backing file. */
  file?: string;
  /** The bytes are in a compressed cluster (which has no `offset`). */
  compressed?: boolean;
}

/** The map entry for an extent. */
export function mapEntryOf(extent: Extent): MapEntry {
  const entry: MapEntry = {
    start: extent.start,
    length: extent.length,
    depth: extent.depth,
    present: extent.kind !== 'unallocated',
    zero: extent.kind !== 'data',
    data: extent.kind === 'data',
  };
  if (extent.hostOffset !== undefined && !extent.compressed) entry.offset = extent.hostOffset;
  if (extent.file !== undefined) entry.file = extent.file;
  if (extent.compressed) entry.compressed = true;
  return entry;
}

/** The image's map entries, in guest order. */
export async function* mapImage(image: DiskImage): AsyncGenerator<MapEntry> {
  checkDiskImage(image, 'mapImage()');
  const preallocated = new Map<DiskImage, Promise<boolean>>();
  /** Whether the layer at `depth` hands its data ranges to the file below for holes. */
  const probes = async (depth: number): Promise<'raw' | 'preallocated' | undefined> => {
    let layer: DiskImage | undefined = image;
    for (let d = 0; d < depth && layer; d++) layer = layer.backing;
    if (!layer) return undefined;
    if (layer.format === 'raw') return 'raw';
    let known = preallocated.get(layer);
    if (!known) preallocated.set(layer, (known = detectMetadataPreallocation(layer.path)));
    return (await known) ? 'preallocated' : undefined;
  };
  let pending: MapEntry | undefined;
  let any = false;
  for await (const extent of image.extents()) {
    const file = extent.kind === 'data' && !extent.compressed ? extentFile(extent) : undefined;
    const mode = file && extent.hostOffset !== undefined ? await probes(extent.depth) : undefined;
    const entries = mode && file ? splitAtHoles(mapEntryOf(extent), file.fd, mode) : [mapEntryOf(extent)];
    for (const entry of entries) {
      any = true;
      if (pending && mergeable(pending, entry)) {
        pending.length += entry.length;
        continue;
      }
      if (pending) yield pending;
      pending = entry;
    }
  }
  if (pending) yield pending;
  // qemu prints one entry of length 0 for a 0-byte image.
  if (!any) yield { start: 0, length: 0, depth: 0, present: false, zero: false, data: false };
}

/**
 * A data entry cut where the file storing it has holes (and past its end): the holes read as
 * zeros — `data: false` under a raw layer (qemu's file driver answers for it), `data: true` under
 * a preallocated qcow2 layer (qcow2 says data, the file adds zero).
 */
function* splitAtHoles(entry: MapEntry, fd: number, mode: 'raw' | 'preallocated'): Generator<MapEntry> {
  const base = entry.offset ?? 0;
  const end = base + entry.length;
  const piece = (from: number, to: number, hole: boolean): MapEntry => ({
    ...entry,
    start: entry.start + (from - base),
    length: to - from,
    zero: hole,
    data: hole ? mode === 'preallocated' : true,
    offset: from,
  });
  let position = base;
  for (const data of dataExtents(fd, base, end)) {
    if (data.start > position) yield piece(position, data.start, true);
    yield piece(data.start, data.end, false);
    position = data.end;
  }
  if (position < end) yield piece(position, end, true);
}

/** qemu-img map's merge rule: same flags and layer, and contiguous offsets where there are offsets. */
function mergeable(a: MapEntry, b: MapEntry): boolean {
  if (a.length === 0 || a.start + a.length !== b.start) return false;
  if (a.depth !== b.depth || a.present !== b.present || a.zero !== b.zero || a.data !== b.data) return false;
  if (a.compressed || b.compressed || a.file !== b.file) return false;
  if (a.offset === undefined || b.offset === undefined) return a.offset === b.offset;
  return a.offset + a.length === b.offset;
}

/** One entry as qemu-img map prints it in JSON (same keys, same order; `file` left out). */
export function formatMapJsonEntry(entry: MapEntry): string {
  const fields: string[] = [
    `"start": ${entry.start}`,
    `"length": ${entry.length}`,
    `"depth": ${entry.depth}`,
    `"present": ${entry.present}`,
    `"zero": ${entry.zero}`,
    `"data": ${entry.data}`,
  ];
  if (entry.compressed) fields.push('"compressed": true');
  if (entry.offset !== undefined) fields.push(`"offset": ${entry.offset}`);
  return `{ ${fields.join(', ')}}`;
}

const hex = (n: number) => (n === 0 ? '0' : `0x${n.toString(16)}`);

/** qemu-img map's human table header. */
export const MAP_HUMAN_HEADER = `${'Offset'.padEnd(16)}${'Length'.padEnd(16)}${'Mapped to'.padEnd(16)}File`;

/**
 * One row of the human table, or undefined for ranges qemu leaves out (anything that is not
 * stored data). Compressed data has no plain offset, so its row says `compressed`.
 */
export function formatMapHumanRow(entry: MapEntry): string | undefined {
  if (!entry.data || entry.zero) return undefined;
  const mapped = entry.compressed ? 'compressed' : hex(entry.offset ?? 0);
  return `${hex(entry.start).padEnd(16)}${hex(entry.length).padEnd(16)}${mapped.padEnd(16)}${entry.file ?? ''}`;
}
