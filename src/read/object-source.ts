/**
 * Objects (`s3://bucket/key`) as files the readers read: a {@link ReadHandle} over ranged GETs,
 * so every reader (qcow2, raw, VMDK, VHD, VHDX) and info, map, check and compare read objects
 * through the same code as files. openSeekable (base-image.ts) returns one for an `s3://` path.
 *
 * Memory stays bounded whatever the reads: small reads (headers, L1/L2 tables, grain tables,
 * sector bitmaps) are served from aligned 1 MiB pages, so neighbouring tables cost one GET;
 * large reads (data) from aligned 8 MiB chunks, and a read that continues where the last one
 * ended starts the next chunks downloading (a few GETs in flight). Each cache holds a fixed
 * number of units, least recently used out first. Every GET is pinned to the ETag of the HEAD
 * made at open and retried a bounded number of times on transient failures (src/io/s3.ts).
 * @internal
 */

import type { ReadHandle } from '../io/files.js';

/** Reads below this size go through the page cache. */
const SMALL_READ = 256 * 1024;
const PAGE_SIZE = 1024 * 1024;
const PAGES_KEPT = 8;
const CHUNK_SIZE = 8 * 1024 * 1024;
/** Chunks downloaded ahead of a sequential reader. */
const CHUNKS_AHEAD = 2;
/** The chunk being read, the one before it (a read may straddle them) and those ahead. */
const CHUNKS_KEPT = CHUNKS_AHEAD + 2;

/** What the handle fetches with: bytes [start, end) of the object. */
export type RangeFetcher = (start: number, end: number) => Promise<Uint8Array>;

/** A fixed number of aligned units of an object, fetched once each, least recently used dropped first. */
class UnitCache {
  private readonly units = new Map<number, Promise<Uint8Array>>();

  constructor(
    readonly unitSize: number,
    private readonly kept: number,
    private readonly size: number,
    private readonly fetch: RangeFetcher,
  ) {}

  get(index: number): Promise<Uint8Array> {
    let unit = this.units.get(index);
    if (unit) {
      // Most recently used goes last.
      this.units.delete(index);
      this.units.set(index, unit);
      return unit;
    }
    const start = index * this.unitSize;
    unit = this.fetch(start, Math.min(this.size, start + this.unitSize));
    // A failed unit is not kept: the next read asks again.
    unit.catch(() => this.units.get(index) === unit && this.units.delete(index));
    this.units.set(index, unit);
    while (this.units.size > this.kept) this.units.delete(this.units.keys().next().value!);
    return unit;
  }

  /** Starts fetching `index` if it is not held yet (read-ahead); failures surface when it is read. */
  prefetch(index: number): void {
    if (index * this.unitSize >= this.size || this.units.has(index)) return;
    this.get(index).catch(() => {});
  }

  clear(): void {
    this.units.clear();
  }
}

/** An object opened for positional reads; no descriptor, so nothing native applies to it. */
export class ObjectReadHandle implements ReadHandle {
  private readonly pages: UnitCache;
  private readonly chunks: UnitCache;
  /** Where the last large read ended: a read starting there is sequential. */
  private sequentialEnd = -1;
  private closed = false;

  constructor(
    readonly uri: string,
    readonly size: number,
    fetch: RangeFetcher,
  ) {
    this.pages = new UnitCache(PAGE_SIZE, PAGES_KEPT, size, fetch);
    this.chunks = new UnitCache(CHUNK_SIZE, CHUNKS_KEPT, size, fetch);
  }

  async read(buffer: Uint8Array, offset: number, length: number, position: number | null): Promise<{ bytesRead: number }> {
    if (this.closed) throw new Error(`unreachable: read of the closed object ${this.uri}`);
    if (position === null) throw new Error(`unreachable: a read of ${this.uri} without a position`);
    const n = Math.max(0, Math.min(length, this.size - position));
    if (n === 0) return { bytesRead: 0 };
    const cache = n < SMALL_READ ? this.pages : this.chunks;
    const unit = cache.unitSize;
    const first = Math.floor(position / unit);
    const last = Math.floor((position + n - 1) / unit);
    const pieces: Promise<void>[] = [];
    for (let index = first; index <= last; index++) {
      pieces.push(
        cache.get(index).then((bytes) => {
          const unitStart = index * unit;
          const from = Math.max(position, unitStart);
          const to = Math.min(position + n, unitStart + bytes.length);
          buffer.set(bytes.subarray(from - unitStart, to - unitStart), offset + (from - position));
        }),
      );
    }
    // After the units this read needs were marked used, so read-ahead never evicts them. A read
    // that starts at or a little past the last one's end (a reader skipping a zero extent)
    // is sequential.
    if (cache === this.chunks) {
      const skipped = position - this.sequentialEnd;
      if (this.sequentialEnd >= 0 && skipped >= 0 && skipped <= CHUNK_SIZE) for (let i = 1; i <= CHUNKS_AHEAD; i++) this.chunks.prefetch(last + i);
      this.sequentialEnd = position + n;
    }
    await Promise.all(pieces);
    return { bytesRead: n };
  }

  async close(): Promise<void> {
    this.closed = true;
    this.pages.clear();
    this.chunks.clear();
  }
}

/** What openSeekable returns for an object: like an OpenedFile, of kind `object`. */
export interface ObjectFile {
  handle: ObjectReadHandle;
  path: string;
  kind: 'object';
  size: number;
}

/** Opens `s3://bucket/key` for the readers: a HEAD (a missing object is an ObjectStorageError), then ranged GETs. */
export async function openObject(uri: string): Promise<ObjectFile> {
  const { getObjectRange, statObject } = await import('../io/s3.js');
  const { size, etag } = await statObject(uri);
  const handle = new ObjectReadHandle(uri, size, (start, end) => getObjectRange(uri, start, end, { etag }));
  return { handle, path: uri, kind: 'object', size };
}
