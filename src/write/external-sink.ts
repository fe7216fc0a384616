/**
 * The external sink: Blocks in, a qcow2 metadata file plus its raw data file out.
 *
 * Each cluster with data goes to the data file at its guest offset (host == guest with a data
 * file); runs of adjacent data clusters are written with one writev, and one write is kept in
 * flight while the next run gathers. Zero clusters (`block.zero`, set by zero-detect) are not
 * written: holes on a regular file, real zeros on a pipe (OffsetWriter fills the gap). A zero
 * run (Block.count) is taken in one step, costing O(L2 tables) rather than O(clusters). The data
 * file ends exactly at the virtual size. The metadata goes through the {@link MetadataEmitter}.
 *
 * Blocks must arrive in increasing index order; a missing index counts as a zero cluster.
 * A Block handed to the sink must not be modified afterwards (it may be written later).
 *
 * Outputs are written under temporary names and renamed on success; on failure both are
 * aborted, so nothing that looks valid is left behind (pipes cannot be undone).
 */

import { BLOCK_STREAM_HIGH_WATER_MARK, clusterSizeFor, isBatch, type Block, type BlockItem } from '../block.js';
import { abortable, abortError } from './abort.js';
import { isAllZero } from '../io/buffers.js';
import { InvalidArgumentError } from '../errors.js';
import { WriterSinkStream } from './sink-stream.js';
import { checkVirtualSize, roundUpToSector } from '../format/index.js';
import { COPIES_IN_FLIGHT, OffsetWriter, type CopySource, type OutputTarget } from '../io/output.js';
import { inputShrank, inputSizeMismatch } from './clusterize.js';
import { MetadataEmitter, type MetadataResult } from './metadata.js';
import { dataFileNameWarning, defaultDataFileName } from './paths.js';
import { checkDataFileName, resolveImageSettings, type ImageOptions, type ImageSettings, type WriteSummary } from './settings.js';

export interface ExternalSinkOptions extends ImageOptions {
  /** Where the qcow2 metadata goes: a path, '-' for standard output, or a Writable. */
  output: OutputTarget;
  /** Where the guest data goes: a path, '-' for standard output, or a Writable. */
  dataFile: OutputTarget;
  /**
   * The data-file name stored in the header. Default, when `dataFile` is a path: its path
   * relative to `output`'s directory when it lies there or below, else its absolute path
   * (src/write/paths.ts); required when it is a stream.
   */
  dataFileName?: string;
  /**
   * The number of guest bytes the Blocks will cover, when known in advance. The metadata then
   * streams while the data flows (raw mode, or any mode into a pipe), and a different amount
   * of input is an InputSizeError.
   */
  size?: number;
  /**
   * Replace existing files at `output` and `dataFile`. Default false: an existing file at
   * either is an error and neither output is created (the CLI's --force).
   */
  overwrite?: boolean;
  /** fsync both files (and their directory) before finish() resolves. Default true. */
  sync?: boolean;
  /** Make the image an overlay of this backing file (see MetadataEmitterOptions.backing). */
  backing?:
    | {
        /** The backing-file name stored in the header. */
        name: string;
        /** Its format, stored in the backing-format extension (`qcow2`, `raw`). */
        format: string;
      }
    | undefined;
  /**
   * Called once per Block when the sink no longer needs its bytes (written, or found zero), so
   * a source can recycle its buffers. Not called for Blocks still pending when a run fails.
   */
  onBlockDone?: (block: Block) => void;
  /** Called with each warning as it arises (also listed in the result's `warnings`). */
  onWarning?: (message: string) => void;
}

/** What the sink wrote. `dataBytesWritten` counts the zeros written to a pipe too. */
export interface SinkResult extends WriteSummary {
  /** Always `external`. */
  layout: 'external';
  /** Clusters of the metadata file. */
  metadataClusters: number;
  /** L2 tables allocated in the metadata file. */
  l2Tables: number;
  /** `streamed`: the metadata was written while the data flowed; `at-end`: after it. */
  metadataLayout: MetadataResult['layout'];
}

/**
 * The most bytes one data writev carries, and the most buffers (Linux IOV_MAX). One read's
 * worth: the kernel then copies bytes that were just read and are still in the CPU cache.
 * 8 MiB runs made the write copies about 3× as costly (perf: copy_folio_from_iter_atomic).
 */
const MAX_RUN_BYTES = 2 * 1024 * 1024;
const MAX_RUN_CHUNKS = 1024;
/** Data writes in flight at once (more gained nothing on ext4, measured with 2). */
const WRITES_IN_FLIGHT = 1;

/**
 * Guest clusters taken by copyFromFile or takeHole, recorded in index order once known: a
 * native copy in flight (its flags say which clusters were zeros once `copied` settles), or a
 * hole of the source, all zeros.
 */
type PendingRange = { index: number; length: number } & ({ flags: Uint8Array; copied: Promise<number> } | { flags?: undefined; copied?: undefined });

/**
 * The most ranges waiting behind a copy in flight: holes between copies queue up to this many
 * (64 × 32 MiB = 2 GiB of holes) before the writer waits for the copy at the head.
 */
const MAX_PENDING_RANGES = 64;

/** The sink as an object: `write` each Block, then `finish`, or `abort` on failure. */
export class ExternalWriter {
  private nextIndex = 0;
  /** One past the last guest byte received. */
  private end = 0;
  private shortBlockSeen = false;
  private dataClusters = 0;
  private unchangedClusters = 0;
  /** The run of adjacent data clusters being gathered. */
  private runOffset = 0;
  private runBytes = 0;
  private runChunks: Uint8Array[] = [];
  /**
   * The run's last contiguous stretch of memory (adjacent clusters of one read buffer), kept
   * as numbers and cut into a view only when it ends: one iovec per stretch, no object per cluster.
   */
  private stretchMemory: ArrayBufferLike | undefined;
  private stretchStart = 0;
  private stretchEnd = 0;
  /** The Blocks of the run, handed to onBlockDone once written. */
  private runBlocks: Block[] = [];
  /** The data writes in flight, and the first failure among them. */
  private readonly inflight = new Set<Promise<void>>();
  private writeFailure: unknown;
  /** Ranges taken by copyFromFile and takeHole and not yet recorded, oldest first. */
  private pending: PendingRange[] = [];
  /** How many of them are native copies in flight. */
  private copiesInFlight = 0;
  private done = false;
  private inputEnded = false;

  private readonly started = performance.now();

  private constructor(
    /** The validated image settings (cluster size, refcount width, raw bit). */
    readonly settings: ImageSettings,
    private readonly data: OffsetWriter,
    private readonly metadata: OffsetWriter,
    private readonly emitter: MetadataEmitter,
    private readonly declaredSize: number | undefined,
    private readonly onBlockDone: ((block: Block) => void) | undefined,
    private readonly names: { dataFile: string | undefined; dataFileName: string },
    private readonly warnings: readonly string[],
  ) {}

  /**
   * Validates the options, opens both outputs (temporary names for files) and, when the size
   * is known, writes the leading metadata. Throws before creating anything when an option is bad.
   */
  static async create(options: ExternalSinkOptions): Promise<ExternalWriter> {
    const settings = resolveImageSettings(options);
    const dataFilePath = typeof options.dataFile === 'string' && options.dataFile !== '-' ? options.dataFile : undefined;
    const dataFileName = options.dataFileName ?? (dataFilePath === undefined ? undefined : defaultDataFileName(options.output, dataFilePath));
    if (dataFileName === undefined) {
      throw new InvalidArgumentError('dataFileName is required when the data file is not a path');
    }
    checkDataFileName(dataFileName, settings);
    const warnings: string[] = [];
    const warning = dataFileNameWarning(options.output, dataFileName, options.dataFile);
    if (warning !== undefined) {
      warnings.push(warning);
      options.onWarning?.(warning);
    }
    const { size } = options;
    if (size !== undefined) {
      if (!Number.isSafeInteger(size) || size < 0) throw new InvalidArgumentError(`Invalid input size ${size}`);
      checkVirtualSize(roundUpToSector(size), settings.clusterBits);
    }
    if (options.output === '-' && options.dataFile === '-') {
      throw new InvalidArgumentError('The metadata and the data file cannot both go to standard output');
    }
    const sync = options.sync ?? true;
    // The data file ends at the input size: an object's part size follows from it.
    const overwrite = options.overwrite ?? false;
    const data = await OffsetWriter.create(options.dataFile, { label: 'data file', overwrite, sync, sizeHint: size });
    let metadata: OffsetWriter;
    try {
      metadata = await OffsetWriter.create(options.output, { label: 'metadata file', overwrite, sync });
    } catch (err) {
      await data.abort();
      throw err;
    }
    const emitter = new MetadataEmitter(metadata, {
      settings,
      dataFileName,
      backing: options.backing,
      ...(size === undefined ? {} : { virtualSize: roundUpToSector(size) }),
    });
    const writer = new ExternalWriter(settings, data, metadata, emitter, size, options.onBlockDone, { dataFile: dataFilePath, dataFileName }, warnings);
    try {
      await emitter.start();
    } catch (err) {
      await writer.abort();
      throw err;
    }
    return writer;
  }

  /** Takes the next Block. */
  async write(block: Block): Promise<void> {
    // Clusters copied natively before this Block are recorded first: records go in index order.
    if (this.pending.length > 0) await this.settlePending();
    const cs = this.settings.clusterSize;
    const { index, data } = block;
    if (!Number.isSafeInteger(index) || index < this.nextIndex) {
      throw new InvalidArgumentError(`Block ${index} arrived after block ${this.nextIndex - 1}: blocks must come in increasing order`);
    }
    // A zero run (Block.count) stands for that many whole zero clusters, recorded in one go.
    const clusters = block.count ?? 1;
    if (block.count !== undefined && (!Number.isSafeInteger(clusters) || clusters < 1 || data.length !== cs)) {
      throw new InvalidArgumentError(`Block ${index} is a zero run of ${clusters} clusters of ${data.length} bytes; runs are whole ${cs}-byte clusters`);
    }
    if (data.length > cs || data.length === 0 || this.shortBlockSeen) {
      throw new InvalidArgumentError(
        this.shortBlockSeen
          ? `Block ${index} follows a short block: only the last block of an image may be shorter than a cluster`
          : `Block ${index} holds ${data.length} bytes; blocks hold 1..${cs} bytes (the cluster size)`,
        // The usual cause: a source cutting another cluster size than the sink's.
        { hint: `The sink's cluster size is ${cs}: give it the source's, e.g. createExternalSink({ clusterSize: source.clusterSize, … })` },
      );
    }
    if (data.length < cs) this.shortBlockSeen = true;
    // A Block nobody zero-checked is checked here (memcmp speed): a pipeline that left
    // zero-detect out must not store zero clusters as data.
    if (block.zero === undefined && block.count === undefined && !block.sameAsBase) block.zero = isAllZero(data);
    const offset = index * cs;
    const end = (index + clusters - 1) * cs + data.length;
    if (this.declaredSize !== undefined && end > this.declaredSize) throw inputSizeMismatch(this.declaredSize, end, true);
    this.nextIndex = index + clusters;
    this.end = end;

    // An overlay leaves clusters equal to its backing file unallocated: nothing to write.
    const state = block.sameAsBase ? 'unchanged' : block.zero || block.count !== undefined ? 'zero' : 'data';
    const hasData = state === 'data';
    if (state === 'unchanged') this.unchangedClusters += clusters;
    const recorded = block.count === undefined ? this.emitter.record(index, state) : this.emitter.recordRun(index, clusters, state);
    if (recorded) await recorded;
    if (!hasData) {
      this.onBlockDone?.(block);
      return;
    }
    this.dataClusters++;
    // (The open stretch is one iovec more than runChunks holds.)
    if (this.runBytes > 0 && (offset !== this.runOffset + this.runBytes || this.runBytes >= MAX_RUN_BYTES || this.runChunks.length >= MAX_RUN_CHUNKS - 1)) {
      await this.flushRun();
    }
    if (this.runBytes === 0) this.runOffset = offset;
    if (this.stretchMemory === data.buffer && this.stretchEnd === data.byteOffset) {
      this.stretchEnd += data.byteLength;
    } else {
      this.endStretch();
      this.stretchMemory = data.buffer;
      this.stretchStart = data.byteOffset;
      this.stretchEnd = data.byteOffset + data.byteLength;
    }
    if (this.onBlockDone) this.runBlocks.push(block);
    this.runBytes += data.length;
  }

  /**
   * Takes the next Block or batch. A batch's cluster size must be the sink's; its `inputEnd`
   * (on a source's last batch) is where the image ends, whatever Blocks came before it.
   */
  async writeItem(item: BlockItem): Promise<void> {
    if (!isBatch(item)) return this.write(item);
    if (item.clusterSize !== this.settings.clusterSize) {
      throw new InvalidArgumentError(`A batch of ${item.clusterSize}-byte clusters reached a sink of ${this.settings.clusterSize}-byte clusters`, {
        hint: 'Leave the sink\'s clusterSize out: writeExternal() learns it from the batches',
      });
    }
    const { blocks } = item;
    for (let i = 0; i < blocks.length; i++) await this.write(blocks[i]!);
    if (item.inputEnd !== undefined) this.takeInputEnd(item.inputEnd);
  }

  /** Records where the input ended (a source's last batch): the image ends there. */
  private takeInputEnd(inputEnd: number): void {
    if (!Number.isSafeInteger(inputEnd) || inputEnd < this.end) {
      throw new InvalidArgumentError(`A batch says the input ended at ${inputEnd}, but Blocks up to ${this.end} arrived`);
    }
    if (this.declaredSize !== undefined && inputEnd !== this.declaredSize) throw inputSizeMismatch(this.declaredSize, inputEnd);
    // Trailing Blocks a stage dropped are zeros: the image keeps the input's length.
    this.end = inputEnd;
    this.inputEnded = true;
  }

  /** Whether a batch with `inputEnd` (a source's last) has arrived. */
  get sawInputEnd(): boolean {
    return this.inputEnded;
  }

  /**
   * Whether {@link copyFromFile} can be used: the data file is a regular file and the native
   * addon is built (it is optional; see src/io/native.ts).
   */
  get canCopyFromFile(): boolean {
    return this.data.canCopyClusters;
  }

  /**
   * Takes the guest bytes [offset, offset + length) straight from a regular file, at the same
   * offset in it: the same image as writing the Blocks `readBlocks` and `zeroDetect` would make
   * of them, without a Block per cluster. Read, zero check and write happen in native code on
   * the thread pool ({@link OffsetWriter.copyClustersFrom}); a few copies run at once and their
   * clusters are recorded in order. `offset` is a cluster boundary at or past the last cluster
   * taken, `length` at most 16 MiB and whole clusters, except for the image's last bytes. The
   * file must stay open until finish() or abort() settles. Only where {@link canCopyFromFile}.
   * `sourceOffset` reads the bytes from elsewhere in the file (an image's block: VHD, VHDX).
   */
  async copyFromFile(source: CopySource, offset: number, length: number, sourceOffset = offset): Promise<void> {
    const index = this.takeRange('copyFromFile', offset, length);
    // Data gathered by write() goes out first, so a failure surfaces in input order.
    await this.flushRun();
    const flags = new Uint8Array(Math.ceil(length / this.settings.clusterSize));
    const copied = this.data.copyClustersFrom(source, sourceOffset, offset, length, this.settings.clusterSize, flags);
    // Observed when its turn comes (recordNext); until then a failure must not count as unhandled.
    copied.catch(() => {});
    this.pending.push({ index, length, flags, copied });
    this.copiesInFlight++;
    while (this.copiesInFlight >= COPIES_IN_FLIGHT) await this.recordNext();
  }

  /**
   * Takes the guest bytes [offset, offset + length) as zeros, unread: a hole of the file that
   * copyFromFile reads. Unlike a zero run given to write(), it does not wait for the copies in
   * flight but queues behind them, so a sparse file keeps its copies overlapping. Same rules as
   * copyFromFile.
   */
  async takeHole(offset: number, length: number): Promise<void> {
    const index = this.takeRange('takeHole', offset, length);
    if (this.pending.length === 0) return this.recordRange({ index, length });
    this.pending.push({ index, length });
    while (this.pending.length > MAX_PENDING_RANGES) await this.recordNext();
  }

  /** Checks a range given to copyFromFile or takeHole and takes it; returns its first cluster. */
  private takeRange(method: string, offset: number, length: number): number {
    const cs = this.settings.clusterSize;
    if (!Number.isSafeInteger(offset) || offset % cs !== 0 || offset / cs < this.nextIndex || this.shortBlockSeen) {
      throw new InvalidArgumentError(`${method} at ${offset}: ranges start on a cluster boundary after everything taken so far (${this.nextIndex * cs})`);
    }
    if (!Number.isSafeInteger(length) || length <= 0) throw new InvalidArgumentError(`${method}: invalid length ${length}`);
    const end = offset + length;
    if (this.declaredSize !== undefined && end > this.declaredSize) throw inputSizeMismatch(this.declaredSize, end, true);
    if (this.writeFailure !== undefined) throw this.writeFailure;
    if (length % cs !== 0) this.shortBlockSeen = true;
    this.nextIndex = offset / cs + Math.ceil(length / cs);
    this.end = end;
    return offset / cs;
  }

  /** Records the oldest pending range, waiting for its copy when it is one. */
  private async recordNext(): Promise<void> {
    const range = this.pending.shift()!;
    if (range.copied === undefined) return this.recordRange(range);
    try {
      const bytesRead = await range.copied;
      if (bytesRead < range.length) throw inputShrank(this.declaredSize ?? this.end, range.index * this.settings.clusterSize + bytesRead);
    } finally {
      this.copiesInFlight--;
    }
    await this.recordRange(range);
  }

  /** Records the clusters of a settled range: runs of data and of zeros, in index order. */
  private async recordRange({ index, length, flags }: PendingRange): Promise<void> {
    if (flags === undefined) {
      const recorded = this.emitter.recordRun(index, Math.ceil(length / this.settings.clusterSize), 'zero');
      if (recorded) await recorded;
      return;
    }
    for (let start = 0; start < flags.length; ) {
      const zero = flags[start];
      let stop = start + 1;
      while (stop < flags.length && flags[stop] === zero) stop++;
      const state = zero ? 'zero' : 'data';
      if (!zero) this.dataClusters += stop - start;
      const recorded = this.emitter.recordRun(index + start, stop - start, state);
      if (recorded) await recorded;
      start = stop;
    }
  }

  /** Records every pending range; rethrows the first failure. */
  private async settlePending(): Promise<void> {
    while (this.pending.length > 0) await this.recordNext();
  }

  /** Writes what remains, sets the data file's length, and commits both outputs. */
  async finish(): Promise<SinkResult> {
    if (this.done) throw new Error('ExternalWriter.finish called twice');
    this.done = true;
    try {
      if (this.declaredSize !== undefined && this.end !== this.declaredSize) throw inputSizeMismatch(this.declaredSize, this.end);
      await this.settlePending();
      await this.flushRun();
      await this.settle();
      const virtualSize = roundUpToSector(this.end);
      await this.data.finish(virtualSize);
      const metadata = await this.emitter.finish(virtualSize);
      await this.data.commit();
      try {
        await this.metadata.commit();
      } catch (err) {
        // The data file is useless without its metadata; remove the one this run created.
        await this.data.discard();
        throw err;
      }
      const clusters = Math.ceil(virtualSize / this.settings.clusterSize);
      return {
        layout: 'external',
        inputBytes: this.end,
        virtualSize,
        clusterSize: this.settings.clusterSize,
        refcountBits: 2 ** this.settings.refcountOrder,
        dataFileRaw: this.settings.dataFileRaw,
        clusters,
        dataClusters: this.dataClusters,
        zeroClusters: clusters - this.dataClusters - this.unchangedClusters,
        duplicateClusters: 0,
        unchangedClusters: this.unchangedClusters,
        dataBytesWritten: this.data.bytesWritten,
        metadataBytesWritten: this.metadata.bytesWritten,
        metadataClusters: metadata.metadataClusters,
        l2Tables: metadata.l2Tables,
        metadataLayout: metadata.layout,
        dataFile: this.names.dataFile,
        dataFileName: this.names.dataFileName,
        warnings: this.warnings,
        seconds: (performance.now() - this.started) / 1000,
      };
    } catch (err) {
      await this.abort();
      throw err;
    }
  }

  /** Removes temporary files after a failure. Never throws. */
  async abort(): Promise<void> {
    this.done = true;
    this.runChunks = [];
    this.stretchMemory = undefined;
    this.runBlocks = [];
    this.runBytes = 0;
    // A write blocked on a full pipe would never settle: wake it (it fails) before waiting.
    this.data.cancel();
    this.metadata.cancel();
    // The descriptors stay open until no copy or write can touch them any more.
    const pending = this.pending;
    this.pending = [];
    this.copiesInFlight = 0;
    await Promise.all([...this.inflight, ...pending.map((range) => range.copied?.catch(() => {}))]);
    await this.data.abort();
    await this.metadata.abort();
  }

  /** Adds the current stretch to the run's writev list. */
  private endStretch(): void {
    if (this.stretchMemory === undefined) return;
    this.runChunks.push(new Uint8Array(this.stretchMemory, this.stretchStart, this.stretchEnd - this.stretchStart));
    this.stretchMemory = undefined;
  }

  private async flushRun(): Promise<void> {
    if (this.runBytes === 0) return;
    this.endStretch();
    const chunks = this.runChunks;
    const offset = this.runOffset;
    const blocks = this.runBlocks;
    this.runChunks = [];
    this.runBlocks = [];
    this.runBytes = 0;
    // A stream takes its writes in order, one at a time.
    const maxInFlight = this.data.kind === 'file' ? WRITES_IN_FLIGHT : 1;
    while (this.inflight.size >= maxInFlight) await Promise.race(this.inflight);
    if (this.writeFailure !== undefined) throw this.writeFailure;
    // Not awaited: the next run gathers (and the source reads) while this one is written.
    const writing: Promise<void> = this.data
      .writev(offset, chunks)
      .then(
        () => {
          if (this.onBlockDone) for (const block of blocks) this.onBlockDone(block);
        },
        (err: unknown) => {
          this.writeFailure ??= err;
        },
      )
      .finally(() => this.inflight.delete(writing));
    this.inflight.add(writing);
  }

  /** Waits for every write in flight; rethrows the first failure. */
  private async settle(): Promise<void> {
    await Promise.all(this.inflight);
    if (this.writeFailure !== undefined) throw this.writeFailure;
  }
}

/** The sink as a Writable (object mode) for `pipeline(...)`; `finished` resolves with the summary. */
export class ExternalSinkStream extends WriterSinkStream<SinkResult> {
  constructor(options: ExternalSinkOptions) {
    super(() => ExternalWriter.create(options), BLOCK_STREAM_HIGH_WATER_MARK);
  }
}

/**
 * A Writable (object mode) that takes Blocks and writes a data-file qcow2 image; see
 * {@link ExternalSinkOptions}. After `await pipeline(...)`, `await sink.finished` gives the summary.
 */
export function createExternalSink(options: ExternalSinkOptions): ExternalSinkStream {
  return new ExternalSinkStream(options);
}

/** Options of {@link writeExternal}: the sink's, with the cluster size learned from the batches. */
export interface WriteExternalOptions extends Omit<ExternalSinkOptions, 'clusterSize'> {
  /**
   * Bytes per cluster: only for a source of single Blocks, or to insist on one (a batch of
   * another size is then refused). Batches carry it; the default is 65536.
   */
  clusterSize?: number;
  /** Cancels the write: it rejects with an AbortedError and removes both outputs. */
  signal?: AbortSignal;
}

/**
 * The external sink at the end of an iterable chain: takes Blocks or batches (in index order)
 * and resolves with what was written once both files are committed. The cluster size is the
 * batches' own. A stream of batches must include its source's last (the one with `inputEnd`):
 * ending without it means a stage dropped it, and the image would come out shorter than the
 * input, so that is an InvalidArgumentError. On any failure or abort nothing is left behind.
 *
 * ```ts
 * const summary = await writeExternal(zeroDetect(readBatches(target, { size })), { output: 'disk.qcow2', dataFile: 'disk.data' });
 * ```
 */
export async function writeExternal(items: AsyncIterable<BlockItem> | Iterable<BlockItem>, options: WriteExternalOptions): Promise<SinkResult> {
  const { signal, clusterSize: wanted, ...sinkOptions } = options;
  if (signal?.aborted) throw abortError(signal);
  const source = signal ? abortable(toAsync(items), signal) : toAsync(items);
  const iterator = source[Symbol.asyncIterator]();
  let writer: ExternalWriter | undefined;
  let sawBatch = false;
  try {
    let next = await iterator.next();
    const first = next.done ? undefined : next.value;
    const clusterSize = first && isBatch(first) ? clusterSizeFor('writeExternal', first.clusterSize, wanted) : wanted;
    writer = await ExternalWriter.create({ ...sinkOptions, ...(clusterSize === undefined ? {} : { clusterSize }) });
    while (!next.done) {
      const item = next.value;
      if (isBatch(item)) sawBatch = true;
      await writer.writeItem(item);
      next = await iterator.next();
    }
    if (signal?.aborted) throw abortError(signal);
    if (sawBatch && !writer.sawInputEnd) throw missingInputEnd('writeExternal');
    const result = await writer.finish();
    writer = undefined;
    return result;
  } catch (err) {
    await writer?.abort();
    void iterator.return?.(undefined)?.catch(() => {});
    throw err;
  }
}

/** The error for a stream of batches that ended without its source's last batch. */
export function missingInputEnd(sink: string): InvalidArgumentError {
  return new InvalidArgumentError(`${sink}: the batches ended without the source's last one (the batch with inputEnd), so the image's length is unknown`, {
    hint: 'A stage dropped it: pass every batch on (empty ones too, or at least the one with inputEnd)',
  });
}

async function* toAsync<T>(items: AsyncIterable<T> | Iterable<T>): AsyncGenerator<T> {
  yield* items;
}
