/**
 * The VMDK reader: monolithicSparse and streamOptimized files, and text descriptors whose
 * extents are flat, sparse or zero (monolithicFlat, twoGbMaxExtentSparse, twoGbMaxExtentFlat…),
 * after VMware's Virtual Disk Format 5.0 and qemu's block/vmdk.c.
 *
 * - A **sparse extent** (magic `KDMV`, little-endian header of 512 bytes) maps grains (usually
 *   64 KiB) through a grain directory (GD) of grain tables (GT): a GT entry is the sector of the
 *   grain, 0 when not allocated (zeros, or the parent's bytes), 1 for a zeroed grain when the
 *   header's zero-grain flag is set. A compressed extent (streamOptimized) stores each grain as
 *   a marker `{lba u64, size u32}` and a zlib stream; its GD is at the end of the file, in a
 *   copy of the header 1536 bytes before the end (`gdOffset` is then −1 in the first header).
 * - A **descriptor** (text, at most 1 MiB; embedded in a sparse file or a file of its own)
 *   lists the extents: `RW <sectors> FLAT|SPARSE|ZERO|VMFS "<file>" [<offset>]`. Each file name
 *   goes through the path policy, like a qcow2 data-file name. `parentFileNameHint` names the
 *   parent of a snapshot disk, also through the policy.
 *
 * Every size read from a file (grain size, GT size, GD size, descriptor size, marker size) is
 * bounded before it drives an allocation, and every offset is checked against the file.
 */

import { realpath } from 'node:fs/promises';
import { resolve } from 'node:path';
import { constants as zlibConstants, inflateSync } from 'node:zlib';
import { CorruptImageError, LimitExceededError, UnsupportedFeatureError } from '../errors.js';
import { readExactly } from '../io/files.js';
import { resolveStoredName } from '../io/path-policy.js';
import { LruCache } from './cache.js';
import { BaseImage, ByteSource, openSeekable, plain, throughBacking, type CompressedLayer, type OpenContext, type Segment } from './base-image.js';
import type { DiskImage } from './image.js';
import type { CheckableImage, HostSpace, StructureCheck } from './structure-check.js';

const SECTOR = 512;
/** `KDMV` read as a little-endian u32. */
export const VMDK4_MAGIC = 0x564d444b;
/** `COWD`: the old ESX sparse format (VMDK3), not read. */
const VMDK3_MAGIC = 0x434f5744;
const FLAG_REDUNDANT_GD = 1 << 1;
const FLAG_ZERO_GRAIN = 1 << 2;
const FLAG_COMPRESSED = 1 << 16;
const FLAG_MARKERS = 1 << 17;
const COMPRESSION_DEFLATE = 1;
/** The largest grain: qemu refuses more than 2^21 sectors per grain; we keep to 16 MiB. */
export const MAX_GRAIN_BYTES = 16 * 1024 * 1024;
/** qemu's limit on entries per grain table. */
const MAX_GT_ENTRIES = 512;
/** The largest grain directory read (qemu: 512 MiB of L1; we keep to 64 MiB). */
export const MAX_GD_BYTES = 64 * 1024 * 1024;
/** The largest descriptor read (qemu refuses descriptor files above 1 MiB too). */
export const MAX_DESCRIPTOR_BYTES = 1024 * 1024;
/** Most extents a descriptor may list. */
const MAX_EXTENTS = 4096;
/** Marker types of a streamOptimized file (a marker with size 0). */
export const MARKER_EOS = 0;
export const MARKER_GT = 1;
export const MARKER_GD = 2;
export const MARKER_FOOTER = 3;

/** The fields of a VMDK4 sparse header. */
export interface SparseHeader {
  version: number;
  flags: number;
  capacitySectors: number;
  grainSectors: number;
  descriptorOffset: number;
  descriptorSize: number;
  gtEntries: number;
  /** The redundant grain directory's sector (used when the flags say there is one). */
  rgdOffset: number;
  gdOffset: number;
  compressAlgorithm: number;
}

function u64le(view: DataView, at: number): number {
  const lo = view.getUint32(at, true);
  const hi = view.getUint32(at + 4, true);
  if (hi === 0xffffffff && lo === 0xffffffff) return -1;
  return hi * 0x1_0000_0000 + lo;
}

/** Decodes a VMDK4 sparse header from its 512 bytes (the magic already checked or checked here). */
export function decodeSparseHeader(bytes: Uint8Array, path: string): SparseHeader {
  const view = new DataView(bytes.buffer, bytes.byteOffset, SECTOR);
  const magic = view.getUint32(0, true);
  if (magic === VMDK3_MAGIC) {
    throw new UnsupportedFeatureError(`'${path}' is a VMDK3 (COWD, ESX 2) sparse disk, which is not read`, { structure: 'VMDK header', field: 'magic', features: ['VMDK3 COWD'] });
  }
  if (magic !== VMDK4_MAGIC) throw new CorruptImageError(`'${path}' does not start with the VMDK sparse magic "KDMV"`, { structure: 'VMDK header', field: 'magic', offset: 0 });
  return {
    version: view.getUint32(4, true),
    flags: view.getUint32(8, true),
    capacitySectors: u64le(view, 12),
    grainSectors: u64le(view, 20),
    descriptorOffset: u64le(view, 28),
    descriptorSize: u64le(view, 36),
    gtEntries: view.getUint32(44, true),
    rgdOffset: u64le(view, 48),
    gdOffset: u64le(view, 56),
    compressAlgorithm: view.getUint16(77, true),
  };
}

/** One extent line of a descriptor. */
export interface DescriptorExtent {
  access: string;
  sectors: number;
  type: string;
  file: string | undefined;
  offset: number;
}

/** What a descriptor says. */
export interface Descriptor {
  createType: string | undefined;
  parentCID: string | undefined;
  parentFileNameHint: string | undefined;
  extents: DescriptorExtent[];
}

/** Parses a descriptor's text (qemu's rules: `key = "value"` lines and extent lines). */
export function parseDescriptor(text: string, path: string): Descriptor {
  const result: Descriptor = { createType: undefined, parentCID: undefined, parentFileNameHint: undefined, extents: [] };
  for (const rawLine of text.split('\n')) {
    const line = rawLine.replace(/\r$/, '').trim();
    if (line === '' || line.startsWith('#')) continue;
    const extent = /^(RW|RDONLY|NOACCESS)\s+(\d+)\s+([A-Z]+)(?:\s+"([^"]*)")?(?:\s+(\d+))?\s*$/.exec(line);
    if (extent) {
      if (result.extents.length >= MAX_EXTENTS) {
        throw new LimitExceededError(`The VMDK descriptor of '${path}' lists more than ${MAX_EXTENTS} extents`, { structure: 'VMDK descriptor', limit: MAX_EXTENTS, actual: MAX_EXTENTS + 1 });
      }
      const sectors = Number(extent[2]);
      const offset = extent[5] === undefined ? 0 : Number(extent[5]);
      if (!Number.isSafeInteger(sectors) || !Number.isSafeInteger(offset) || sectors * SECTOR > Number.MAX_SAFE_INTEGER) {
        throw new CorruptImageError(`The VMDK descriptor of '${path}' has an extent of impossible size: ${line}`, { structure: 'VMDK descriptor' });
      }
      result.extents.push({ access: extent[1]!, sectors, type: extent[3]!, file: extent[4], offset });
      continue;
    }
    const pair = /^([A-Za-z0-9_.]+)\s*=\s*"?([^"]*)"?$/.exec(line);
    if (!pair) continue;
    if (pair[1] === 'createType') result.createType = pair[2];
    else if (pair[1] === 'parentCID') result.parentCID = pair[2];
    else if (pair[1] === 'parentFileNameHint') result.parentFileNameHint = pair[2];
  }
  return result;
}

/** Bytes of a streamOptimized file read at once for the compressed grains that follow. */
const GRAIN_READ_AHEAD = 1024 * 1024;

/**
 * Inflates one zlib-wrapped grain to exactly `grainBytes` bytes (a short last grain is
 * zero-filled like qemu). A whole grain is zlib's own buffer, not copied again.
 */
function inflateGrain(compressed: Uint8Array, grainBytes: number, path: string, at: number): Uint8Array {
  let result: Buffer;
  try {
    // One output chunk of a grain: the default 16 KiB chunks were joined into a fourth buffer.
    result = inflateSync(compressed, { maxOutputLength: grainBytes, chunkSize: Math.max(grainBytes, 64), finishFlush: zlibConstants.Z_SYNC_FLUSH });
  } catch (err) {
    const tooLarge = (err as NodeJS.ErrnoException).code === 'ERR_BUFFER_TOO_LARGE';
    throw new CorruptImageError(
      tooLarge ? `The compressed grain at byte ${at} of '${path}' inflates to more than a grain (${grainBytes} bytes)` : `The compressed grain at byte ${at} of '${path}' is not valid zlib data (${(err as Error).message})`,
      { structure: 'VMDK grain', offset: at, cause: err },
    );
  }
  if (result.length === grainBytes) return result;
  const out = new Uint8Array(grainBytes);
  out.set(result);
  return out;
}

/** Where a sparse extent's metadata lies in its file (bytes), for `check`. */
interface SparseLayout {
  descriptor: { offset: number; length: number } | undefined;
  gdOffset: number;
  /** The redundant grain directory, when the header's flag says there is one. */
  redundantGdOffset: number | undefined;
  /** streamOptimized with the GD at the end: the footer marker, header copy and end-of-stream marker. */
  footerOffset: number | undefined;
}

/** A sparse extent: header, grain directory and the GT cache. */
class SparseExtent implements CompressedLayer {
  readonly clusterSize: number;
  private readonly gtCache = new LruCache<DataView>(256);
  private lastGrain: { offset: number; bytes: Uint8Array } | undefined;
  /** The file bytes read ahead of the grain last asked for: compressed grains lie one after another. */
  private ahead: { offset: number; bytes: Uint8Array } | undefined;

  constructor(
    readonly source: ByteSource,
    readonly header: SparseHeader,
    private readonly gd: DataView,
    readonly layout: SparseLayout,
  ) {
    this.clusterSize = header.grainSectors * SECTOR;
  }

  get compressed(): boolean {
    return (this.header.flags & FLAG_COMPRESSED) !== 0;
  }

  /** Grain table `gdIndex` of this extent, or undefined when it is not allocated. */
  async table(gdIndex: number): Promise<DataView | undefined> {
    if (gdIndex * 4 + 4 > this.gd.byteLength) return undefined;
    const gtSector = this.gd.getUint32(gdIndex * 4, true);
    if (gtSector === 0) return undefined;
    const gtOffset = gtSector * SECTOR;
    const gtBytes = this.header.gtEntries * 4;
    if (gtOffset + gtBytes > this.source.size) {
      throw new CorruptImageError(`Grain directory entry ${gdIndex} points at sector ${gtSector}, past the end of '${this.source.path}'`, { structure: 'VMDK grain directory', offset: 0 });
    }
    let table = this.gtCache.get(gtOffset);
    if (!table) {
      const bytes = await readExactly(this.source.handle, gtBytes, gtOffset, this.source.path, 'VMDK grain table');
      table = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
      this.gtCache.set(gtOffset, table);
    }
    return table;
  }

  /**
   * `check` of this extent's first `length` guest bytes: its metadata, every grain table the
   * GD names and every grain they map are claimed in `space`; a grain past the end of the file
   * is qemu's "points after EOF".
   */
  async checkStructures(check: StructureCheck, space: HostSpace, guestStart: number, length: number): Promise<void> {
    const { layout, header } = this;
    const grainBytes = this.clusterSize;
    const gtBytes = header.gtEntries * 4;
    space.claim(space.group('VMDK header', SECTOR), 0, () => 'the header');
    if (layout.descriptor) space.claim(space.group('embedded descriptor', layout.descriptor.length), layout.descriptor.offset, () => 'the embedded descriptor');
    space.claim(space.group('grain directory', this.gd.byteLength), layout.gdOffset, () => 'the grain directory');
    if (layout.redundantGdOffset !== undefined) space.claim(space.group('redundant grain directory', this.gd.byteLength), layout.redundantGdOffset, () => 'the redundant grain directory');
    if (layout.footerOffset !== undefined) space.claim(space.group('footer', 3 * SECTOR), layout.footerOffset, () => 'the footer');
    const tableGroup = space.group('grain table', gtBytes);
    // A compressed grain's length is in its marker; claiming its first sector still catches two
    // entries naming one grain, and grains inside tables.
    const grainGroup = this.compressed ? space.group('compressed grain', SECTOR) : space.group('grain', grainBytes);
    const zeroGrains = (header.flags & FLAG_ZERO_GRAIN) !== 0;
    const grains = Math.ceil(length / grainBytes);
    for (let gdIndex = 0; gdIndex * header.gtEntries < grains; gdIndex++) {
      const gtSector = this.gd.getUint32(gdIndex * 4, true);
      if (gtSector === 0) continue;
      // qemu reads a table past the end of the file as zeros (all unallocated); we refuse to read
      // through it, so it is a corruption here.
      if (!space.claim(tableGroup, gtSector * SECTOR, () => `grain table ${gdIndex} (sector ${gtSector})`) || gtSector * SECTOR + gtBytes > this.source.size) continue;
      const table = (await this.table(gdIndex))!;
      const last = Math.min(header.gtEntries, grains - gdIndex * header.gtEntries);
      for (let i = 0; i < last; i++) {
        const entry = table.getUint32(i * 4, true);
        if (entry === 0 || (entry === 1 && zeroGrains)) continue;
        const grain = gdIndex * header.gtEntries + i;
        const guestSector = (guestStart + grain * grainBytes) / SECTOR;
        const host = entry * SECTOR;
        const kept = space.claim(grainGroup, host, () => `grain ${grain} (guest sector ${guestSector}, host sector ${entry})`, {
          pastEnd: () => `ERROR: cluster offset for sector ${guestSector} points after EOF`,
          // As in qemu, only the start counts: a last grain partly written reads its tail as zeros.
          tolerateTail: true,
        });
        if (kept) check.allocated(host, this.compressed ? SECTOR : grainBytes, this.compressed);
      }
    }
  }

  /**
   * `length` bytes of the file at `offset`, through a read-ahead window: two reads per grain (its
   * marker, then its stream), each a thread-pool round trip, left a 2 GiB image's conversion
   * waiting on reads more than half the time; one read per 1 MiB of grains does not.
   */
  private async compressedBytes(offset: number, length: number, what: string): Promise<Uint8Array> {
    const ahead = this.ahead;
    if (ahead && offset >= ahead.offset && offset + length <= ahead.offset + ahead.bytes.length) {
      return ahead.bytes.subarray(offset - ahead.offset, offset - ahead.offset + length);
    }
    const size = Math.max(length, Math.min(GRAIN_READ_AHEAD, this.source.size - offset));
    const bytes = await readExactly(this.source.handle, size, offset, this.source.path, what);
    this.ahead = { offset, bytes };
    return bytes.subarray(0, length);
  }

  /** The grain whose marker (or stream) starts at byte `offset`, inflated (the last one is cached). */
  async decompressedCluster(offset: number): Promise<Uint8Array> {
    if (this.lastGrain?.offset === offset) return this.lastGrain.bytes;
    const grainBytes = this.clusterSize;
    let dataOffset = offset;
    let size = Math.min(grainBytes * 2, Math.max(0, this.source.size - offset));
    if ((this.header.flags & FLAG_MARKERS) !== 0) {
      const marker = await this.compressedBytes(offset, 12, 'VMDK grain marker');
      size = new DataView(marker.buffer, marker.byteOffset, 12).getUint32(8, true);
      dataOffset = offset + 12;
      if (size === 0 || size > grainBytes * 2 + 1024) {
        throw new CorruptImageError(`The grain marker at byte ${offset} of '${this.source.path}' gives a compressed size of ${size} for a ${grainBytes}-byte grain`, { structure: 'VMDK grain marker', offset });
      }
    }
    if (dataOffset + size > this.source.size) {
      throw new CorruptImageError(`The compressed grain at byte ${offset} of '${this.source.path}' (${size} bytes) runs past the end of the file`, { structure: 'VMDK grain', offset });
    }
    const compressed = await this.compressedBytes(dataOffset, size, 'VMDK compressed grain');
    const out = inflateGrain(compressed, grainBytes, this.source.path, offset);
    this.lastGrain = { offset, bytes: out };
    return out;
  }
}

/** One extent of the disk, in guest order. */
interface Extent {
  start: number;
  length: number;
  kind: 'flat' | 'sparse' | 'zero';
  source: ByteSource | undefined;
  /** flat: byte offset of the extent's data in its file. */
  offset: number;
  sparse: SparseExtent | undefined;
}

class VmdkImage extends BaseImage implements CheckableImage {
  readonly format = 'vmdk' as const;
  readonly header = undefined;
  readonly dataFilePath = undefined;
  readonly virtualSize: number;
  readonly clusterSize: number;

  constructor(
    path: string,
    warnings: string[],
    private readonly parts: Extent[],
    private readonly sources: ByteSource[],
    readonly backing: BaseImage | undefined,
  ) {
    super(path, warnings);
    this.virtualSize = parts.reduce((n, e) => n + e.length, 0);
    this.clusterSize = parts.find((e) => e.sparse)?.sparse?.clusterSize ?? 64 * 1024;
  }

  async *segments(start: number, end: number): AsyncGenerator<Segment> {
    yield* throughBacking(this.ownSegments(start, end), this.backing);
  }

  private async *ownSegments(start: number, end: number): AsyncGenerator<Segment> {
    for (const part of this.parts) {
      const partEnd = part.start + part.length;
      if (partEnd <= start) continue;
      if (part.start >= end) break;
      const from = Math.max(start, part.start);
      const to = Math.min(end, partEnd);
      if (part.kind === 'zero') {
        yield plain(from, to - from, 'zero');
      } else if (part.kind === 'flat') {
        yield { start: from, length: to - from, kind: 'data', depth: 0, source: part.source, hostOffset: part.offset + (from - part.start), compressed: undefined };
      } else {
        yield* this.sparseSegments(part, from, to);
      }
    }
  }

  private async *sparseSegments(part: Extent, from: number, to: number): AsyncGenerator<Segment> {
    const sparse = part.sparse!;
    const grainBytes = sparse.clusterSize;
    const perTable = sparse.header.gtEntries;
    const zeroGrains = (sparse.header.flags & FLAG_ZERO_GRAIN) !== 0;
    const kindOf = (entry: number) => (entry === 0 ? 'unallocated' : entry === 1 && zeroGrains ? 'zero' : 'data');
    for (let pos = from; pos < to; ) {
      const gdIndex = Math.floor((pos - part.start) / (grainBytes * perTable));
      const tableEnd = Math.min(to, part.start + (gdIndex + 1) * perTable * grainBytes);
      const table = await sparse.table(gdIndex);
      if (!table) {
        // No grain table: every grain it would map is unallocated, in one step.
        yield plain(pos, tableEnd - pos, 'unallocated');
        pos = tableEnd;
        continue;
      }
      // The grains of one table, walked without awaiting; runs of holes are one segment.
      while (pos < tableEnd) {
        const grain = Math.floor((pos - part.start) / grainBytes);
        const grainStart = part.start + grain * grainBytes;
        const entry = table.getUint32((grain % perTable) * 4, true);
        const kind = kindOf(entry);
        if (kind !== 'data') {
          let runEnd = Math.min(tableEnd, grainStart + grainBytes);
          for (let next = grain + 1; runEnd < tableEnd && kindOf(table.getUint32((next % perTable) * 4, true)) === kind; next++) {
            runEnd = Math.min(tableEnd, part.start + (next + 1) * grainBytes);
          }
          yield plain(pos, runEnd - pos, kind);
          pos = runEnd;
          continue;
        }
        const grainEnd = Math.min(tableEnd, grainStart + grainBytes);
        const host = entry * SECTOR;
        if (host >= sparse.source.size) {
          throw new CorruptImageError(`Grain ${grain} of '${sparse.source.path}' points at sector ${entry}, past the end of the file`, { structure: 'VMDK grain table' });
        }
        if (sparse.compressed) {
          yield { start: pos, length: grainEnd - pos, kind: 'data', depth: 0, source: sparse.source, hostOffset: host, compressed: { layer: sparse, size: 0 } };
        } else {
          yield { start: pos, length: grainEnd - pos, kind: 'data', depth: 0, source: sparse.source, hostOffset: host + (pos - grainStart), compressed: undefined };
        }
        pos = grainEnd;
      }
    }
  }

  /** `check`: each extent's tables and grains, and flat extents against their files. */
  async checkStructures(check: StructureCheck): Promise<boolean> {
    const spaces = new Map<ByteSource, HostSpace>();
    const spaceOf = (source: ByteSource) => {
      let space = spaces.get(source);
      if (!space) spaces.set(source, (space = check.space(source.path, source.size)));
      return space;
    };
    check.result.totalClusters = Math.ceil(this.virtualSize / this.clusterSize);
    check.result.imageEndOffset = this.sources[0]?.size ?? 0;
    for (const part of this.parts) {
      if (part.length === 0) continue;
      if (part.kind === 'sparse') {
        await part.sparse!.checkStructures(check, spaceOf(part.source!), part.start, part.length);
      } else if (part.kind === 'flat') {
        const source = part.source!;
        const space = spaceOf(source);
        const sector = part.start / SECTOR;
        const kept = space.claim(space.group('flat extent', part.length), part.offset, () => `the flat extent at guest sector ${sector}`, {
          pastEnd: () => `ERROR: cluster offset for sector ${sector} points after EOF`,
          tolerateTail: true,
        });
        if (kept && part.offset + part.length > source.size) {
          check.warning('flat extent', part.offset, `The flat extent at guest sector ${sector} ends past the end of '${source.path}' (${source.size} bytes); its last ${part.offset + part.length - source.size} bytes read as zeros`);
        }
        if (kept) check.allocated(part.offset, part.length, false, Math.ceil(part.length / this.clusterSize));
      }
    }
    return true;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    for (const source of this.sources) await source.handle.close().catch(() => {});
    await this.backing?.close();
  }
}

/**
 * The checks of a sparse header's geometry that a file and a stream share: grain size, grain
 * table size, capacity, compression, and the grain directory that capacity needs (at most
 * {@link MAX_GD_BYTES}, which bounds the capacity a header may declare). Returns the GD's bytes.
 */
function checkSparseGeometry(header: SparseHeader, path: string): number {
  const corrupt = (message: string, field: string) => new CorruptImageError(`${message} (in '${path}')`, { structure: 'VMDK header', field });
  if (header.grainSectors < 1 || header.grainSectors * SECTOR > MAX_GRAIN_BYTES || (header.grainSectors & (header.grainSectors - 1)) !== 0) {
    throw corrupt(`The grain size of ${header.grainSectors} sectors is not a power of two up to ${MAX_GRAIN_BYTES / SECTOR}`, 'grainSize');
  }
  if (header.gtEntries < 1 || header.gtEntries > MAX_GT_ENTRIES) throw corrupt(`A grain table of ${header.gtEntries} entries is outside 1..${MAX_GT_ENTRIES}`, 'numGTEsPerGT');
  if (header.capacitySectors < 0 || header.capacitySectors * SECTOR > Number.MAX_SAFE_INTEGER) throw corrupt(`The capacity ${header.capacitySectors} sectors is impossible`, 'capacity');
  if ((header.flags & FLAG_COMPRESSED) !== 0 && header.compressAlgorithm !== COMPRESSION_DEFLATE) {
    throw new UnsupportedFeatureError(`'${path}' compresses grains with algorithm ${header.compressAlgorithm}; only deflate (1) is read`, { structure: 'VMDK header', field: 'compressAlgorithm' });
  }
  const gdEntries = Math.ceil(header.capacitySectors / (header.grainSectors * header.gtEntries));
  const gdBytes = gdEntries * 4;
  if (gdBytes > MAX_GD_BYTES) {
    throw new LimitExceededError(`The grain directory of '${path}' has ${gdEntries} entries (${gdBytes} bytes), above the ${MAX_GD_BYTES}-byte limit`, {
      structure: 'VMDK header',
      field: 'capacity',
      limit: MAX_GD_BYTES,
      actual: gdBytes,
    });
  }
  return gdBytes;
}

/** Checks a sparse header and reads its grain directory (from the footer copy for streamOptimized). */
async function openSparse(source: ByteSource, path: string): Promise<{ sparse: SparseExtent; descriptor: string | undefined }> {
  const first = decodeSparseHeader(await readExactly(source.handle, SECTOR, 0, path, 'VMDK header'), path);
  let header = first;
  const corrupt = (message: string, field: string) => new CorruptImageError(`${message} (in '${path}')`, { structure: 'VMDK header', field });
  if (first.version < 1 || first.version > 3) {
    throw new UnsupportedFeatureError(`'${path}' is VMDK sparse version ${first.version}; versions 1 to 3 are read`, { structure: 'VMDK header', field: 'version' });
  }
  if (first.gdOffset === -1) {
    // streamOptimized: the header with the real GD offset is in the footer, before the EOS marker.
    if (source.size < 4 * SECTOR) throw corrupt('The file is too short for the footer its header promises', 'gdOffset');
    const tail = await readExactly(source.handle, 3 * SECTOR, source.size - 3 * SECTOR, path, 'VMDK footer');
    const marker = new DataView(tail.buffer, tail.byteOffset, 3 * SECTOR);
    if (marker.getUint32(8, true) !== 0 || marker.getUint32(12, true) !== MARKER_FOOTER || marker.getUint32(2 * SECTOR + 12, true) !== MARKER_EOS) {
      throw corrupt('The header puts the grain directory at the end, but the file does not end in a footer marker, a header and an end-of-stream marker', 'gdOffset');
    }
    header = decodeSparseHeader(tail.subarray(SECTOR, 2 * SECTOR), path);
  }
  const gdBytes = checkSparseGeometry(header, path);
  if (header.gdOffset < 0 || header.gdOffset * SECTOR + gdBytes > source.size) {
    throw corrupt(`The grain directory (${gdBytes} bytes at sector ${header.gdOffset}) lies outside the file (${source.size} bytes)`, 'gdOffset');
  }
  const gdRaw = gdBytes === 0 ? new Uint8Array(0) : await readExactly(source.handle, gdBytes, header.gdOffset * SECTOR, path, 'VMDK grain directory');
  let descriptor: string | undefined;
  if (first.descriptorOffset > 0 && first.descriptorSize > 0) {
    const bytes = first.descriptorSize * SECTOR;
    if (bytes > MAX_DESCRIPTOR_BYTES) {
      throw new LimitExceededError(`The embedded descriptor of '${path}' is ${bytes} bytes, above the ${MAX_DESCRIPTOR_BYTES}-byte limit`, { structure: 'VMDK header', field: 'descriptorSize', limit: MAX_DESCRIPTOR_BYTES, actual: bytes });
    }
    if (first.descriptorOffset * SECTOR + bytes > source.size) throw corrupt('The embedded descriptor lies outside the file', 'descriptorOffset');
    const raw = await readExactly(source.handle, bytes, first.descriptorOffset * SECTOR, path, 'VMDK descriptor');
    const nul = raw.indexOf(0);
    descriptor = Buffer.from(raw.subarray(0, nul < 0 ? raw.length : nul)).toString('utf8');
  }
  const layout: SparseLayout = {
    descriptor: descriptor === undefined ? undefined : { offset: first.descriptorOffset * SECTOR, length: first.descriptorSize * SECTOR },
    gdOffset: header.gdOffset * SECTOR,
    redundantGdOffset: (header.flags & FLAG_REDUNDANT_GD) !== 0 && header.rgdOffset > 0 ? header.rgdOffset * SECTOR : undefined,
    footerOffset: first.gdOffset === -1 ? source.size - 3 * SECTOR : undefined,
  };
  return { sparse: new SparseExtent(source, header, new DataView(gdRaw.buffer, gdRaw.byteOffset, gdRaw.byteLength), layout), descriptor };
}

/**
 * Opens a VMDK at `path`: a sparse file (monolithicSparse, streamOptimized, with its parent if
 * it names one) or a descriptor file and the extents it lists. `explicitParent` replaces the
 * stored parent name (the caller chose it).
 */
export async function openVmdk(path: string, context: OpenContext, depth = 0, explicitParent?: string): Promise<DiskImage> {
  const maxDepth = context.options.maxChainDepth ?? 16;
  if (depth > maxDepth) {
    throw new LimitExceededError(`The VMDK parent chain is deeper than ${maxDepth} images (at '${path}')`, { structure: 'backing chain', limit: maxDepth, actual: depth });
  }
  const sources: ByteSource[] = [];
  let parent: BaseImage | undefined;
  const policy = context.options.allowUnsafePaths === undefined ? {} : { allowUnsafePaths: context.options.allowUnsafePaths };
  const openSource = async (file: string, label: string, stored = context.storedNames.get(file)) => {
    const opened = await openSeekable(file, label, stored);
    const source = new ByteSource(opened.handle, file, opened.size, label, context.warn);
    sources.push(source);
    return source;
  };
  try {
    const main = await openSource(path, 'image file');
    const head = await readExactly(main.handle, Math.min(4, main.size), 0, path, 'VMDK header');
    const magic = head.length === 4 ? new DataView(head.buffer, head.byteOffset, 4).getUint32(0, true) : 0;
    let descriptor: Descriptor;
    const parts: Extent[] = [];
    if (magic === VMDK4_MAGIC || magic === VMDK3_MAGIC) {
      const { sparse, descriptor: text } = await openSparse(main, path);
      descriptor = text === undefined ? { createType: undefined, parentCID: undefined, parentFileNameHint: undefined, extents: [] } : parseDescriptor(text, path);
      parts.push({ start: 0, length: sparse.header.capacitySectors * SECTOR, kind: 'sparse', source: main, offset: 0, sparse });
    } else {
      if (main.size > MAX_DESCRIPTOR_BYTES) {
        throw new LimitExceededError(`'${path}' is ${main.size} bytes, too large for a VMDK descriptor (limit ${MAX_DESCRIPTOR_BYTES})`, { structure: 'VMDK descriptor', limit: MAX_DESCRIPTOR_BYTES, actual: main.size });
      }
      const text = Buffer.from(await readExactly(main.handle, main.size, 0, path, 'VMDK descriptor')).toString('utf8');
      descriptor = parseDescriptor(text, path);
      if (descriptor.extents.length === 0) throw new CorruptImageError(`The VMDK descriptor '${path}' lists no extents`, { structure: 'VMDK descriptor' });
      let start = 0;
      for (const line of descriptor.extents) {
        const length = line.sectors * SECTOR;
        if (line.type === 'ZERO') {
          parts.push({ start, length, kind: 'zero', source: undefined, offset: 0, sparse: undefined });
        } else if (line.type === 'FLAT' || line.type === 'VMFS' || line.type === 'SPARSE') {
          if (line.file === undefined) throw new CorruptImageError(`A ${line.type} extent of '${path}' names no file`, { structure: 'VMDK descriptor' });
          const file = await resolveStoredName(path, line.file, 'extent file', policy);
          const source = await openSource(file, 'extent file', 'extent file');
          if (line.type === 'SPARSE') {
            const { sparse } = await openSparse(source, file);
            if (sparse.header.capacitySectors < line.sectors) {
              throw new CorruptImageError(`The sparse extent '${file}' holds ${sparse.header.capacitySectors} sectors, but the descriptor gives it ${line.sectors}`, { structure: 'VMDK descriptor' });
            }
            if (sparse.compressed && start % sparse.clusterSize !== 0) {
              throw new UnsupportedFeatureError(`The compressed extent '${file}' does not start on a grain boundary`, { structure: 'VMDK descriptor' });
            }
            parts.push({ start, length, kind: 'sparse', source, offset: 0, sparse });
          } else {
            parts.push({ start, length, kind: 'flat', source, offset: line.offset * SECTOR, sparse: undefined });
          }
        } else {
          throw new UnsupportedFeatureError(`'${path}' has a ${line.type} extent; FLAT, SPARSE, ZERO and VMFS extents are read`, { structure: 'VMDK descriptor', features: [`${line.type} extent`] });
        }
        start += length;
        if (start > Number.MAX_SAFE_INTEGER / 2) throw new CorruptImageError(`The extents of '${path}' add up to an impossible size`, { structure: 'VMDK descriptor' });
      }
    }
    const hasParent = descriptor.parentCID !== undefined && descriptor.parentCID.toLowerCase() !== 'ffffffff';
    if (explicitParent !== undefined || (hasParent && !context.options.withoutParents)) {
      if (explicitParent === undefined && !descriptor.parentFileNameHint) {
        throw new UnsupportedFeatureError(`'${path}' has a parent disk but does not name it`, { structure: 'VMDK descriptor', hint: 'Pass the parent with --backing PATH (API: backing)' });
      }
      const parentPath = explicitParent ?? (await resolveStoredName(path, descriptor.parentFileNameHint!, 'parent disk', policy));
      if (explicitParent === undefined) context.storedNames.set(parentPath, 'parent disk');
      const chain = [...context.chain, await realpath(path).catch(() => resolve(path))];
      if (chain.includes(await realpath(parentPath).catch(() => resolve(parentPath)))) {
        throw new CorruptImageError(`The VMDK parent chain loops: '${parentPath}' is this disk or one above it`, { structure: 'VMDK descriptor' });
      }
      parent = (await openVmdk(parentPath, { ...context, chain }, depth + 1)) as BaseImage;
    }
    return new VmdkImage(path, context.warnings, parts, sources, parent);
  } catch (err) {
    await parent?.close();
    for (const source of sources) await source.handle.close().catch(() => {});
    throw err;
  }
}

/** Sequential bytes, as a stream parser reads them. */
export interface SequentialBytes {
  /** Exactly `length` bytes, or fewer only at the end of the input. */
  read(length: number): Promise<Uint8Array>;
  /** Skips `length` bytes; false when the input ended first. */
  skip(length: number): Promise<boolean>;
}

/** The most metadata sectors a stream marker may announce (a GD or GT of the largest disk). */
const MAX_MARKER_SECTORS = MAX_GD_BYTES / SECTOR;

/**
 * A streamOptimized VMDK read front to back (a pipe): the header, then each grain marker's
 * inflated grain with its guest offset, in file order. Metadata markers (GT, GD, footer) are
 * skipped; the end-of-stream marker (or the end of the input) ends it. Memory is one grain.
 * `header` is called once with the disk's capacity before the first grain.
 */
/**
 * Reads what follows the end-of-stream marker (a writer's padding) up to a bound, so that the
 * program feeding a pipe (`cat disk.vmdk |`) is not cut off with EPIPE; past the bound the rest
 * is left unread, as a hostile endless stream must be.
 */
async function drainTail(input: SequentialBytes): Promise<void> {
  const TAIL_LIMIT = 16 * 1024 * 1024;
  for (let drained = 0; drained < TAIL_LIMIT; ) {
    const chunk = await input.read(64 * 1024);
    if (chunk.length === 0) return;
    drained += chunk.length;
  }
}

export async function* streamOptimizedGrains(input: SequentialBytes, name: string, onHeader: (header: SparseHeader) => void): AsyncGenerator<{ offset: number; data: Uint8Array }> {
  const first = await input.read(SECTOR);
  if (first.length < SECTOR) throw new CorruptImageError(`'${name}' ends inside the VMDK header`, { structure: 'VMDK header', offset: 0 });
  const header = decodeSparseHeader(first, name);
  const view = new DataView(first.buffer, first.byteOffset, SECTOR);
  const overhead = u64le(view, 64);
  const notStream = (why: string) =>
    new UnsupportedFeatureError(`'${name}' cannot be read as a stream: ${why}`, { structure: 'VMDK header', hint: 'Write the input to a file first, then convert the file' });
  if ((header.flags & FLAG_COMPRESSED) === 0 || (header.flags & FLAG_MARKERS) === 0) throw notStream('only a streamOptimized VMDK (compressed grains with markers) is read from a pipe');
  if (header.compressAlgorithm !== COMPRESSION_DEFLATE) throw notStream(`grains are compressed with algorithm ${header.compressAlgorithm}`);
  // The same geometry checks as a file's: without them a 512-byte header could declare petabytes
  // of holes, every 32 MiB of which the stream then yields as a zero run (a hang in all but name).
  checkSparseGeometry(header, name);
  if (overhead < 1 || overhead > MAX_MARKER_SECTORS) throw new CorruptImageError(`The header's overhead of ${overhead} sectors is outside 1..${MAX_MARKER_SECTORS} (in '${name}')`, { structure: 'VMDK header', field: 'overHead' });
  onHeader(header);
  const grainBytes = header.grainSectors * SECTOR;
  const capacity = header.capacitySectors * SECTOR;
  let position = SECTOR;
  const skipTo = async (target: number) => {
    if (!(await input.skip(target - position))) throw new CorruptImageError(`'${name}' ends at byte ${position}, before the data its header announces`, { structure: 'VMDK stream', offset: position });
    position = target;
  };
  await skipTo(overhead * SECTOR);
  let lastEnd = 0;
  for (;;) {
    const markerBytes = await input.read(SECTOR);
    if (markerBytes.length === 0) return; // the end of the input: qemu's writer ends without an EOS marker
    if (markerBytes.length < SECTOR) throw new CorruptImageError(`'${name}' ends inside a marker at byte ${position}`, { structure: 'VMDK stream', offset: position });
    const marker = new DataView(markerBytes.buffer, markerBytes.byteOffset, SECTOR);
    const value = u64le(marker, 0);
    const size = marker.getUint32(8, true);
    if (size === 0) {
      const type = marker.getUint32(12, true);
      position += SECTOR;
      if (type === MARKER_EOS) {
        await drainTail(input);
        return;
      }
      if (type !== MARKER_GT && type !== MARKER_GD && type !== MARKER_FOOTER) {
        throw new CorruptImageError(`Unknown VMDK stream marker type ${type} at byte ${position - SECTOR} of '${name}'`, { structure: 'VMDK stream', offset: position - SECTOR });
      }
      if (value < 0 || value > MAX_MARKER_SECTORS) throw new CorruptImageError(`A VMDK stream marker at byte ${position - SECTOR} announces ${value} sectors`, { structure: 'VMDK stream', offset: position - SECTOR });
      await skipTo(position + value * SECTOR);
      continue;
    }
    if (size > grainBytes * 2 + 1024) {
      throw new CorruptImageError(`The grain marker at byte ${position} of '${name}' gives a compressed size of ${size} for a ${grainBytes}-byte grain`, { structure: 'VMDK grain marker', offset: position });
    }
    const lba = value * SECTOR;
    if (value < 0 || lba % grainBytes !== 0 || lba >= capacity) {
      throw new CorruptImageError(`The grain marker at byte ${position} of '${name}' is for sector ${value}, not a grain of the disk`, { structure: 'VMDK grain marker', offset: position });
    }
    if (lba < lastEnd) {
      throw new UnsupportedFeatureError(`The grains of '${name}' are not in disk order (sector ${value} after ${lastEnd / SECTOR}), so it cannot be read as a stream`, {
        structure: 'VMDK stream',
        hint: 'Write the input to a file first, then convert the file',
      });
    }
    const total = Math.ceil((12 + size) / SECTOR) * SECTOR;
    const rest = await input.read(total - SECTOR);
    if (rest.length < total - SECTOR) throw new CorruptImageError(`'${name}' ends inside the grain at byte ${position}`, { structure: 'VMDK grain', offset: position });
    const compressed = new Uint8Array(total - 12);
    compressed.set(markerBytes.subarray(12));
    compressed.set(rest, SECTOR - 12);
    const length = Math.min(grainBytes, capacity - lba);
    const out = inflateGrain(compressed.subarray(0, size), grainBytes, name, position);
    yield { offset: lba, data: out.subarray(0, length) };
    lastEnd = lba + length;
    position += total;
  }
}
