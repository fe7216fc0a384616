/**
 * The qcow2 reader: a qcow2 image (with its data file and backing chain) as a random-access
 * object over file handles.
 *
 * It follows qemu's read path (qcow2_get_host_offset, digest §6.1): L1 → L2 (through a bounded
 * LRU cache) → classify the entry → zeros, backing, decompressed bytes, or bytes of the image
 * file or of the external data file. Everything it reads from an image is checked before it is
 * used (table sizes against qemu's limits and the file size, offsets for alignment and range,
 * the data-file rules), so a hostile image ends in a typed error, not a hang or a huge
 * allocation. Names stored in an image go through the path policy (src/io/path-policy.ts).
 *
 * Extents come out of a generator, coalesced (adjacent ranges of the same kind, layer and
 * contiguous host offsets merge), so a long unallocated or zero range is one object, not one per
 * cluster.
 */


import { realpath } from 'node:fs/promises';
import { resolve } from 'node:path';
import {
  AUTOCLEAR_DATA_FILE_RAW,
  decodeHeaderFields,
  decodeL2Entry,
  HEADER_PROBE_SIZE,
  imageGeometry,
  INCOMPAT_CORRUPT,
  INCOMPAT_DATA_FILE,
  INCOMPAT_DIRTY,
  INCOMPAT_EXTL2,
  L1_RESERVED_MASK_HI,
  L1_RESERVED_MASK_LO,
  MAX_L1_BYTES,
  MAX_REFTABLE_BYTES,
  MAX_SNAPSHOTS,
  OFFSET_MASK_HI,
  OFFSET_MASK_LO,
  parseHeader,
  SUBCLUSTERS,
  subclusterType,
  type Geometry,
  type L2Context,
  type L2Entry,
  type ParsedHeader,
} from '../format/index.js';
import {
  CorruptImageError,
  fileError,
  InvalidArgumentError,
  LimitExceededError,
  UnexpectedEofError,
  UnsupportedFeatureError,
} from '../errors.js';
import { readExactly, readFully, type ReadHandle } from '../io/files.js';
import { resolveStoredName } from '../io/path-policy.js';
import { LruCache } from './cache.js';
import { decompressCluster } from './decompress.js';
import { BaseImage, ByteSource, canMerge, openSeekable, plain, type OpenContext, type SeekableFile, type Segment } from './base-image.js';
import { DEFAULT_MAX_CHAIN_DEPTH, MAX_CHAIN_L1_BYTES } from '../format/constants.js';
import type { ImageFormat, OpenImageOptions } from './image.js';
import { probeFormat } from './probe.js';
import { openRaw } from './raw-reader.js';

const DEFAULT_L2_CACHE_BYTES = 8 * 1024 * 1024;
/** Backing images keep this fraction of the top image's L2 cache: reads mostly hit the top. */
const BACKING_L2_CACHE_SHARE = 8;
const MIN_L2_CACHE_TABLES = 4;
/** Buffers of evicted L2 tables kept for the next table reads. */
const SPARE_L2_TABLES = 4;

export class Qcow2Image extends BaseImage {
  readonly format = 'qcow2' as const;
  readonly virtualSize: number;
  readonly clusterSize: number;
  readonly geometry: Geometry;
  private readonly l2Context: L2Context;
  private readonly l2Cache: LruCache<DataView>;
  /**
   * A walk of a huge image reads every L2 table once (a data-file image with the raw bit has
   * them all: 2,048 tables, 128 MiB, per TiB). A fresh buffer per table left that much garbage
   * outside the JS heap between collections, and peak RSS grew with the virtual size; an evicted
   * table's buffer is reused instead, unless a segment walk still holds it (`heldL2`).
   */
  private readonly spareL2: Uint8Array[] = [];
  /** L2 tables a segment walk is iterating, with how many walks hold each: never reused while held. */
  private readonly heldL2 = new Map<DataView, number>();
  /** Held tables the cache has let go of: spare once released. */
  private readonly evictedHeldL2 = new Set<DataView>();
  /** L2 buffers allocated so far (the rest were reused); for tests. @internal */
  l2Allocations = 0;
  private lastCompressed: { offset: number; bytes: Uint8Array } | undefined;

  constructor(
    path: string,
    warnings: string[],
    readonly header: ParsedHeader,
    private readonly image: ByteSource,
    /** The active L1 entries the virtual size needs (qemu ignores the rest). */
    private readonly l1: DataView,
    /** Where data clusters live: the external data file, or the image itself. */
    private readonly dataSource: ByteSource,
    readonly backing: BaseImage | undefined,
    l2CacheBytes: number,
  ) {
    super(path, warnings);
    // qemu counts whole sectors (total_sectors = size / 512): a size that is not a multiple of
    // 512, which only an odd or hostile header has, reads as the sectors it holds.
    this.virtualSize = header.size - (header.size % 512);
    this.clusterSize = header.clusterSize;
    const extendedL2 = (header.incompatibleFeatures & INCOMPAT_EXTL2) !== 0n;
    this.geometry = imageGeometry(header.size, header.clusterBits, extendedL2);
    this.l2Context = { clusterBits: header.clusterBits, dataFile: this.hasDataFile, extendedL2 };
    this.l2Cache = new LruCache(Math.max(MIN_L2_CACHE_TABLES, Math.floor(l2CacheBytes / header.clusterSize)), (view) => {
      // A table still being walked is reused once its last walk lets go of it.
      if (this.heldL2.has(view)) this.evictedHeldL2.add(view);
      else this.spareL2Buffer(view);
    });
  }

  get hasDataFile(): boolean {
    return (this.header.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0n;
  }

  get dataFilePath(): string | undefined {
    return this.hasDataFile ? this.dataSource.path : undefined;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.l2Cache.clear();
    await this.image.handle.close().catch(() => {});
    if (this.dataSource !== this.image) await this.dataSource.handle.close().catch(() => {});
    await this.backing?.close();
  }

  /** Own segments, with unallocated ranges resolved through the backing chain. */
  async *segments(start: number, end: number): AsyncGenerator<Segment> {
    for await (const seg of this.ownSegments(start, end)) {
      if (seg.kind !== 'unallocated' || !this.backing) {
        yield seg;
        continue;
      }
      // Unallocated here: the backing answers, up to its own size; past it the range reads as
      // zeros and qemu reports it at this layer (depth 0).
      const segEnd = seg.start + seg.length;
      const backingEnd = Math.min(segEnd, this.backing.virtualSize);
      if (seg.start < backingEnd) {
        for await (const below of this.backing.segments(seg.start, backingEnd)) yield { ...below, depth: below.depth + 1 };
      }
      const tail = Math.max(seg.start, backingEnd);
      if (tail < segEnd) yield { ...seg, start: tail, length: segEnd - tail };
    }
  }

  /** This layer's view of [start, end): one segment per cluster or subcluster run at most. */
  private async *ownSegments(start: number, end: number): AsyncGenerator<Segment> {
    const { clusterSize, bytesPerL2, l2Entries, l2EntrySize, extendedL2 } = this.geometry;
    let pos = start;
    while (pos < end) {
      const l1Index = Math.floor(pos / bytesPerL2);
      const tableEnd = Math.min(end, (l1Index + 1) * bytesPerL2);
      const l2Offset = this.l2OffsetAt(l1Index);
      if (l2Offset === 0) {
        yield plain(pos, tableEnd - pos, 'unallocated');
        pos = tableEnd;
        continue;
      }
      const table = await this.acquireL2(l2Offset, l1Index);
      try {
        // Runs of equal entries are merged here already, so a fully allocated table of a data-file
        // image yields one segment instead of thousands.
        let run: Segment | undefined;
        while (pos < tableEnd) {
          const guestCluster = Math.floor(pos / clusterSize);
          const clusterStart = guestCluster * clusterSize;
          const clusterEnd = Math.min(clusterStart + clusterSize, tableEnd);
          const entryPos = (guestCluster % l2Entries) * l2EntrySize;
          const entry = decodeL2Entry(table, entryPos, this.l2Context);
          this.validateEntry(entry, clusterStart, l2Offset + entryPos);
          const pieces: Segment[] = [];
          if (!extendedL2 || entry.type === 'compressed') {
            if (extendedL2 && subclusterType(entry, 0) === 'invalid') {
              throw this.corrupt(`Compressed L2 entry for guest offset ${clusterStart} has a non-zero subcluster bitmap`, l2Offset + entryPos);
            }
            pieces.push(this.segmentFor(entry.type, pos, clusterEnd - pos, entry, clusterStart));
          } else {
            const subSize = clusterSize / SUBCLUSTERS;
            for (let sub = Math.floor((pos - clusterStart) / subSize); sub < SUBCLUSTERS; sub++) {
              const subStart = Math.max(pos, clusterStart + sub * subSize);
              const subEnd = Math.min(clusterEnd, clusterStart + (sub + 1) * subSize);
              if (subStart >= subEnd) break;
              const type = subclusterType(entry, sub);
              if (type === 'invalid') {
                throw this.corrupt(`Extended L2 entry for guest offset ${clusterStart}: subcluster ${sub} is both allocated and zero, or allocated without a host cluster`, l2Offset + entryPos);
              }
              // UNALLOCATED_ALLOC (host cluster present, both bits clear) reads the backing or
              // zeros, never the host cluster (pitfall P15).
              // qemu's map still reports the host offset of such a subcluster, and of a zero one.
              const hosted = entry.type === 'normal';
              const kind = type === 'data' ? 'normal' : type === 'zero' ? (hosted ? 'zero-alloc' : 'zero-plain') : hosted ? 'unallocated-alloc' : 'unallocated';
              pieces.push(this.segmentFor(kind, subStart, subEnd - subStart, entry, clusterStart));
            }
          }
          for (const piece of pieces) {
            if (run && canMerge(run, piece)) run.length += piece.length;
            else {
              if (run) yield run;
              run = piece;
            }
          }
          pos = clusterEnd;
        }
        if (run) yield run;
      } finally {
        this.releaseL2(table);
      }
    }
  }

  private segmentFor(type: L2Entry['type'] | 'unallocated-alloc', start: number, length: number, entry: L2Entry, clusterStart: number): Segment {
    switch (type) {
      case 'unallocated-alloc':
        return { ...plain(start, length, 'unallocated'), source: this.dataSource, hostOffset: entry.hostOffset + (start - clusterStart) };
      case 'normal':
        return { ...plain(start, length, 'data'), source: this.dataSource, hostOffset: entry.hostOffset + (start - clusterStart) };
      case 'zero-alloc':
        return { ...plain(start, length, 'zero'), source: this.dataSource, hostOffset: entry.hostOffset + (start - clusterStart) };
      case 'zero-plain':
        return plain(start, length, 'zero');
      case 'compressed':
        return { ...plain(start, length, 'data'), source: this.image, hostOffset: entry.hostOffset, compressed: { layer: this, size: entry.compressedSize } };
      case 'unallocated':
        return plain(start, length, 'unallocated');
    }
  }

  /** The rules qemu applies on its read path, plus reserved bits (we refuse what check flags). */
  private validateEntry(entry: L2Entry, clusterStart: number, entryOffset: number): void {
    if (entry.reservedBits) throw this.corrupt(`L2 entry for guest offset ${clusterStart} has reserved bits set`, entryOffset);
    if (entry.type === 'compressed') {
      if (this.hasDataFile) {
        throw this.corrupt(`Compressed cluster entry found in an image with an external data file (guest offset ${clusterStart}); the format forbids it`, entryOffset);
      }
      return;
    }
    if ((entry.type === 'zero-plain' || entry.type === 'zero-alloc') && this.header.version < 3) {
      throw this.corrupt(`Zero cluster entry found in a version 2 image (guest offset ${clusterStart}); zero flags need version 3`, entryOffset);
    }
    if (entry.type === 'normal' || entry.type === 'zero-alloc') {
      if (entry.hostOffset % this.clusterSize !== 0) {
        throw this.corrupt(`Cluster allocation offset 0x${entry.hostOffset.toString(16)} for guest offset ${clusterStart} is not cluster-aligned`, entryOffset);
      }
      if (this.hasDataFile && entry.hostOffset !== clusterStart) {
        throw this.corrupt(
          `External data file host cluster offset 0x${entry.hostOffset.toString(16)} does not match guest cluster offset 0x${clusterStart.toString(16)}; with a data file they must be equal`,
          entryOffset,
        );
      }
    }
  }

  private l2OffsetAt(l1Index: number): number {
    const pos = l1Index * 8;
    if (pos + 8 > this.l1.byteLength) return 0;
    const hi = this.l1.getUint32(pos);
    const lo = this.l1.getUint32(pos + 4);
    const at = this.header.l1TableOffset + pos;
    if ((hi & L1_RESERVED_MASK_HI) !== 0 || (lo & L1_RESERVED_MASK_LO) !== 0) {
      throw this.corrupt(`L1 entry ${l1Index} has reserved bits set`, at, 'L1 table');
    }
    const offset = (hi & OFFSET_MASK_HI) * 0x1_0000_0000 + ((lo & OFFSET_MASK_LO) >>> 0);
    if (offset === 0) return 0;
    if (offset % this.clusterSize !== 0) {
      throw this.corrupt(`L2 table offset 0x${offset.toString(16)} in L1 entry ${l1Index} is not cluster-aligned`, at, 'L1 table');
    }
    if (offset + this.clusterSize > this.image.size) {
      throw this.corrupt(`L2 table offset 0x${offset.toString(16)} in L1 entry ${l1Index} lies beyond the end of the image file (${this.image.size} bytes)`, at, 'L1 table');
    }
    return offset;
  }

  /** The L2 table at `offset`, held (not reused) until {@link releaseL2}. */
  private async acquireL2(offset: number, l1Index: number): Promise<DataView> {
    let view = this.l2Cache.get(offset);
    if (!view) {
      let bytes = this.spareL2.pop();
      if (!bytes) {
        bytes = new Uint8Array(this.clusterSize);
        this.l2Allocations++;
      }
      const got = await readFully(this.image.handle, bytes, 0, bytes.length, offset, this.path);
      if (got < bytes.length) {
        throw new UnexpectedEofError(`'${this.path}' ends inside the L2 table of L1 entry ${l1Index} (needed ${bytes.length} bytes at offset ${offset}, got ${got})`, { structure: `L2 table of L1 entry ${l1Index}`, offset });
      }
      // Another walk may have read the same table meanwhile: keep one, and this buffer for later.
      view = this.l2Cache.get(offset);
      if (view && this.spareL2.length < SPARE_L2_TABLES) this.spareL2.push(bytes);
      view ??= new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
      this.heldL2.set(view, (this.heldL2.get(view) ?? 0) + 1);
      this.l2Cache.set(offset, view);
      return view;
    }
    // Held before anything else can run: no eviction in between can hand its buffer to a read.
    this.heldL2.set(view, (this.heldL2.get(view) ?? 0) + 1);
    return view;
  }

  private releaseL2(view: DataView): void {
    const holders = (this.heldL2.get(view) ?? 1) - 1;
    if (holders > 0) {
      this.heldL2.set(view, holders);
      return;
    }
    this.heldL2.delete(view);
    if (this.evictedHeldL2.delete(view)) this.spareL2Buffer(view);
  }

  private spareL2Buffer(view: DataView): void {
    if (this.spareL2.length < SPARE_L2_TABLES) this.spareL2.push(new Uint8Array(view.buffer, view.byteOffset, view.byteLength));
  }

  /** The decompressed cluster whose stream starts at `offset` (the last one is cached). */
  async decompressedCluster(offset: number, size: number): Promise<Uint8Array> {
    if (this.lastCompressed?.offset === offset) return this.lastCompressed.bytes;
    const compressed = new Uint8Array(size);
    await this.image.readAt(offset, compressed);
    const out = new Uint8Array(this.clusterSize);
    decompressCluster(compressed, out, this.header.compressionType, offset);
    this.lastCompressed = { offset, bytes: out };
    return out;
  }

  private corrupt(message: string, offset: number, structure = 'L2 entry'): CorruptImageError {
    return new CorruptImageError(`${message} (in '${this.path}')`, { structure, offset });
  }
}

async function openByFormat(path: string, format: ImageFormat | undefined, context: OpenContext, depth: number): Promise<BaseImage> {
  checkChainDepth(path, context, depth);
  const chosen = format ?? (await probeFormat(path, { onWarning: context.warn }));
  if (chosen !== 'qcow2' && chosen !== 'raw') {
    // Never read another container as raw bytes; qcow2 chains over VMDK/VHD/VHDX are not followed.
    throw new UnsupportedFeatureError(`The backing file '${path}' is a ${chosen} image; only qcow2 and raw backing files are supported`, {
      structure: 'backing chain',
      features: [`backing format ${chosen}`],
    });
  }
  return (chosen === 'qcow2' ? openQcow2(path, context, depth) : openRaw(path, context)) as Promise<BaseImage>;
}

export async function openQcow2(
  path: string,
  context: OpenContext,
  depth: number,
  explicitDataFile?: string,
  explicitBacking?: string,
  explicitBackingFormat?: ImageFormat,
): Promise<Qcow2Image> {
  checkChainDepth(path, context, depth);
  const real = await realpath(resolve(path)).catch(() => resolve(path));
  if (context.chain.includes(real)) {
    throw new CorruptImageError(`The backing chain loops: '${path}' is its own backing image (directly or through others)`, {
      structure: 'backing chain',
    });
  }

  const file = await openSeekable(path, 'image', context.storedNames.get(path));
  const opened: ReadHandle[] = [file.handle];
  try {
    const source = new ByteSource(file.handle, path, file.size, 'image file', context.warn);
    const header = await readHeader(file);
    validateTables(header, file.size, path);
    noteFeatureBits(header, path, context.warn);

    const hasDataFile = (header.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0n;
    let dataSource = source;
    if (hasDataFile) {
      const dataPath = explicitDataFile ?? (await storedDataFile(header, path, context.options));
      const dataFile = await openSeekable(dataPath, 'data file', explicitDataFile === undefined ? 'data file' : undefined);
      opened.push(dataFile.handle);
      if (await sameFile(file, dataFile)) {
        // Guest data would be read out of the image's own metadata; qemu would too, but no
        // writer makes such an image (checked on the open descriptors, so links don't hide it).
        throw new CorruptImageError(`'${path}' names itself as its external data file`, { structure: 'header extension', field: 'data file name' });
      }
      dataSource = new ByteSource(dataFile.handle, dataPath, dataFile.size, 'data file', context.warn);
    } else if (explicitDataFile !== undefined) {
      throw new InvalidArgumentError(`A data file was given, but '${path}' has no external data file (its data is inside the image)`, {
        hint: 'Leave out --data-file (API: dataFile) for this image',
      });
    }

    const l1 = await readL1(file, header, path);
    context.l1Bytes.total += l1.byteLength;
    if (context.l1Bytes.total > MAX_CHAIN_L1_BYTES) {
      throw new LimitExceededError(`The L1 tables of the backing chain need more than ${MAX_CHAIN_L1_BYTES} bytes together (at '${path}')`, {
        structure: 'backing chain',
        limit: MAX_CHAIN_L1_BYTES,
        actual: context.l1Bytes.total,
      });
    }

    let backing: BaseImage | undefined;
    const backingPath = explicitBacking ?? (header.backingFileName === undefined ? undefined : await storedBacking(header, path, context.options));
    if (backingPath !== undefined && explicitBacking === undefined) context.storedNames.set(backingPath, 'backing file');
    if (backingPath !== undefined) {
      const format = explicitBacking !== undefined ? explicitBackingFormat : backingFormatOf(header, path);
      backing = await openByFormat(backingPath, format, { ...context, chain: [...context.chain, real] }, depth + 1);
    }
    try {
      const l2CacheBytes = (context.options.l2CacheBytes ?? DEFAULT_L2_CACHE_BYTES) / (depth === 0 ? 1 : BACKING_L2_CACHE_SHARE);
      return new Qcow2Image(path, context.warnings, header, source, l1, dataSource, backing, l2CacheBytes);
    } catch (err) {
      await backing?.close();
      throw err;
    }
  } catch (err) {
    for (const handle of opened) await handle.close().catch(() => {});
    throw err;
  }
}

/** `depth` is 0 for the top image: the chain then holds depth + 1 images. */
function checkChainDepth(path: string, context: OpenContext, depth: number): void {
  const maxDepth = context.options.maxChainDepth ?? DEFAULT_MAX_CHAIN_DEPTH;
  if (depth + 1 > maxDepth) {
    throw new LimitExceededError(`The backing chain holds more than ${maxDepth} images (at '${path}')`, {
      structure: 'backing chain',
      limit: maxDepth,
      actual: depth + 1,
      hint: 'Raise the limit (--max-chain-depth, or maxChainDepth in the API), or merge the chain into a new base',
    });
  }
}

async function sameFile(a: SeekableFile, b: SeekableFile): Promise<boolean> {
  // An object is known by its URI (names stored in an object image resolve to URIs).
  if (a.kind === 'object' || b.kind === 'object') return a.path === b.path;
  try {
    const [sa, sb] = await Promise.all([a.handle.stat(), b.handle.stat()]);
    return sa.dev === sb.dev && sa.ino === sb.ino;
  } catch (err) {
    throw fileError(err, 'inspect', b.path);
  }
}

/** Reads and parses cluster 0 of an opened qcow2 file (the read is bounded by the cluster size). */
export async function readHeader(file: SeekableFile): Promise<ParsedHeader> {
  const probeLength = Math.min(HEADER_PROBE_SIZE, file.size);
  const probe = new Uint8Array(probeLength);
  await readFully(file.handle, probe, 0, probeLength, 0, file.path);
  const fields = decodeHeaderFields(probe);
  // cluster_bits is checked by parseHeader; bound the read before it allocates.
  const clusterSize = fields.clusterBits >= 9 && fields.clusterBits <= 21 ? 2 ** fields.clusterBits : HEADER_PROBE_SIZE;
  const length = Math.min(clusterSize, file.size);
  const cluster0 = new Uint8Array(length);
  await readFully(file.handle, cluster0, 0, length, 0, file.path);
  return parseHeader(cluster0);
}

/**
 * qemu's open-time table checks (digest §1.3), against the file size as well: nothing below
 * allocates or seeks on a size the image states without passing through here.
 * `inspect` (info, check) lets through what those commands report instead of refusing:
 * snapshots in an image with a data file.
 */
export function validateTables(header: ParsedHeader, fileSize: number, path: string, mode: 'read' | 'inspect' = 'read'): void {
  const cs = header.clusterSize;
  const at = (field: string, offset: number) => ({ structure: 'header', field, offset });
  const extendedL2 = (header.incompatibleFeatures & INCOMPAT_EXTL2) !== 0n;
  const geometry = imageGeometry(header.size, header.clusterBits, extendedL2);

  const l1Bytes = header.l1Size * 8;
  if (l1Bytes > MAX_L1_BYTES) {
    throw new LimitExceededError(`Active L1 table too large: l1_size ${header.l1Size} is ${l1Bytes} bytes, above the ${MAX_L1_BYTES}-byte limit`, {
      ...at('l1_size', 36),
      limit: MAX_L1_BYTES,
      actual: l1Bytes,
    });
  }
  if (header.l1Size < geometry.l1Size) {
    throw new CorruptImageError(`L1 table is too small: l1_size ${header.l1Size}, but a virtual size of ${header.size} bytes needs ${geometry.l1Size}`, at('l1_size', 36));
  }
  if (header.l1Size > 0) {
    if (header.l1TableOffset % cs !== 0) {
      throw new CorruptImageError(`Active L1 table offset invalid: 0x${header.l1TableOffset.toString(16)} is not cluster-aligned`, at('l1_table_offset', 40));
    }
    if (header.l1TableOffset === 0 || header.l1TableOffset + l1Bytes > fileSize) {
      throw new CorruptImageError(`Active L1 table offset invalid: ${l1Bytes} bytes at ${header.l1TableOffset} do not lie inside '${path}' (${fileSize} bytes)`, at('l1_table_offset', 40));
    }
  }

  const reftableBytes = header.refcountTableClusters * cs;
  if (reftableBytes > MAX_REFTABLE_BYTES) {
    throw new LimitExceededError(`Reference count table too large: ${header.refcountTableClusters} clusters (${reftableBytes} bytes), above the ${MAX_REFTABLE_BYTES}-byte limit`, {
      ...at('refcount_table_clusters', 56),
      limit: MAX_REFTABLE_BYTES,
      actual: reftableBytes,
    });
  }
  if (header.refcountTableClusters === 0) {
    throw new CorruptImageError('Image does not contain a reference count table (refcount_table_clusters is 0)', at('refcount_table_clusters', 56));
  }
  if (header.refcountTableOffset % cs !== 0 || header.refcountTableOffset === 0) {
    throw new CorruptImageError(`Reference count table offset invalid: 0x${header.refcountTableOffset.toString(16)} is not a cluster-aligned offset after the header`, at('refcount_table_offset', 48));
  }
  if (header.refcountTableOffset + reftableBytes > fileSize) {
    throw new CorruptImageError(`Reference count table offset invalid: ${reftableBytes} bytes at ${header.refcountTableOffset} do not lie inside '${path}' (${fileSize} bytes)`, at('refcount_table_offset', 48));
  }

  if (header.nbSnapshots > MAX_SNAPSHOTS) {
    throw new LimitExceededError(`Snapshot table too large: ${header.nbSnapshots} snapshots, above the limit of ${MAX_SNAPSHOTS}`, {
      ...at('nb_snapshots', 60),
      limit: MAX_SNAPSHOTS,
      actual: header.nbSnapshots,
    });
  }
  if (header.nbSnapshots > 0 && (header.snapshotsOffset % cs !== 0 || header.snapshotsOffset === 0 || header.snapshotsOffset >= fileSize)) {
    throw new CorruptImageError(`Snapshot table offset invalid: 0x${header.snapshotsOffset.toString(16)}`, at('snapshots_offset', 64));
  }
  if (mode === 'read' && (header.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0n && header.nbSnapshots > 0) {
    throw new CorruptImageError(`The image has ${header.nbSnapshots} internal snapshot(s) and an external data file; the format forbids snapshots with a data file`, at('nb_snapshots', 60));
  }
}

function noteFeatureBits(header: ParsedHeader, path: string, warn: (message: string) => void): void {
  if ((header.incompatibleFeatures & INCOMPAT_CORRUPT) !== 0n) {
    warn(`'${path}' has the corrupt bit set: qemu found an inconsistency in it; reading it anyway (read-only, as qemu allows)`);
  }
  if ((header.incompatibleFeatures & INCOMPAT_DIRTY) !== 0n) {
    warn(`'${path}' has the dirty bit set (refcounts may be stale); reading is unaffected`);
  }
}

async function storedDataFile(header: ParsedHeader, path: string, options: OpenImageOptions): Promise<string> {
  if (header.dataFileName === undefined) {
    throw new InvalidArgumentError(`'${path}' keeps its data in an external data file but does not name it`, {
      hint: 'Pass the data file with --data-file PATH (API: dataFile)',
    });
  }
  const policy = options.allowUnsafePaths === undefined ? {} : { allowUnsafePaths: options.allowUnsafePaths };
  return resolveStoredName(path, header.dataFileName, 'data file', policy);
}

async function storedBacking(header: ParsedHeader, path: string, options: OpenImageOptions): Promise<string> {
  const policy = options.allowUnsafePaths === undefined ? {} : { allowUnsafePaths: options.allowUnsafePaths };
  return resolveStoredName(path, header.backingFileName ?? '', 'backing file', policy);
}

function backingFormatOf(header: ParsedHeader, path: string): ImageFormat | undefined {
  const format = header.backingFormat;
  if (format === undefined || format === 'qcow2' || format === 'raw') return format;
  throw new UnsupportedFeatureError(`'${path}' has a backing file of format '${format}'; only qcow2 and raw backing files are supported`, {
    structure: 'header extension',
    field: 'backing format',
    features: [`backing format ${format}`],
  });
}

/** Reads the L1 entries the virtual size needs (the table was bounded by validateTables). */
async function readL1(file: SeekableFile, header: ParsedHeader, path: string): Promise<DataView> {
  const extendedL2 = (header.incompatibleFeatures & INCOMPAT_EXTL2) !== 0n;
  const needed = Math.min(header.l1Size, imageGeometry(header.size, header.clusterBits, extendedL2).l1Size);
  if (needed === 0) return new DataView(new ArrayBuffer(0));
  let bytes: Uint8Array;
  try {
    bytes = await readExactly(file.handle, needed * 8, header.l1TableOffset, path, 'L1 table');
  } catch (err) {
    if (err instanceof UnexpectedEofError) throw err;
    throw fileError(err, 'read', path);
  }
  return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

/** True when the image promises its data file alone is the guest image (autoclear bit 1). */
export function isDataFileRaw(header: ParsedHeader): boolean {
  return (header.autoclearFeatures & AUTOCLEAR_DATA_FILE_RAW) !== 0n;
}
