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
 * to confirm dedup matches).
 */

import { Writable } from 'node:stream';
import { clusterSizeFor, isBatch, type Block, type BlockItem } from '../block.js';
import { abortable, abortError } from './abort.js';
import { missingInputEnd } from './external-sink.js';
import { InvalidArgumentError, NotSeekableError } from '../errors.js';
import {
  buildRefcountTable,
  checkVirtualSize,
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
import { OffsetWriter } from '../io/output.js';
import { Deduplicator, type DedupStats } from '../../transforms/dedup.js';
import type { Hasher } from '../../transforms/fingerprint.js';

/** Options of {@link InternalImageWriter.create}. */
export interface InternalImageOptions {
  /** A regular-file path. */
  output: string;
  /** log2 of the cluster size. */
  clusterBits: number;
  /** log2 of the refcount width in bits. */
  refcountOrder: number;
  /** Share identical clusters (confirmed byte for byte). */
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
}

/** What {@link InternalImageWriter.finish} wrote. */
export interface InternalSummary {
  /** Guest clusters by what happened to them. */
  clusters: {
    /** Guest clusters of the image. */
    total: number;
    /** Stored in the image (first copies included). */
    stored: number;
    /** All zeros: not stored. */
    zero: number;
    /** Sharing an earlier cluster's storage (dedup). */
    duplicate: number;
    /** Equal to the backing file: left unallocated (overlays). */
    unchangedFromBase: number;
  };
  /** Host clusters in the file: header, data, L2, L1 and refcount structures. */
  fileClusters: number;
  /** Bytes written to the image file. */
  bytesWritten: number;
  /** Dedup statistics, when dedup was on. */
  dedup?: DedupStats | undefined;
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
  /** Next free host cluster. */
  private nextHost = 1;
  private nextGuest = 0;
  /** One past the last guest byte received. */
  private end = 0;
  private pending: Block[] = [];
  private pendingBytes = 0;
  private pendingHost = 0;
  private readonly dedup: Deduplicator | undefined;
  private readBackBuffer: Buffer | undefined;
  /** First copies retired after the share limit, with their final counts. */
  private readonly retired: Array<[guest: number, count: number]> = [];
  private readonly counts = { stored: 0, zero: 0, duplicate: 0, unchangedFromBase: 0 };
  private inputEnded = false;

  private constructor(
    private readonly output: OffsetWriter,
    private readonly options: InternalImageOptions,
  ) {
    this.cs = 2 ** options.clusterBits;
    this.l2Entries = this.cs / 8;
    this.table = new Uint8Array(this.cs);
    this.tableView = viewOf(this.table);
    const maxShares = Math.min(maxRefcount(options.refcountOrder), 0xfffffffe);
    if (options.dedup && maxShares >= 2) {
      this.dedup = new Deduplicator({
        hasher: options.dedup.hasher,
        ...(options.dedup.maxEntries === undefined ? {} : { maxEntries: options.dedup.maxEntries }),
        maxShares,
        // Values are guest indexes of first copies: their host offset is in the L2 tables.
        readBack: async (guest, length) => this.storedBytes(await this.hostOf(guest), length),
        onRetire: (guest, count) => {
          if (count > 1) this.retired.push([guest, count]);
        },
      });
    }
  }

  /** Opens the output (a regular file, under a temporary name until finish); a pipe is a NotSeekableError. */
  static async create(options: InternalImageOptions): Promise<InternalImageWriter> {
    const output = await OffsetWriter.create(options.output, { label: 'image', overwrite: options.overwrite ?? false, sync: options.sync ?? true });
    if (output.kind !== 'file') {
      await output.abort();
      throw new NotSeekableError(
        `An image without a data file needs a regular file as output ('${options.output}' is a stream): its header is written last`,
        { hint: 'Write to a file, or use the default external data-file layout, which streams to pipes' },
      );
    }
    return new InternalImageWriter(output, options);
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
    this.nextGuest = block.index + clusters;
    this.end = (block.index + clusters - 1) * this.cs + block.data.length;
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
        this.setEntry(entryPos, await this.hostOf(decision.value), false, false);
        return false;
      }
    }
    // Remember before appending: the append may flush, and flushed blocks may be recycled.
    this.dedup?.remember(block, block.index);
    const host = await this.append(block);
    this.counts.stored++;
    this.setEntry(entryPos, host, true, false);
    return true;
  }

  /** Guest bytes received so far. */
  get inputBytes(): number {
    return this.end;
  }

  /**
   * Writes the metadata and moves the file into place. The virtual size is the guest length
   * rounded up to 512 bytes (qemu rounds a header's size down; the tail must not vanish).
   */
  async finish(guestLength: number = this.end): Promise<InternalSummary> {
    const virtualSize = roundUpToSector(guestLength);
    checkVirtualSize(virtualSize, this.options.clusterBits);
    const geometry = imageGeometry(virtualSize, this.options.clusterBits);
    if (this.nextGuest > geometry.clusters) {
      throw new InvalidArgumentError(`Blocks were written up to cluster ${this.nextGuest - 1}, past the virtual size ${virtualSize}`);
    }
    await this.flushPending();
    await this.flushTable();
    await this.patchSharedClusters();

    const order = this.options.refcountOrder;
    const l1Host = this.nextHost;
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
        incompatibleFeatures: 0n,
        autoclearFeatures: 0n,
        ...(this.options.backing ? { backingFileName: this.options.backing.name, backingFormat: this.options.backing.format } : {}),
      }),
    );
    await this.output.finish(plan.totalClusters * this.cs);
    await this.output.commit();
    return {
      clusters: { total: geometry.clusters, ...this.counts },
      fileClusters: plan.totalClusters,
      bytesWritten: this.output.bytesWritten,
      dedup: this.dedup?.stats,
    };
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
   * The bytes stored at a host offset: from the batch not yet written when it is there (a
   * flush per dedup match would break write batching), else read back from the file.
   */
  private async storedBytes(host: number, length: number): Promise<Uint8Array> {
    const queued = this.pending[host / this.cs - this.pendingHost];
    if (this.pending.length > 0 && queued) return queued.data.subarray(0, length);
    this.readBackBuffer ??= allocIoBuffer(this.cs);
    // The Deduplicator compares before it asks again, so one scratch buffer serves every read.
    return this.output.readAtSync(host, length, this.readBackBuffer);
  }

  /** Queues a data cluster at the next host cluster; returns its host offset. */
  private async append(block: Block): Promise<number> {
    if (this.pendingBytes === 0) this.pendingHost = this.nextHost;
    const host = this.nextHost * this.cs;
    this.nextHost++;
    // A short last cluster still occupies a whole host cluster; the gap stays a hole.
    this.pending.push(block);
    this.pendingBytes += this.cs;
    if (block.data.length < this.cs || this.pendingBytes >= BATCH_BYTES) await this.flushPending();
    return host;
  }

  private async flushPending(): Promise<void> {
    if (this.pending.length === 0) return;
    const blocks = this.pending;
    this.pending = [];
    this.pendingBytes = 0;
    await this.output.writev(this.pendingHost * this.cs, blocks.map((b) => b.data));
    if (this.options.onBlockDone) for (const block of blocks) this.options.onBlockDone(block);
  }

  private async flushTable(): Promise<void> {
    if (this.tableUsed) {
      await this.flushPending();
      const host = this.nextHost++;
      await this.output.write(host * this.cs, this.table.slice());
      this.l1[this.tableIndex] = host * this.cs;
    } else this.l1[this.tableIndex] = 0;
    this.table.fill(0);
    this.tableUsed = false;
    this.tableIndex++;
  }

  /** Host offset of a stored guest cluster (from the current table or one already written). */
  private async hostOf(guest: number): Promise<number> {
    const table = Math.floor(guest / this.l2Entries);
    const pos = (guest % this.l2Entries) * 8;
    if (table === this.tableIndex) return entryOffset(this.tableView, pos);
    const tableOffset = this.l1[table];
    if (!tableOffset) throw new RangeError(`InternalImageWriter: guest cluster ${guest} has no L2 table`);
    return entryOffset(viewOf(this.output.readAtSync(tableOffset + pos, 8)), 0);
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
    // (host cluster << 32 | count) for every cluster referenced more than once, sorted by host.
    const shared = this.sharedClusters();
    const overrides = new BigUint64Array(shared.length);
    for (let i = 0; i < shared.length; i++) {
      const [guest, count] = shared[i]!;
      overrides[i] = (BigInt((await this.hostOf(guest)) / this.cs) << 32n) | BigInt(count);
    }
    const sorted = overrides.sort();

    const perBlock = refcountsPerBlock(this.options.clusterBits, plan.refcountOrder);
    let next = 0;
    for (let b = 0; b < plan.refcountBlockClusters; b++) {
      const block = new Uint8Array(this.cs);
      const first = b * perBlock;
      const end = Math.min(plan.totalClusters, first + perBlock);
      if (end > first) fillRefcountOnes(block, 0, end - first, plan.refcountOrder);
      for (; next < sorted.length && Number(sorted[next]! >> 32n) < end; next++) {
        const host = Number(sorted[next]! >> 32n);
        setRefcount(block, host - first, plan.refcountOrder, Number(sorted[next]! & 0xffffffffn));
      }
      await this.output.write(plan.refcountBlocksOffset + b * this.cs, block);
    }
  }
}

function entryOffset(view: DataView, pos: number): number {
  return (view.getUint32(pos) & OFFSET_MASK_HI) * 2 ** 32 + ((view.getUint32(pos + 4) & OFFSET_MASK_LO) >>> 0);
}

/** The internal sink as a Writable of Blocks; `end()` writes the metadata for `virtualSize()`. */
export function createInternalSink(writer: InternalImageWriter, virtualSize: () => number, onFinish?: (summary: InternalSummary) => void): Writable {
  return new Writable({
    objectMode: true,
    highWaterMark: 32,
    write(block: Block, _encoding, done) {
      writer.write(block).then(() => done(), done);
    },
    final(done) {
      writer.finish(virtualSize()).then((summary) => {
        onFinish?.(summary);
        done();
      }, done);
    },
    destroy(err, done) {
      if (err) writer.abort().then(() => done(err), () => done(err));
      else done(null);
    },
  });
}

/** Options of {@link writeInternal}: the writer's, in the library's usual units, the cluster size learned from the batches. */
export interface WriteInternalOptions extends Omit<InternalImageOptions, 'clusterBits' | 'refcountOrder' | 'dedup'> {
  /** Bytes per cluster: only for a source of single Blocks, or to insist on one. Batches carry it; default 65536. */
  clusterSize?: number;
  /** Refcount width in bits (1..64, a power of two). Default 16. */
  refcountBits?: number;
  /**
   * Share identical clusters (confirmed byte for byte): `{ hasher }` from `createHasher()`,
   * with an optional `maxEntries` cap on the fingerprint index.
   */
  dedup?: InternalImageOptions['dedup'];
  /** Cancels the write: it rejects with an AbortedError and removes the image. */
  signal?: AbortSignal;
}

/** What {@link writeInternal} wrote: the writer's summary and the guest length. */
export interface WriteInternalResult extends InternalSummary {
  /** Guest bytes received (the input size). */
  inputBytes: number;
}

/**
 * The internal (single-file) sink at the end of an iterable chain; see writeExternal in
 * external-sink.ts for the rules (cluster size from the batches, the last batch required,
 * nothing left behind on failure or abort).
 */
export async function writeInternal(items: AsyncIterable<BlockItem> | Iterable<BlockItem>, options: WriteInternalOptions): Promise<WriteInternalResult> {
  const { signal, clusterSize: wanted, refcountBits = 16, ...rest } = options;
  if (signal?.aborted) throw abortError(signal);
  const refcountOrder = Math.log2(refcountBits);
  if (!Number.isInteger(refcountOrder) || refcountOrder < 0 || refcountOrder > 6) throw new InvalidArgumentError(`Invalid refcountBits ${refcountBits}: a power of two from 1 to 64`);
  const source = signal ? abortable(asAsync(items), signal) : asAsync(items);
  const iterator = source[Symbol.asyncIterator]();
  let writer: InternalImageWriter | undefined;
  let sawBatch = false;
  try {
    let next = await iterator.next();
    const first = next.done ? undefined : next.value;
    const clusterSize = (first && isBatch(first) ? clusterSizeFor('writeInternal', first.clusterSize, wanted) : wanted) ?? 65536;
    const clusterBits = Math.log2(clusterSize);
    if (!Number.isInteger(clusterBits) || clusterBits < 9 || clusterBits > 21) throw new InvalidArgumentError(`Invalid cluster size ${clusterSize}: a power of two from 512 bytes to 2 MiB`);
    writer = await InternalImageWriter.create({ ...rest, clusterBits, refcountOrder });
    while (!next.done) {
      const item = next.value;
      if (isBatch(item)) sawBatch = true;
      await writer.writeItem(item);
      next = await iterator.next();
    }
    if (signal?.aborted) throw abortError(signal);
    if (sawBatch && !writer.sawInputEnd) throw missingInputEnd('writeInternal');
    const inputBytes = writer.inputBytes;
    const summary = await writer.finish();
    writer = undefined;
    return { ...summary, inputBytes };
  } catch (err) {
    await writer?.abort();
    void iterator.return?.(undefined)?.catch(() => {});
    throw err;
  }
}

async function* asAsync<T>(items: AsyncIterable<T> | Iterable<T>): AsyncGenerator<T> {
  yield* items;
}
