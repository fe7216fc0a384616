/**
 * The internal sink: a single-file qcow2 (no data file), the one layout where clusters can be
 * shared, so within-image dedup saves space.
 *
 * Layout, written front to back while blocks stream in:
 *
 *   cluster 0             header (written last)
 *   clusters 1…           data clusters in arrival order, each L2 table appended as soon as
 *                         its guest range is complete (only tables with an entry)
 *   then                  L1 table, refcount table, refcount blocks
 *
 * Memory is one L2 table, the L1 array and the dedup index. A duplicate cluster points at the
 * first copy; its refcount is the number of references (a new copy starts before the count
 * would overflow the refcount width) and COPIED is set only where the refcount is 1 — the
 * first copy's entry is patched at the end once its final count is known.
 * The output must be a regular file (the header is written last and clusters are read back
 * to confirm dedup matches); internal-stream.ts writes the same images to a pipe.
 *
 * Compressed images (`compression`): a Block that arrives with `compressed` set (by
 * compressBlocks) is stored as a compressed cluster, packed byte by byte with the ones before
 * it as qemu packs them (host-alloc.ts); every host cluster then has its refcount kept, since
 * one holds several compressed clusters. Compressed entries never carry COPIED.
 */

import { clusterSizeFor, isBatch, type Block, type BlockItem } from '../block.js';
import { abortable, abortError } from './abort.js';
import { missingInputEnd } from './external-sink.js';
import { inputSizeMismatch } from './clusterize.js';
import { InvalidArgumentError, NotSeekableError } from '../errors.js';
import { WriterSinkStream } from './sink-stream.js';
import { describeValue } from '../internal/arguments.js';
import {
  buildRefcountTable,
  checkVirtualSize,
  COMPRESSION_ZLIB,
  COMPRESSION_ZSTD,
  decodeCompressedDescriptor,
  ENTRY_COMPRESSED_HI,
  encodeCompressedDescriptor,
  INCOMPAT_COMPRESSION,
  encodeHeaderCluster,
  encodeL1Entry,
  ENTRY_COPIED_HI,
  fillRefcountOnes,
  imageGeometry,
  maxRefcount,
  refcountsPerBlock,
  roundUpToSector,
  setRefcount,
  solveRefcountLayout,
  viewOf,
  type MetadataPlan,
  OFFSET_MASK_HI,
  OFFSET_MASK_LO,
} from '../format/index.js';
import { allocIoBuffer, isAllZero } from '../io/buffers.js';
import { decompressCluster } from '../read/decompress.js';
import type { CompressionType } from './compress.js';
import { HostAllocator, HostQueue, HostRefcounts } from './host-alloc.js';
import { OffsetWriter } from '../io/output.js';
import { checkDedupSharing, resolveImageSettings, type ImageOptions, type ImageSettings, type WriteSummary } from './settings.js';
import { Deduplicator, type DedupStats } from '../../transforms/dedup.js';
import type { Hasher } from '../../transforms/fingerprint.js';

/** Options of {@link InternalImageWriter.create} and {@link createInternalSink}. */
export interface InternalImageOptions extends Omit<ImageOptions, 'dataFileRaw'> {
  /** A regular-file path. */
  output: string;
  /**
   * The number of guest bytes the Blocks will cover, when known in advance: the image then has
   * this length even when the last Blocks were dropped (zeros), and a different amount of input
   * is an InputSizeError. Default: where the Blocks (or the last batch's `inputEnd`) end.
   */
  size?: number;
  /**
   * Share identical clusters (confirmed byte for byte). Needs a refcount width of 2 bits or
   * more: with 1-bit refcounts it is a DedupUnsupportedError.
   */
  dedup?:
    | {
        /** The XXH64 hasher (from `createHasher()`). */
        hasher: Hasher;
        /** Most distinct clusters indexed; past it, new content is not deduplicated. */
        maxEntries?: number;
      }
    | undefined;
  /** Make the image an overlay: unallocated clusters read from this backing file. */
  backing?:
    | {
        /** The backing-file name stored in the header. */
        name: string;
        /** Its format, stored in the backing-format extension (`qcow2`, `raw`). */
        format: string;
      }
    | undefined;
  /** Replace an existing file at `output`. Default false. */
  overwrite?: boolean;
  /** fsync the image (and its directory) before finish() resolves. Default true. */
  sync?: boolean;
  /** Called once per Block when the writer no longer needs its bytes (buffer recycling). */
  onBlockDone?: ((block: Block) => void) | undefined;
  /**
   * Write a compressed image of this type: Blocks with `compressed` set (compressBlocks) are
   * stored compressed, and the header names the type. Default: no compression.
   */
  compression?: CompressionType | undefined;
}

/**
 * What {@link InternalImageWriter.finish} wrote: `dataClusters` are the clusters stored in the
 * image (first copies of shared ones included), `dataBytesWritten` their bytes (compressed
 * sizes for compressed clusters).
 */
export interface InternalSummary extends WriteSummary {
  /** Always `internal`. */
  layout: 'internal';
  /** Clusters stored compressed (counted in `dataClusters` too). */
  compressedClusters: number;
  /** Host clusters in the file: header, data, L2, L1 and refcount structures. */
  fileClusters: number;
  /** Bytes written to the image file. */
  bytesWritten: number;
  /** Dedup statistics, when dedup was on. */
  dedup?: DedupStats | undefined;
}

/** Options of the single-file writers, validated: the image settings in the codec's units. */
export type ResolvedInternalOptions = Omit<InternalImageOptions, 'clusterSize' | 'refcountBits'> & Pick<ImageSettings, 'clusterBits' | 'refcountOrder'>;

/**
 * Validates the single-file writers' options (refused before any output is created): the
 * cluster size and refcount width, a dedup that could share something, the declared size.
 */
export function resolveInternalOptions(options: InternalImageOptions): ResolvedInternalOptions {
  const { clusterSize: _clusterSize, refcountBits: _refcountBits, ...rest } = options;
  const { clusterBits, refcountOrder } = resolveImageSettings(options);
  if (options.dedup) checkDedupSharing({ refcountOrder });
  if (options.size !== undefined) {
    if (!Number.isSafeInteger(options.size) || options.size < 0) throw new InvalidArgumentError(`Invalid input size ${options.size}`);
    checkVirtualSize(roundUpToSector(options.size), clusterBits);
  }
  return { ...rest, clusterBits, refcountOrder };
}

/** Pending appended clusters are written together once this many bytes accumulate. */
const BATCH_BYTES = 2 * 1024 * 1024;

/**
 * A single-file qcow2 writer (no data file): data clusters and L2 tables are appended as Blocks
 * arrive; L1, refcounts and the header are written by `finish`. The only layout where dedup can
 * share clusters. `write` each Block in index order, then `finish`, or `abort` on failure.
 */
export class InternalImageWriter {
  private readonly cs: number;
  private readonly l2Entries: number;
  private readonly table: Uint8Array;
  private readonly tableView: DataView;
  private tableIndex = 0;
  private tableUsed = false;
  /** Host offset of each L2 table written so far (0 = none). */
  private readonly l1: number[] = [];
  /** Where data clusters, compressed clusters and L2 tables go (cluster 0 is the header). */
  private readonly alloc: HostAllocator;
  private nextGuest = 0;
  /** One past the last guest byte received. */
  private end = 0;
  /** Clusters placed but not yet written (written in order, in batches). */
  private readonly queue: HostQueue;
  private readonly dedup: Deduplicator | undefined;
  private readBackBuffer: Buffer | undefined;
  /** First copies retired after the share limit, with their final counts. */
  private readonly retired: Array<[guest: number, count: number]> = [];
  private readonly counts = { stored: 0, zero: 0, duplicate: 0, compressed: 0, unchangedFromBase: 0 };
  private dataBytes = 0;
  private inputEnded = false;
  private readonly started = performance.now();

  private constructor(
    private readonly output: OffsetWriter,
    private readonly options: ResolvedInternalOptions,
  ) {
    this.cs = 2 ** options.clusterBits;
    this.l2Entries = this.cs / 8;
    this.table = new Uint8Array(this.cs);
    this.tableView = viewOf(this.table);
    const maxShares = Math.min(maxRefcount(options.refcountOrder), 0xfffffffe);
    // A compressed image keeps every host cluster's refcount: several clusters share one.
    this.alloc = new HostAllocator(options.clusterBits, 1, maxShares, options.compression ? new HostRefcounts() : undefined);
    this.alloc.counts?.add(0);
    this.queue = new HostQueue(options.clusterBits, 1, async (offset, chunks, blocks) => {
      await this.output.writev(offset, chunks);
      if (this.options.onBlockDone) for (const block of blocks) this.options.onBlockDone(block as Block);
    });
    if (options.dedup) {
      this.dedup = new Deduplicator({
        hasher: options.dedup.hasher,
        ...(options.dedup.maxEntries === undefined ? {} : { maxEntries: options.dedup.maxEntries }),
        maxShares,
        // Host clusters hold several compressed clusters: none may pass the refcount width.
        ...(this.alloc.counts ? { canShare: (guest: number) => this.canShareStored(guest) } : {}),
        // Values are guest indexes of first copies: their host offset is in the L2 tables.
        readBack: async (guest, length) => this.storedBytes(guest, length),
        onRetire: (guest, count) => {
          if (count > 1) this.retired.push([guest, count]);
        },
      });
    }
  }

  /**
   * Validates the options and opens the output (a regular file, under a temporary name until
   * finish); a pipe is a NotSeekableError. Throws before creating anything when an option is bad.
   */
  static async create(options: InternalImageOptions): Promise<InternalImageWriter> {
    const resolved = resolveInternalOptions(options);
    const output = await OffsetWriter.create(options.output, { label: 'image', overwrite: options.overwrite ?? false, sync: options.sync ?? true });
    if (output.kind !== 'file') {
      await output.abort();
      throw new NotSeekableError(
        `An image without a data file needs a regular file as output (${typeof options.output === 'string' ? `'${options.output}' is a pipe or a device` : `${describeValue(options.output)} is not a file`}): its header is written last`,
        { hint: 'Write to a file, or use the default external data-file layout, which streams to pipes' },
      );
    }
    return new InternalImageWriter(output, resolved);
  }

  /**
   * Takes the next Block or batch (see {@link write}). A batch's cluster size must be the
   * writer's; its `inputEnd` (a source's last batch) is where the image ends.
   */
  async writeItem(item: BlockItem): Promise<void> {
    if (!isBatch(item)) return this.write(item);
    if (item.clusterSize !== this.cs) {
      throw new InvalidArgumentError(`A batch of ${item.clusterSize}-byte clusters reached an image of ${this.cs}-byte clusters`, {
        hint: "Leave the sink's cluster size out: writeInternal() learns it from the batches",
      });
    }
    const { blocks } = item;
    for (let i = 0; i < blocks.length; i++) await this.write(blocks[i]!);
    if (item.inputEnd !== undefined) {
      if (!Number.isSafeInteger(item.inputEnd) || item.inputEnd < this.end) {
        throw new InvalidArgumentError(`A batch says the input ended at ${item.inputEnd}, but Blocks up to ${this.end} arrived`);
      }
      if (this.options.size !== undefined && item.inputEnd !== this.options.size) throw inputSizeMismatch(this.options.size, item.inputEnd);
      // Trailing Blocks a stage dropped are zeros (unallocated): the image keeps the input's length.
      this.end = item.inputEnd;
      this.inputEnded = true;
    }
  }

  /** Whether a batch with `inputEnd` (a source's last) has arrived. */
  get sawInputEnd(): boolean {
    return this.inputEnded;
  }

  /** Adds the next block. Blocks come in increasing guest order; skipped clusters stay unallocated. */
  async write(block: Block): Promise<void> {
    if (block.index < this.nextGuest) throw new RangeError(`InternalImageWriter: block ${block.index} out of order`);
    // A Block nobody zero-checked is checked here: zero clusters are never stored as data.
    if (block.zero === undefined && block.count === undefined && !block.sameAsBase) block.zero = isAllZero(block.data);
    const clusters = block.count ?? 1;
    const end = (block.index + clusters - 1) * this.cs + block.data.length;
    if (this.options.size !== undefined && end > this.options.size) throw inputSizeMismatch(this.options.size, end, true);
    this.nextGuest = block.index + clusters;
    this.end = end;
    const kept = block.count === undefined ? await this.place(block) : await this.placeZeroRun(block, clusters);
    if (!kept) this.options.onBlockDone?.(block);
  }

  /**
   * Maps a zero run (Block.count): left unallocated, which costs nothing (later blocks and
   * finish() move past its L2 tables), or zero-flagged entry by entry over a backing file.
   */
  private async placeZeroRun(block: Block, clusters: number): Promise<false> {
    if (block.sameAsBase) {
      this.counts.unchangedFromBase += clusters;
      return false;
    }
    this.counts.zero += clusters;
    if (!this.options.backing) return false;
    for (let index = block.index; index < block.index + clusters; index++) {
      const table = Math.floor(index / this.l2Entries);
      while (this.tableIndex < table) await this.flushTable();
      this.setEntry((index % this.l2Entries) * 8, 0, false, true);
    }
    return false;
  }

  /** Maps one block; true when its bytes were queued for writing (released after the write). */
  private async place(block: Block): Promise<boolean> {
    const tableOfBlock = Math.floor(block.index / this.l2Entries);
    while (this.tableIndex < tableOfBlock) await this.flushTable();
    const entryPos = (block.index % this.l2Entries) * 8;

    if (block.sameAsBase) {
      this.counts.unchangedFromBase++;
      return false;
    }
    if (block.zero) {
      this.counts.zero++;
      // Over a backing file a zero cluster must hide the backing data: a zero-flagged entry.
      if (this.options.backing) this.setEntry(entryPos, 0, false, true);
      return false;
    }
    if (this.dedup) {
      const decision = await this.dedup.lookup(block);
      if (decision.kind === 'duplicate') {
        this.counts.duplicate++;
        const [hi, lo] = this.entryOf(decision.value);
        if (this.alloc.counts) this.alloc.reference(...storedRange(hi, lo, this.options.clusterBits));
        // The same mapping as the first copy's, without COPIED (the refcount is above 1 now).
        this.tableView.setUint32(entryPos, (hi & ~ENTRY_COPIED_HI) >>> 0);
        this.tableView.setUint32(entryPos + 4, lo);
        this.tableUsed = true;
        return false;
      }
    }
    // Remember before appending: the append may flush, and flushed blocks may be recycled.
    this.dedup?.remember(block, block.index);
    this.counts.stored++;
    let kept: boolean;
    if (block.compressed && this.options.compression) {
      this.counts.compressed++;
      const offset = this.alloc.compressed(block.compressed.length);
      this.dataBytes += block.compressed.length;
      // Copied into the packed cluster: the block itself is done with.
      this.queue.placeBytes(offset, block.compressed);
      encodeCompressedDescriptor(this.tableView, entryPos, offset, block.compressed.length, this.options.clusterBits);
      this.tableUsed = true;
      kept = false;
    } else {
      const host = this.alloc.cluster();
      this.dataBytes += block.data.length;
      // A short last cluster still occupies a whole host cluster.
      this.queue.place(host, block.data, block);
      this.setEntry(entryPos, host * this.cs, true, false);
      kept = true;
    }
    this.queue.closePacks(this.alloc.packHost);
    if (this.queue.heldBytes >= BATCH_BYTES) await this.queue.flush();
    return kept;
  }

  /** Guest bytes received so far. */
  get inputBytes(): number {
    return this.end;
  }

  /**
   * Writes the metadata and moves the file into place. The virtual size is the guest length
   * (`size` when declared, else where the input ended) rounded up to 512 bytes (qemu rounds a
   * header's size down; the tail must not vanish).
   */
  async finish(): Promise<InternalSummary> {
    const guestLength = this.options.size ?? this.end;
    const virtualSize = roundUpToSector(guestLength);
    checkVirtualSize(virtualSize, this.options.clusterBits);
    const geometry = imageGeometry(virtualSize, this.options.clusterBits);
    if (this.nextGuest > geometry.clusters) {
      throw new InvalidArgumentError(`Blocks were written up to cluster ${this.nextGuest - 1}, past the virtual size ${virtualSize}`);
    }
    await this.flushTable();
    await this.queue.flush(true);
    await this.patchSharedClusters();

    const order = this.options.refcountOrder;
    const l1Host = this.alloc.nextHost;
    const l1Clusters = Math.ceil((geometry.l1Size * 8) / this.cs);
    const refs = solveRefcountLayout(l1Host + l1Clusters, this.options.clusterBits, order);
    const reftableHost = l1Host + l1Clusters;
    const plan: MetadataPlan = {
      geometry,
      refcountOrder: order,
      refcountTableOffset: reftableHost * this.cs,
      refcountTableClusters: refs.tableClusters,
      refcountBlocksOffset: (reftableHost + refs.tableClusters) * this.cs,
      refcountBlockClusters: refs.blockClusters,
      l1Offset: l1Host * this.cs,
      l1Clusters,
      l2Offset: 0,
      l2Tables: 0,
      metadataClusters: refs.totalClusters,
      totalClusters: refs.totalClusters,
    };

    const l1 = new Uint8Array(l1Clusters * this.cs);
    const l1View = viewOf(l1);
    this.l1.forEach((offset, i) => {
      if (offset) encodeL1Entry(l1View, i * 8, offset);
    });
    await this.output.write(plan.l1Offset, l1);
    await this.output.write(plan.refcountTableOffset, buildRefcountTable(plan));
    await this.writeRefcountBlocks(plan);
    await this.output.write(
      0,
      encodeHeaderCluster({
        clusterBits: this.options.clusterBits,
        size: virtualSize,
        l1Size: geometry.l1Size,
        l1TableOffset: plan.l1Offset,
        refcountTableOffset: plan.refcountTableOffset,
        refcountTableClusters: plan.refcountTableClusters,
        refcountOrder: order,
        incompatibleFeatures: this.options.compression === 'zstd' ? INCOMPAT_COMPRESSION : 0n,
        compressionType: this.options.compression === 'zstd' ? COMPRESSION_ZSTD : COMPRESSION_ZLIB,
        autoclearFeatures: 0n,
        ...(this.options.backing ? { backingFileName: this.options.backing.name, backingFormat: this.options.backing.format } : {}),
      }),
    );
    await this.output.finish(plan.totalClusters * this.cs);
    await this.output.commit();
    return internalSummary({
      inputBytes: guestLength,
      virtualSize,
      clusterSize: this.cs,
      refcountOrder: order,
      clusters: geometry.clusters,
      counts: this.counts,
      fileClusters: plan.totalClusters,
      bytesWritten: this.output.bytesWritten,
      dataBytes: this.dataBytes,
      dedup: this.dedup?.stats,
      seconds: (performance.now() - this.started) / 1000,
    });
  }

  /** Removes the temporary file after a failure. */
  async abort(): Promise<void> {
    await this.output.abort();
  }

  private setEntry(pos: number, host: number, copied: boolean, zero: boolean): void {
    this.tableView.setUint32(pos, ((copied ? ENTRY_COPIED_HI : 0) | Math.floor(host / 2 ** 32)) >>> 0);
    this.tableView.setUint32(pos + 4, ((host >>> 0) | (zero ? 1 : 0)) >>> 0);
    this.tableUsed = true;
  }

  /**
   * The guest bytes of a first copy: from the batch not yet written when it is there (a flush
   * per dedup match would break write batching), else read back from the file (and
   * decompressed, for a compressed cluster).
   */
  private async storedBytes(guest: number, length: number): Promise<Uint8Array> {
    this.readBackBuffer ??= allocIoBuffer(this.cs);
    const [hi, lo] = this.entryOf(guest);
    if ((hi & ENTRY_COMPRESSED_HI) !== 0) {
      const { hostOffset, compressedSize } = decodeCompressedDescriptor(hi, lo, this.options.clusterBits);
      // The descriptor's size runs to the end of its last sector, which may be past what is
      // written so far: read what is there (zeros after it).
      const stored = this.readHost(hostOffset, compressedSize).slice();
      decompressCluster(stored, this.readBackBuffer, this.options.compression === 'zstd' ? COMPRESSION_ZSTD : COMPRESSION_ZLIB, hostOffset);
      return this.readBackBuffer.subarray(0, length);
    }
    // The Deduplicator compares before it asks again, so one scratch buffer serves every read.
    return this.readHost(entryOffsetOf(hi, lo), length, this.readBackBuffer);
  }

  /** Host bytes: still queued, or read back from the file. */
  private readHost(offset: number, length: number, into?: Uint8Array): Uint8Array {
    return this.queue.read(offset, length) ?? this.output.readAtSync(offset, length, into);
  }

  /** Whether the first copy of `guest` can take one more reference (compressed images). */
  private canShareStored(guest: number): boolean {
    const [hi, lo] = this.entryOf(guest);
    return this.alloc.canReference(...storedRange(hi, lo, this.options.clusterBits));
  }

  private async flushTable(): Promise<void> {
    if (this.tableUsed) {
      const host = this.alloc.cluster();
      this.queue.place(host, this.table.slice());
      this.queue.closePacks(this.alloc.packHost);
      await this.queue.flush();
      this.l1[this.tableIndex] = host * this.cs;
    } else this.l1[this.tableIndex] = 0;
    this.table.fill(0);
    this.tableUsed = false;
    this.tableIndex++;
  }

  /** The L2 entry (high and low words) of a stored guest cluster, from the current table or a written one. */
  private entryOf(guest: number): [hi: number, lo: number] {
    const table = Math.floor(guest / this.l2Entries);
    const pos = (guest % this.l2Entries) * 8;
    if (table === this.tableIndex) return [this.tableView.getUint32(pos), this.tableView.getUint32(pos + 4)];
    const tableOffset = this.l1[table];
    if (!tableOffset) throw new RangeError(`InternalImageWriter: guest cluster ${guest} has no L2 table`);
    const view = viewOf(this.readHost(tableOffset + pos, 8).slice());
    return [view.getUint32(0), view.getUint32(4)];
  }

  /** Host offset of a stored (uncompressed) guest cluster. */
  private hostOf(guest: number): number {
    return entryOffsetOf(...this.entryOf(guest));
  }

  /** First copies referenced more than once, with their final reference counts. */
  private sharedClusters(): Array<[guest: number, count: number]> {
    const shared: Array<[number, number]> = [...this.retired];
    this.dedup?.index.forEach((guest, count) => {
      if (count > 1) shared.push([guest, count]);
    });
    return shared;
  }

  /** Clears COPIED on the first copy of every shared cluster, table by table. */
  private async patchSharedClusters(): Promise<void> {
    const guests = Uint32Array.from(this.sharedClusters(), ([guest]) => guest).sort();
    for (let i = 0; i < guests.length; ) {
      const t = Math.floor(guests[i]! / this.l2Entries);
      const tableOffset = this.l1[t]!;
      const table = this.output.readAtSync(tableOffset, this.cs);
      const view = viewOf(table);
      for (; i < guests.length && Math.floor(guests[i]! / this.l2Entries) === t; i++) {
        const pos = (guests[i]! % this.l2Entries) * 8;
        view.setUint32(pos, (view.getUint32(pos) & ~ENTRY_COPIED_HI) >>> 0);
      }
      await this.output.write(tableOffset, table);
    }
  }

  private async writeRefcountBlocks(plan: MetadataPlan): Promise<void> {
    const counts = this.alloc.counts;
    // (host cluster << 32 | count) for every cluster referenced more than once, sorted by host
    // (a compressed image has every data cluster's count instead).
    const shared = counts ? [] : this.sharedClusters();
    const overrides = new BigUint64Array(shared.length);
    for (let i = 0; i < shared.length; i++) {
      const [guest, count] = shared[i]!;
      overrides[i] = (BigInt(this.hostOf(guest) / this.cs) << 32n) | BigInt(count);
    }
    const sorted = overrides.sort();

    const perBlock = refcountsPerBlock(this.options.clusterBits, plan.refcountOrder);
    let next = 0;
    for (let b = 0; b < plan.refcountBlockClusters; b++) {
      const block = new Uint8Array(this.cs);
      const first = b * perBlock;
      const end = Math.min(plan.totalClusters, first + perBlock);
      if (end > first) fillRefcountOnes(block, 0, end - first, plan.refcountOrder);
      if (counts) {
        for (let host = first; host < Math.min(end, counts.length); host++) setRefcount(block, host - first, plan.refcountOrder, counts.get(host));
      }
      for (; next < sorted.length && Number(sorted[next]! >> 32n) < end; next++) {
        const host = Number(sorted[next]! >> 32n);
        setRefcount(block, host - first, plan.refcountOrder, Number(sorted[next]! & 0xffffffffn));
      }
      await this.output.write(plan.refcountBlocksOffset + b * this.cs, block);
    }
  }
}

function entryOffsetOf(hi: number, lo: number): number {
  return (hi & OFFSET_MASK_HI) * 2 ** 32 + ((lo & OFFSET_MASK_LO) >>> 0);
}

/** The host bytes an entry's data occupies: a whole cluster, or a compressed cluster's sectors (as qemu's check counts them). */
function storedRange(hi: number, lo: number, clusterBits: number): [offset: number, size: number] {
  if ((hi & ENTRY_COMPRESSED_HI) === 0) return [entryOffsetOf(hi, lo), 2 ** clusterBits];
  const { hostOffset, compressedSize } = decodeCompressedDescriptor(hi, lo, clusterBits);
  return [hostOffset, compressedSize];
}

/**
 * What a single-file writer counted, as the {@link InternalSummary} every writer reports (shared
 * with the pipe writer of internal-stream.ts).
 */
export function internalSummary(written: {
  inputBytes: number;
  virtualSize: number;
  clusterSize: number;
  refcountOrder: number;
  /** Guest clusters of the image. */
  clusters: number;
  counts: { stored: number; zero: number; duplicate: number; compressed: number; unchangedFromBase: number };
  fileClusters: number;
  bytesWritten: number;
  dataBytes: number;
  dedup: DedupStats | undefined;
  seconds: number;
}): InternalSummary {
  const { counts } = written;
  return {
    layout: 'internal',
    inputBytes: written.inputBytes,
    virtualSize: written.virtualSize,
    clusterSize: written.clusterSize,
    refcountBits: 2 ** written.refcountOrder,
    dataFileRaw: false,
    clusters: written.clusters,
    dataClusters: counts.stored,
    zeroClusters: written.clusters - counts.stored - counts.duplicate - counts.unchangedFromBase,
    duplicateClusters: counts.duplicate,
    unchangedClusters: counts.unchangedFromBase,
    compressedClusters: counts.compressed,
    dataBytesWritten: written.dataBytes,
    metadataBytesWritten: (written.fileClusters - counts.stored) * written.clusterSize,
    fileClusters: written.fileClusters,
    bytesWritten: written.bytesWritten,
    dataFile: undefined,
    dataFileName: undefined,
    warnings: [],
    ...(written.dedup ? { dedup: written.dedup } : {}),
    seconds: written.seconds,
  };
}

/** The single-file sink as a Writable (object mode) for `pipeline(...)`; `finished` resolves with the summary. */
export class InternalSinkStream extends WriterSinkStream<InternalSummary> {
  constructor(options: InternalImageOptions) {
    super(() => InternalImageWriter.create(options), 32);
  }
}

/**
 * A Writable (object mode) that takes Blocks or batches and writes a single-file qcow2 image;
 * see {@link InternalImageOptions}. After `await pipeline(...)`, `await sink.finished` gives
 * the summary. The counterpart of createExternalSink.
 */
export function createInternalSink(options: InternalImageOptions): InternalSinkStream {
  return new InternalSinkStream(options);
}

/** Options of {@link writeInternal}: the writer's, with the cluster size learned from the batches. */
export interface WriteInternalOptions extends InternalImageOptions {
  /** Bytes per cluster: only for a source of single Blocks, or to insist on one. Batches carry it; default 65536. */
  clusterSize?: number;
  /** Cancels the write: it rejects with an AbortedError and removes the image. */
  signal?: AbortSignal;
}

/** What {@link writeInternal} wrote: the writer's summary. */
export type WriteInternalResult = InternalSummary;

/**
 * The internal (single-file) sink at the end of an iterable chain; see writeExternal in
 * external-sink.ts for the rules (cluster size from the batches, the last batch required,
 * nothing left behind on failure or abort).
 */
export async function writeInternal(items: AsyncIterable<BlockItem> | Iterable<BlockItem>, options: WriteInternalOptions): Promise<WriteInternalResult> {
  const { signal, clusterSize: wanted, ...rest } = options;
  if (signal?.aborted) throw abortError(signal);
  // Refused before the first item is pulled (as writeExternal refuses its options).
  resolveInternalOptions({ ...rest, ...(wanted === undefined ? {} : { clusterSize: wanted }) });
  const source = signal ? abortable(asAsync(items), signal) : asAsync(items);
  const iterator = source[Symbol.asyncIterator]();
  let writer: InternalImageWriter | undefined;
  let sawBatch = false;
  try {
    let next = await iterator.next();
    const first = next.done ? undefined : next.value;
    const clusterSize = first && isBatch(first) ? clusterSizeFor('writeInternal', first.clusterSize, wanted) : wanted;
    writer = await InternalImageWriter.create({ ...rest, ...(clusterSize === undefined ? {} : { clusterSize }) });
    while (!next.done) {
      const item = next.value;
      if (isBatch(item)) sawBatch = true;
      await writer.writeItem(item);
      next = await iterator.next();
    }
    if (signal?.aborted) throw abortError(signal);
    if (sawBatch && !writer.sawInputEnd) throw missingInputEnd('writeInternal');
    const summary = await writer.finish();
    writer = undefined;
    return summary;
  } catch (err) {
    await writer?.abort();
    void iterator.return?.(undefined)?.catch(() => {});
    throw err;
  }
}

async function* asAsync<T>(items: AsyncIterable<T> | Iterable<T>): AsyncGenerator<T> {
  yield* items;
}
