/**
 * The external sink: Blocks in, a qcow2 metadata file plus its raw data file out.
 *
 * Each cluster with data goes to the data file at its guest offset (host == guest with a data
 * file); runs of adjacent data clusters are written with one writev, and one write is kept in
 * flight while the next run gathers. Zero clusters (`block.zero`, set by zero-detect) are not
 * written: holes on a regular file, real zeros on a pipe (OffsetWriter fills the gap). The data
 * file ends exactly at the virtual size. The metadata goes through the {@link MetadataEmitter}.
 *
 * Blocks must arrive in increasing index order; a missing index counts as a zero cluster.
 * A Block handed to the sink must not be modified afterwards (it may be written later).
 *
 * Outputs are written under temporary names and renamed on success; on failure both are
 * aborted, so nothing that looks valid is left behind (pipes cannot be undone).
 */

import { Writable } from 'node:stream';
import { unlink } from 'node:fs/promises';
import { BLOCK_STREAM_HIGH_WATER_MARK, type Block } from '../block.js';
import { InvalidArgumentError } from '../errors.js';
import { checkVirtualSize, roundUpToSector } from '../format/index.js';
import { OffsetWriter, type OutputTarget } from '../io/output.js';
import { inputSizeMismatch } from './clusterize.js';
import { MetadataEmitter, type MetadataResult } from './metadata.js';
import { checkDataFileName, resolveImageSettings, type ImageOptions, type ImageSettings, type ImageShape } from './settings.js';

export interface ExternalSinkOptions extends ImageOptions {
  /** Where the qcow2 metadata goes: a path, '-' for standard output, or a Writable. */
  output: OutputTarget;
  /** Where the guest data goes: a path, '-' for standard output, or a Writable. */
  dataFile: OutputTarget;
  /** The data-file name stored in the header. Default: `dataFile` when it is a path. */
  dataFileName?: string;
  /**
   * The number of guest bytes the Blocks will cover, when known in advance. The metadata then
   * streams while the data flows (raw mode, or any mode into a pipe), and a different amount
   * of input is an InputSizeError.
   */
  size?: number;
  /** Replace an existing data file. Default false: an existing data file is an error. */
  overwrite?: boolean;
  /** Replace an existing metadata file. Default true (like qemu-img). */
  overwriteOutput?: boolean;
  /** Make the image an overlay of this backing file (see MetadataEmitterOptions.backing). */
  backing?: { name: string; format: string } | undefined;
  /**
   * Called once per Block when the sink no longer needs its bytes (written, or found zero), so
   * a source can recycle its buffers. Not called for Blocks still pending when a run fails.
   */
  onBlockDone?: (block: Block) => void;
}

/** What the sink wrote. */
export interface SinkResult extends ImageShape {
  /** Guest bytes received (the input size). */
  inputBytes: number;
  /** Overlays: clusters equal to the backing file, left unallocated (counted in zeroClusters too). */
  unchangedClusters: number;
  /** Bytes handed to the OS for the data file (zeros written to a pipe included). */
  dataBytesWritten: number;
  /** Bytes of the metadata file. */
  metadataBytesWritten: number;
  /** Clusters of the metadata file. */
  metadataClusters: number;
  /** L2 tables allocated in the metadata file. */
  l2Tables: number;
  /** `streamed`: the metadata was written while the data flowed; `at-end`: after it. */
  metadataLayout: MetadataResult['layout'];
}

/** The most bytes one data writev carries, and the most buffers (Linux IOV_MAX). */
const MAX_RUN_BYTES = 8 * 1024 * 1024;
const MAX_RUN_CHUNKS = 1024;

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
  /** The Blocks of the run, handed to onBlockDone once written. */
  private runBlocks: Block[] = [];
  /** The data write in flight, and its failure once it settled. */
  private inflight: Promise<void> | undefined;
  private writeFailure: unknown;
  private done = false;

  private constructor(
    readonly settings: ImageSettings,
    private readonly data: OffsetWriter,
    private readonly metadata: OffsetWriter,
    private readonly emitter: MetadataEmitter,
    private readonly declaredSize: number | undefined,
    private readonly onBlockDone: ((block: Block) => void) | undefined,
  ) {}

  /**
   * Validates the options, opens both outputs (temporary names for files) and, when the size
   * is known, writes the leading metadata. Throws before creating anything when an option is bad.
   */
  static async open(options: ExternalSinkOptions): Promise<ExternalWriter> {
    const settings = resolveImageSettings(options);
    const dataFileName = options.dataFileName ?? (typeof options.dataFile === 'string' && options.dataFile !== '-' ? options.dataFile : undefined);
    if (dataFileName === undefined) {
      throw new InvalidArgumentError('dataFileName is required when the data file is not a path');
    }
    checkDataFileName(dataFileName, settings);
    const { size } = options;
    if (size !== undefined) {
      if (!Number.isSafeInteger(size) || size < 0) throw new InvalidArgumentError(`Invalid input size ${size}`);
      checkVirtualSize(roundUpToSector(size), settings.clusterBits);
    }
    if (options.output === '-' && options.dataFile === '-') {
      throw new InvalidArgumentError('The metadata and the data file cannot both go to standard output');
    }
    const data = await OffsetWriter.create(options.dataFile, { label: 'data file', overwrite: options.overwrite ?? false });
    let metadata: OffsetWriter;
    try {
      metadata = await OffsetWriter.create(options.output, { label: 'metadata file', overwrite: options.overwriteOutput ?? true });
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
    const writer = new ExternalWriter(settings, data, metadata, emitter, size, options.onBlockDone);
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
    const cs = this.settings.clusterSize;
    const { index, data } = block;
    if (!Number.isSafeInteger(index) || index < this.nextIndex) {
      throw new InvalidArgumentError(`Block ${index} arrived after block ${this.nextIndex - 1}: blocks must come in increasing order`);
    }
    if (data.length > cs || data.length === 0 || this.shortBlockSeen) {
      throw new InvalidArgumentError(
        this.shortBlockSeen
          ? `Block ${index} follows a short block: only the last block of an image may be shorter than a cluster`
          : `Block ${index} holds ${data.length} bytes; blocks hold 1..${cs} bytes (the cluster size)`,
      );
    }
    if (data.length < cs) this.shortBlockSeen = true;
    const offset = index * cs;
    const end = offset + data.length;
    if (this.declaredSize !== undefined && end > this.declaredSize) throw inputSizeMismatch(this.declaredSize, end, true);
    this.nextIndex = index + 1;
    this.end = end;

    // An overlay leaves clusters equal to its backing file unallocated: nothing to write.
    const state = block.sameAsBase ? 'unchanged' : block.zero ? 'zero' : 'data';
    const hasData = state === 'data';
    if (state === 'unchanged') this.unchangedClusters++;
    const recorded = this.emitter.record(index, state);
    if (recorded) await recorded;
    if (!hasData) {
      this.onBlockDone?.(block);
      return;
    }
    this.dataClusters++;
    if (this.runBytes > 0 && (offset !== this.runOffset + this.runBytes || this.runBytes >= MAX_RUN_BYTES || this.runChunks.length >= MAX_RUN_CHUNKS)) {
      await this.flushRun();
    }
    if (this.runBytes === 0) this.runOffset = offset;
    appendView(this.runChunks, data);
    if (this.onBlockDone) this.runBlocks.push(block);
    this.runBytes += data.length;
  }

  /** Writes what remains, sets the data file's length, and commits both outputs. */
  async finish(): Promise<SinkResult> {
    if (this.done) throw new Error('ExternalWriter.finish called twice');
    this.done = true;
    try {
      if (this.declaredSize !== undefined && this.end !== this.declaredSize) throw inputSizeMismatch(this.declaredSize, this.end);
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
        if (this.data.kind === 'file' && this.data.path) await unlink(this.data.path).catch(() => {});
        throw err;
      }
      const clusters = Math.ceil(virtualSize / this.settings.clusterSize);
      return {
        inputBytes: this.end,
        virtualSize,
        clusterSize: this.settings.clusterSize,
        refcountBits: 2 ** this.settings.refcountOrder,
        dataFileRaw: this.settings.dataFileRaw,
        clusters,
        dataClusters: this.dataClusters,
        zeroClusters: clusters - this.dataClusters,
        unchangedClusters: this.unchangedClusters,
        dataBytesWritten: this.data.bytesWritten,
        metadataBytesWritten: this.metadata.bytesWritten,
        metadataClusters: metadata.metadataClusters,
        l2Tables: metadata.l2Tables,
        metadataLayout: metadata.layout,
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
    this.runBlocks = [];
    this.runBytes = 0;
    await this.inflight?.catch(() => {});
    await this.data.abort();
    await this.metadata.abort();
  }

  private async flushRun(): Promise<void> {
    if (this.runBytes === 0) return;
    const chunks = this.runChunks;
    const offset = this.runOffset;
    const blocks = this.runBlocks;
    this.runChunks = [];
    this.runBlocks = [];
    this.runBytes = 0;
    await this.settle();
    // Not awaited: the next run gathers (and the source reads) while this one is written.
    this.inflight = this.data.writev(offset, chunks).then(
      () => {
        if (this.onBlockDone) for (const block of blocks) this.onBlockDone(block);
      },
      (err: unknown) => {
        this.writeFailure ??= err;
      },
    );
  }

  /** Waits for the write in flight; rethrows its failure. */
  private async settle(): Promise<void> {
    if (this.inflight) {
      await this.inflight;
      this.inflight = undefined;
    }
    if (this.writeFailure !== undefined) throw this.writeFailure;
  }
}

/**
 * Appends `view` to a writev list, merging it with the previous view when the two are adjacent
 * in the same memory (consecutive clusters of one read buffer): fewer, larger iovecs.
 */
function appendView(chunks: Uint8Array[], view: Uint8Array): void {
  const last = chunks[chunks.length - 1];
  if (last && last.buffer === view.buffer && last.byteOffset + last.byteLength === view.byteOffset) {
    chunks[chunks.length - 1] = Buffer.from(last.buffer, last.byteOffset, last.byteLength + view.byteLength);
  } else {
    chunks.push(view);
  }
}

/** The sink as a Writable (object mode) for `pipeline(...)`; `result` is set when it finishes. */
export class ExternalSinkStream extends Writable {
  /** What was written; set once the stream has finished. */
  result: SinkResult | undefined;
  private writer: ExternalWriter | undefined;

  constructor(private readonly options: ExternalSinkOptions) {
    super({ objectMode: true, highWaterMark: BLOCK_STREAM_HIGH_WATER_MARK });
  }

  override _construct(callback: (error?: Error | null) => void): void {
    ExternalWriter.open(this.options).then(
      (writer) => {
        this.writer = writer;
        callback();
      },
      (err: Error) => callback(err),
    );
  }

  override _write(block: Block, _encoding: BufferEncoding, callback: (error?: Error | null) => void): void {
    const writer = this.writer;
    if (!writer) {
      callback(new Error('unreachable: write before the sink opened'));
      return;
    }
    writer.write(block).then(() => callback(), (err: Error) => callback(err));
  }

  override _final(callback: (error?: Error | null) => void): void {
    const writer = this.writer;
    if (!writer) {
      callback(new Error('unreachable: final before the sink opened'));
      return;
    }
    writer.finish().then(
      (result) => {
        this.result = result;
        callback();
      },
      (err: Error) => callback(err),
    );
  }

  override _destroy(error: Error | null, callback: (error?: Error | null) => void): void {
    // Destroyed before finishing (an upstream failure, or destroy() by the caller): clean up.
    if (this.writer && this.result === undefined) {
      this.writer.abort().then(() => callback(error), () => callback(error));
      return;
    }
    callback(error);
  }
}

/**
 * A Writable (object mode) that takes Blocks and writes a data-file qcow2 image; see
 * {@link ExternalSinkOptions}. After `await pipeline(...)`, `sink.result` holds the summary.
 */
export function createExternalSink(options: ExternalSinkOptions): ExternalSinkStream {
  return new ExternalSinkStream(options);
}
