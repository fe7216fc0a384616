/**
 * What every reader shares: the byte source a reader reads files through (zero-fill past the
 * end, like qemu's file driver), the internal segment a reader yields, and the base class that
 * turns a reader's segments into coalesced extents, reads and bounds checks.
 *
 * A format reader (one file per on-disk format: qcow2-reader.ts, raw-reader.ts…) extends
 * {@link BaseImage} and implements `segments()` and `close()`; image.ts dispatches to it.
 * @internal
 */

import { from, type AsyncIterableX } from '@reactivex/ix-esnext-esm/asynciterable';
import { InvalidArgumentError, NotSeekableError } from '../errors.js';
import { openForRead, readFully, type OpenedFile, type ReadHandle } from '../io/files.js';
import { confirmOpened, type StoredNameKind } from '../io/path-policy.js';
import { isS3Uri } from '../io/s3-uri.js';
import type { ObjectFile } from './object-source.js';
import type { ParsedHeader } from '../format/index.js';
import type { DiskImage, Extent, ExtentKind, ImageFormat, OpenImageOptions } from './image.js';

/**
 * The file an uncompressed data extent's bytes are stored in, for copying them without reading
 * them through the image (export's native data mover). `fd` stays open until the image closes.
 * @internal
 */
export interface ExtentFile {
  /** The open descriptor of the file. */
  fd: number;
  /** Its path, for messages. */
  name: string;
  /** Its length: bytes mapped past it read as zeros. */
  size: number;
  /** Reports (once per file, in the image's warnings) that bytes past its end were read as zeros. */
  notePastEnd(position: number): void;
}

/** Where the extents yielded by `extents()` are stored (uncompressed data only). */
const extentFiles = new WeakMap<Extent, ExtentFile>();

/** The file holding an uncompressed data extent that `extents()` yielded, if any. @internal */
export function extentFile(extent: Extent): ExtentFile | undefined {
  return extentFiles.get(extent);
}

/** A file (or object) bytes are read from, with zero-fill past its end like qemu's file driver. */
export class ByteSource implements ExtentFile {
  private warnedEof = false;
  constructor(
    readonly handle: ReadHandle,
    readonly path: string,
    readonly size: number,
    /** `data file`, `image file`: for the past-EOF warning. */
    readonly label: string,
    private readonly warn: (message: string) => void,
  ) {}

  /** The descriptor of a local file; -1 for an object (never registered as an ExtentFile). */
  get fd(): number {
    return this.handle.fd ?? -1;
  }

  get name(): string {
    return this.path;
  }

  /** Fills `target` from `position`; bytes past the end of the file read as zeros. */
  async readAt(position: number, target: Uint8Array): Promise<void> {
    const got = position < this.size ? await readFully(this.handle, target, 0, target.length, position, this.path) : 0;
    if (got < target.length) {
      target.fill(0, got);
      this.notePastEnd(position + got);
    }
  }

  notePastEnd(position: number): void {
    if (this.warnedEof) return;
    this.warnedEof = true;
    this.warn(`The ${this.label} '${this.path}' is ${this.size} bytes long, but the image maps data at byte ${position} and beyond; those bytes read as zeros (as qemu does)`);
  }
}

/** A layer that stores compressed clusters and decompresses them (the qcow2 reader). */
export interface CompressedLayer {
  readonly clusterSize: number;
  /** The decompressed cluster whose stream starts at `offset`. */
  decompressedCluster(offset: number, size: number): Promise<Uint8Array>;
}

/** An internal extent: where it comes from, so it can be read. */
export interface Segment {
  start: number;
  length: number;
  kind: ExtentKind;
  depth: number;
  source: ByteSource | undefined;
  hostOffset: number | undefined;
  /** For compressed data: the layer that decompresses it and the stream's size. */
  compressed: { layer: CompressedLayer; size: number } | undefined;
}

/** Shared state of one open call: the warning sink and the files opened so far. */
export interface OpenContext {
  warn: (message: string) => void;
  options: OpenImageOptions;
  /** Real paths of the images of the chain above, to catch loops. */
  chain: string[];
  /** Every warning of the chain, shared by its images. */
  warnings: string[];
  /** L1 bytes the chain's images hold so far (bounded by MAX_CHAIN_L1_BYTES). */
  l1Bytes: { total: number };
  /** Paths the path policy resolved from names stored in images: opened, then confirmed. */
  storedNames: Map<string, StoredNameKind>;
}

export abstract class BaseImage implements DiskImage {
  abstract readonly format: ImageFormat;
  abstract readonly virtualSize: number;
  abstract readonly clusterSize: number;
  abstract readonly header: ParsedHeader | undefined;
  abstract readonly backing: DiskImage | undefined;
  abstract readonly dataFilePath: string | undefined;
  protected closed = false;

  constructor(
    readonly path: string,
    readonly warnings: string[],
  ) {}

  /** Resolved segments of [start, end), not coalesced, depth relative to this image. */
  abstract segments(start: number, end: number): AsyncGenerator<Segment>;
  abstract close(): Promise<void>;

  /** Closes the image at the end of an `await using` block. */
  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }

  /** Segments with adjacent compatible ones merged. */
  async *coalescedSegments(start: number, end: number): AsyncGenerator<Segment> {
    this.checkRange(start, end - start);
    let pending: Segment | undefined;
    for await (const seg of this.segments(start, end)) {
      if (seg.length === 0) continue;
      if (pending && canMerge(pending, seg)) {
        pending.length += seg.length;
        continue;
      }
      if (pending) yield pending;
      pending = { ...seg };
    }
    if (pending) yield pending;
  }

  extents(start = 0, end = this.virtualSize): AsyncIterableX<Extent> {
    return from(this.extentsFrom(start, end));
  }

  private async *extentsFrom(start: number, end: number): AsyncGenerator<Extent> {
    for await (const seg of this.coalescedSegments(start, end)) {
      const extent = toExtent(seg);
      // Objects have no descriptor: no hole probe or native copy applies to them.
      if (seg.kind === 'data' && seg.source && !seg.compressed && seg.source.handle.fd !== undefined) extentFiles.set(extent, seg.source);
      yield extent;
    }
  }

  async read(offset: number, length: number): Promise<Uint8Array> {
    this.checkRange(offset, length);
    const out = new Uint8Array(length);
    await this.readInto(out, offset);
    return out;
  }

  async readInto(target: Uint8Array, offset: number): Promise<void> {
    this.checkRange(offset, target.length);
    for await (const seg of this.coalescedSegments(offset, offset + target.length)) {
      await readSegment(seg, target.subarray(seg.start - offset, seg.start - offset + seg.length));
    }
  }

  protected checkRange(offset: number, length: number): void {
    if (this.closed) throw new InvalidArgumentError(`The image '${this.path}' is closed`);
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.virtualSize) {
      throw new InvalidArgumentError(`Cannot read ${length} bytes at offset ${offset}: the image '${this.path}' is ${this.virtualSize} bytes`);
    }
  }
}

// Node.js defines Symbol.asyncDispose as the registered Symbol.for('nodejs.asyncDispose') (20.4+);
// on a runtime without it, the method is put under that registered key, as Node's polyfill has it.
if (typeof (Symbol as { asyncDispose?: unknown }).asyncDispose !== 'symbol') {
  Object.defineProperty(BaseImage.prototype, Symbol.for('nodejs.asyncDispose'), {
    value(this: BaseImage) {
      return this.close();
    },
  });
}

export function canMerge(a: Segment, b: Segment): boolean {
  if (a.kind !== b.kind || a.depth !== b.depth || a.source !== b.source || a.compressed || b.compressed) return false;
  if (a.start + a.length !== b.start) return false;
  if (a.hostOffset === undefined || b.hostOffset === undefined) return a.hostOffset === b.hostOffset;
  return a.hostOffset + a.length === b.hostOffset;
}

function toExtent(seg: Segment): Extent {
  const extent: Extent = { start: seg.start, length: seg.length, kind: seg.kind, depth: seg.depth };
  if (seg.source) extent.file = seg.source.path;
  if (seg.hostOffset !== undefined) extent.hostOffset = seg.hostOffset;
  if (seg.compressed) extent.compressed = true;
  return extent;
}

/** Fills `target` (exactly the segment's length) with the segment's bytes. */
async function readSegment(seg: Segment, target: Uint8Array): Promise<void> {
  if (seg.kind !== 'data') {
    target.fill(0);
    return;
  }
  if (seg.compressed) {
    const layer = seg.compressed.layer;
    const cluster = await layer.decompressedCluster(seg.hostOffset ?? 0, seg.compressed.size);
    const within = seg.start % layer.clusterSize;
    target.set(cluster.subarray(within, within + target.length));
    return;
  }
  if (!seg.source || seg.hostOffset === undefined) throw new Error('unreachable: a data segment without a source');
  await seg.source.readAt(seg.hostOffset, target);
}

/**
 * A layer's own segments with its unallocated ranges answered by its backing image (depth + 1),
 * up to the backing's size; past it they stay unallocated at this layer, as qemu reports them.
 * For readers of formats with a parent (VHD and VHDX differencing, VMDK with a parent).
 */
export async function* throughBacking(own: AsyncIterable<Segment>, backing: BaseImage | undefined): AsyncGenerator<Segment> {
  for await (const seg of own) {
    if (seg.kind !== 'unallocated' || !backing) {
      yield seg;
      continue;
    }
    const segEnd = seg.start + seg.length;
    const backingEnd = Math.min(segEnd, backing.virtualSize);
    if (seg.start < backingEnd) {
      for await (const below of backing.segments(seg.start, backingEnd)) yield { ...below, depth: below.depth + 1 };
    }
    const tail = Math.max(seg.start, backingEnd);
    if (tail < segEnd) yield { ...seg, start: tail, length: segEnd - tail };
  }
}

export function plain(start: number, length: number, kind: ExtentKind): Segment {
  return { start, length, kind, depth: 0, source: undefined, hostOffset: undefined, compressed: undefined };
}

export function newContext(options: OpenImageOptions): OpenContext {
  const warnings: string[] = [];
  return {
    options,
    chain: [],
    warnings,
    l1Bytes: { total: 0 },
    storedNames: new Map(),
    warn: (message) => {
      if (warnings.includes(message)) return;
      warnings.push(message);
      options.onWarning?.(message);
    },
  };
}

/** A file opened for positional reads: a local one, or an object (`s3://`, ranged GETs). */
export type SeekableFile = OpenedFile | ObjectFile;

/**
 * Opens an image, data file or other file a reader needs. `stored`: the path came from a name
 * stored in an image (through the path policy), so what was opened is confirmed to be that
 * regular file (src/io/path-policy.ts confirmOpened): a swap after the policy looked loses.
 * An `s3://` path opens the object (src/read/object-source.ts); the policy checked its key.
 */
export async function openSeekable(path: string, what: string, stored?: StoredNameKind): Promise<SeekableFile> {
  if (isS3Uri(path)) return (await import('./object-source.js')).openObject(path);
  const file = await openForRead(path, { nonBlocking: true, noFollow: stored !== undefined });
  if (stored !== undefined) {
    try {
      await confirmOpened(file.handle, path, stored);
    } catch (err) {
      await file.handle.close().catch(() => {});
      throw err;
    }
  }
  if (file.kind !== 'file' && file.kind !== 'block-device') {
    await file.handle.close().catch(() => {});
    throw new NotSeekableError(`The ${what} '${path}' is a ${file.kind}; reading an image needs a regular file or block device`);
  }
  if (file.kind === 'block-device') {
    // openForRead reports 0 for devices; their size is where a seek to the end lands.
    file.size = await deviceSize(file);
  }
  return file;
}

/**
 * The size of a block device: stat reports 0 for devices, and a read past the end returns no
 * bytes, so bisect on one-byte reads (at most ~106 probes).
 */
async function deviceSize(file: OpenedFile): Promise<number> {
  const probe = new Uint8Array(1);
  const readable = async (length: number) => (await readFully(file.handle, probe, 0, 1, length - 1, file.path)) === 1;
  let low = 0;
  let high = 1;
  while (high <= Number.MAX_SAFE_INTEGER && (await readable(high))) {
    low = high;
    high *= 2;
  }
  while (high - low > 1) {
    const mid = Math.floor((low + high) / 2);
    if (await readable(mid)) low = mid;
    else high = mid;
  }
  return low;
}
