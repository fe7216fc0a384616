/**
 * `qemu-img map`'s view of an image: one entry per coalesced extent with qemu's field names
 * (`start, length, depth, present, zero, data, offset`), so scripts written against
 * `qemu-img map --output=json` can switch. Differences from qemu, on purpose: we do not look
 * inside the data file for holes (qemu does that only for preallocated images), and compressed
 * extents get `compressed: true` instead of failing the human output.
 */

import type { DiskImage, Extent } from './image.js';

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
  for await (const extent of image.extents()) yield mapEntryOf(extent);
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
