/**
 * The metadata emitter: writes the qcow2 file of a data-file image, strictly in increasing
 * offset order (so the output may be a pipe), in the layout of format/layout.ts:
 *
 *   header cluster · refcount table · refcount blocks · L1 · L2 tables in L1 order
 *
 * Two ways to produce it:
 * - **streamed** (the virtual size is known up front, and either raw mode or a sequential
 *   output): every L2 table is allocated, so everything before the L2 tables depends only on
 *   the size and is written by `start()`; each L2 table follows as soon as the guest clusters it
 *   maps have been recorded. Memory: one L2 table.
 * - **at the end** (size unknown, or sparse mode into a regular file): clusters are recorded in
 *   an {@link AllocationBitmap} (sparse mode) and the whole file is written by `finish()`; in
 *   sparse mode only non-empty L2 tables are allocated (compact, like qemu-img convert).
 *
 * Raw mode (autoclear bit 1) maps every guest cluster, zeros included, to `guest_off | COPIED`
 * (guest cluster 0 is `0x8000000000000000`, pitfall P2). Sparse mode maps only clusters that
 * hold data and leaves the rest 0 (unallocated: reads as zero).
 */

import {
  buildL1Table,
  buildRefcountBlock,
  buildRefcountTable,
  checkVirtualSize,
  encodeHeaderCluster,
  encodeL2Entry,
  imageGeometry,
  planMetadata,
  viewOf,
  type Geometry,
  type MetadataPlan,
} from '../format/index.js';
import { InvalidArgumentError } from '../errors.js';
import type { OffsetWriter } from '../io/output.js';
import { AllocationBitmap } from './bitmap.js';
import { featureBits, type ImageSettings } from './settings.js';

/** Options of a {@link MetadataEmitter}. */
export interface MetadataEmitterOptions {
  /** Cluster size, refcount width and raw bit, validated. */
  settings: ImageSettings;
  /** The data-file name stored in the header extension. */
  dataFileName: string;
  /**
   * Make the image an overlay of this backing file (sparse mode only: the raw bit and a
   * backing file exclude each other). Unallocated clusters then read from the backing file,
   * so clusters recorded as zero get a zero flag instead.
   */
  backing?:
    | {
        /** The backing-file name stored in the header. */
        name: string;
        /** Its format, stored in the backing-format extension (`qcow2`, `raw`). */
        format: string;
      }
    | undefined;
  /** The virtual size (a multiple of 512), when known before the data: enables streaming. */
  virtualSize?: number;
}

/** What a guest cluster is, as far as the metadata is concerned. */
export type ClusterState = 'data' | 'zero' | 'unchanged';

/** What the emitter wrote. */
export interface MetadataResult {
  /** The virtual size written in the header. */
  virtualSize: number;
  /** Clusters of the metadata file (all of them have refcount 1). */
  metadataClusters: number;
  /** L2 tables allocated. */
  l2Tables: number;
  /** How the metadata was produced. */
  layout: 'streamed' | 'at-end';
}

/** Small writes (512-byte L2 tables, refcount blocks) are gathered into writes of this size. */
const BATCH_BYTES = 64 * 1024;

/**
 * Writes the metadata of a data-file image: header, refcount table and blocks, L1 and L2
 * tables. With a known size in raw mode (or into a pipe) it streams them while the data flows;
 * otherwise it records each cluster's state and writes everything in `finish`.
 */
export class MetadataEmitter {
  /** True when the metadata streams alongside the data (see the module comment). */
  readonly streaming: boolean;
  private readonly settings: ImageSettings;
  private readonly dataFileName: string;
  private readonly declaredSize: number | undefined;
  private readonly bitmap: AllocationBitmap | undefined;
  /** Overlays: clusters that must read as zero over the backing file (zero-flagged entries). */
  private readonly zeroBitmap: AllocationBitmap | undefined;
  private readonly backing: { name: string; format: string } | undefined;
  /** Streamed layout only. */
  private readonly plan: MetadataPlan | undefined;
  /** Next cluster index record() accepts (clusters come in increasing order). */
  private nextIndex = 0;
  /** Streamed layout: the next L2 table to write, and the entries of that table so far (sparse). */
  private nextTable = 0;
  private openTable: Uint8Array | undefined;
  /** Sequential write position and the batch not yet written. */
  private position = 0;
  private batch: Uint8Array[] = [];
  private batchBytes = 0;
  private started = false;

  constructor(
    private readonly output: OffsetWriter,
    options: MetadataEmitterOptions,
  ) {
    this.settings = options.settings;
    this.dataFileName = options.dataFileName;
    this.declaredSize = options.virtualSize;
    this.backing = options.backing;
    if (this.backing && options.settings.dataFileRaw) {
      throw new InvalidArgumentError('A backing file cannot be used with the raw-data-file bit (the data file alone would not be the guest image)', {
        hint: 'Use --no-data-file-raw (API: dataFileRaw: false)',
      });
    }
    this.streaming = options.virtualSize !== undefined && (options.settings.dataFileRaw || output.kind === 'stream');
    if (options.virtualSize !== undefined) {
      if (options.virtualSize % 512 !== 0) throw new InvalidArgumentError(`The virtual size ${options.virtualSize} is not a multiple of 512`);
      checkVirtualSize(options.virtualSize, options.settings.clusterBits);
    }
    if (this.streaming && options.virtualSize !== undefined) {
      const geometry = imageGeometry(options.virtualSize, options.settings.clusterBits);
      this.plan = planMetadata({ geometry, refcountOrder: options.settings.refcountOrder, l2Tables: geometry.l1Size });
    }
    if (!this.streaming && !options.settings.dataFileRaw) this.bitmap = new AllocationBitmap();
    if (!this.streaming && this.backing) this.zeroBitmap = new AllocationBitmap();
  }

  /** Streamed layout: writes the header, refcount structures and L1. At-end layout: nothing. */
  async start(): Promise<void> {
    if (this.started) return;
    this.started = true;
    if (!this.plan) return;
    await this.writeFrontMatter(this.plan, () => true);
    // Out at once: a reader at the other end of a pipe can start on the header.
    await this.flushBatch();
  }

  /**
   * Records guest cluster `index` (increasing order; skipped indexes are unallocated) and what
   * it is: `data` (mapped to the data file), `zero` (reads as zero), or `unchanged` (an
   * overlay's cluster equal to its backing file: left unallocated). Without a backing file
   * `zero` and `unchanged` are the same. Returns a promise only when L2 tables were written.
   */
  record(index: number, state: ClusterState): Promise<void> | undefined {
    if (index < this.nextIndex) throw new RangeError(`Guest cluster ${index} recorded after cluster ${this.nextIndex - 1}: clusters must come in increasing order`);
    this.nextIndex = index + 1;
    if (!this.plan) {
      if (state === 'data') this.bitmap?.set(index);
      else if (state === 'zero') this.zeroBitmap?.set(index);
      return undefined;
    }
    const geometry = this.plan.geometry;
    if (index >= geometry.clusters) {
      throw new RangeError(`Guest cluster ${index} is beyond the virtual size ${geometry.size}`);
    }
    const table = Math.floor(index / geometry.l2Entries);
    if (table > this.nextTable) {
      return this.writeStreamedTables(table).then(() => this.setEntry(geometry, index, state));
    }
    this.setEntry(geometry, index, state);
    return undefined;
  }

  /**
   * Records guest clusters [first, first + count), all in one state: what a zero run needs.
   * Same contract as {@link record}, at the cost of one call per L2 table passed rather than
   * per cluster wherever the entries need no writing (raw mode, and zeros without a backing file).
   */
  recordRun(first: number, count: number, state: ClusterState): Promise<void> | undefined {
    if (!Number.isSafeInteger(count) || count < 1) throw new RangeError(`Invalid run of ${count} clusters`);
    if (first < this.nextIndex) throw new RangeError(`Guest cluster ${first} recorded after cluster ${this.nextIndex - 1}: clusters must come in increasing order`);
    const end = first + count;
    if (!this.plan) {
      this.nextIndex = end;
      if (state === 'data') this.bitmap?.setRange(first, end);
      else if (state === 'zero') this.zeroBitmap?.setRange(first, end);
      return undefined;
    }
    const geometry = this.plan.geometry;
    if (end > geometry.clusters) throw new RangeError(`Guest cluster ${end - 1} is beyond the virtual size ${geometry.size}`);
    if (this.entryNeeded(state)) return this.recordEach(first, end, state);
    this.nextIndex = end;
    const lastTable = Math.floor((end - 1) / geometry.l2Entries);
    return lastTable > this.nextTable ? this.writeStreamedTables(lastTable) : undefined;
  }

  private async recordEach(first: number, end: number, state: ClusterState): Promise<void> {
    for (let index = first; index < end; index++) {
      const recorded = this.record(index, state);
      if (recorded) await recorded;
    }
  }

  /**
   * Writes whatever is left (everything, in the at-end layout) for the final virtual size.
   * The caller then commits the output.
   */
  async finish(virtualSize: number): Promise<MetadataResult> {
    if (virtualSize % 512 !== 0) throw new InvalidArgumentError(`The virtual size ${virtualSize} is not a multiple of 512`);
    if (this.plan) {
      if (virtualSize !== this.declaredSize) {
        throw new RangeError(`The metadata was streamed for ${this.declaredSize} bytes but the image has ${virtualSize}`);
      }
      await this.start();
      await this.writeStreamedTables(this.plan.geometry.l1Size);
      await this.flushBatch();
      await this.output.finish(this.position);
      return { virtualSize, metadataClusters: this.plan.metadataClusters, l2Tables: this.plan.l2Tables, layout: 'streamed' };
    }
    checkVirtualSize(virtualSize, this.settings.clusterBits);
    const geometry = imageGeometry(virtualSize, this.settings.clusterBits);
    if (this.nextIndex > geometry.clusters) {
      throw new RangeError(`Guest cluster ${this.nextIndex - 1} is beyond the virtual size ${virtualSize}`);
    }
    const present = new Uint8Array(geometry.l1Size);
    let l2Tables = 0;
    for (let t = 0; t < geometry.l1Size; t++) {
      const [first, end] = [t * geometry.l2Entries, (t + 1) * geometry.l2Entries];
      const has = !this.bitmap || this.bitmap.anyInRange(first, end) || (this.zeroBitmap?.anyInRange(first, end) ?? false);
      if (has) {
        present[t] = 1;
        l2Tables++;
      }
    }
    const plan = planMetadata({ geometry, refcountOrder: this.settings.refcountOrder, l2Tables });
    this.started = true;
    await this.writeFrontMatter(plan, (t) => present[t] === 1);
    for (let t = 0; t < geometry.l1Size; t++) {
      if (present[t] === 1) await this.append(this.bitmap ? this.sparseTableFromBitmap(geometry, t, this.bitmap) : rawTable(geometry, t));
    }
    await this.flushBatch();
    await this.output.finish(this.position);
    return { virtualSize, metadataClusters: plan.metadataClusters, l2Tables, layout: 'at-end' };
  }

  /** Whether a streamed L2 entry must be written for this state (otherwise it stays as built). */
  private entryNeeded(state: ClusterState): boolean {
    // Raw tables depend only on their index and are built when written; unallocated is all zero.
    return !(this.settings.dataFileRaw || state === 'unchanged' || (state === 'zero' && !this.backing));
  }

  private setEntry(geometry: Geometry, index: number, state: ClusterState): void {
    if (!this.entryNeeded(state)) return;
    this.openTable ??= new Uint8Array(geometry.clusterSize);
    const entry = (index % geometry.l2Entries) * geometry.l2EntrySize;
    if (state === 'data') encodeL2Entry(viewOf(this.openTable), entry, index * geometry.clusterSize, { copied: true });
    else encodeL2Entry(viewOf(this.openTable), entry, 0, { zero: true });
  }

  /** Streamed layout: writes L2 tables [nextTable, end). */
  private async writeStreamedTables(end: number): Promise<void> {
    const plan = this.plan;
    if (!plan) return;
    if (!this.started) await this.start();
    for (; this.nextTable < end; this.nextTable++) {
      let table: Uint8Array;
      if (this.settings.dataFileRaw) {
        table = rawTable(plan.geometry, this.nextTable);
      } else {
        table = this.openTable ?? new Uint8Array(plan.geometry.clusterSize);
        this.openTable = undefined;
      }
      await this.append(table);
    }
  }

  private sparseTableFromBitmap(geometry: Geometry, table: number, bitmap: AllocationBitmap): Uint8Array {
    const out = new Uint8Array(geometry.clusterSize);
    const view = viewOf(out);
    const first = table * geometry.l2Entries;
    const end = Math.min(geometry.clusters, first + geometry.l2Entries);
    for (let index = first; index < end; index++) {
      const entry = (index - first) * geometry.l2EntrySize;
      if (bitmap.get(index)) encodeL2Entry(view, entry, index * geometry.clusterSize, { copied: true });
      else if (this.zeroBitmap?.get(index)) encodeL2Entry(view, entry, 0, { zero: true });
    }
    return out;
  }

  private async writeFrontMatter(plan: MetadataPlan, hasTable: (l1Index: number) => boolean): Promise<void> {
    const { geometry } = plan;
    await this.append(
      encodeHeaderCluster({
        clusterBits: geometry.clusterBits,
        size: geometry.size,
        l1Size: geometry.l1Size,
        l1TableOffset: plan.l1Offset,
        refcountTableOffset: plan.refcountTableOffset,
        refcountTableClusters: plan.refcountTableClusters,
        refcountOrder: plan.refcountOrder,
        ...featureBits(this.settings),
        dataFileName: this.dataFileName,
        ...(this.backing ? { backingFileName: this.backing.name, backingFormat: this.backing.format } : {}),
      }),
    );
    await this.append(buildRefcountTable(plan));
    for (let i = 0; i < plan.refcountBlockClusters; i++) await this.append(buildRefcountBlock(plan, i));
    await this.append(buildL1Table(plan, hasTable));
    if (this.position + this.batchBytes !== plan.l2Offset) {
      throw new Error(`unreachable: the L1 table ends at ${this.position + this.batchBytes}, the plan says ${plan.l2Offset}`);
    }
  }

  private async append(bytes: Uint8Array): Promise<void> {
    if (bytes.length === 0) return;
    this.batch.push(bytes);
    this.batchBytes += bytes.length;
    if (this.batchBytes >= BATCH_BYTES) await this.flushBatch();
  }

  private async flushBatch(): Promise<void> {
    if (this.batchBytes === 0) return;
    const chunks = this.batch;
    const length = this.batchBytes;
    this.batch = [];
    this.batchBytes = 0;
    await this.output.writev(this.position, chunks);
    this.position += length;
  }
}

/** A raw-mode L2 table: every guest cluster it maps is `guest_offset | COPIED`. */
export function rawTable(geometry: Geometry, table: number): Uint8Array {
  const out = new Uint8Array(geometry.clusterSize);
  const view = viewOf(out);
  const first = table * geometry.l2Entries;
  const count = Math.min(geometry.l2Entries, geometry.clusters - first);
  for (let e = 0; e < count; e++) {
    encodeL2Entry(view, e * geometry.l2EntrySize, (first + e) * geometry.clusterSize, { copied: true });
  }
  return out;
}
