/**
 * `convert()`: raw bytes in, a qcow2 image out, in one call. It composes the generator stages
 * directly (source → zero-detect → [base compare] → sink) with no stream hop per block.
 *
 * Two layouts: `external` (default) writes qcow2 metadata plus a raw data file; `internal`
 * writes one self-contained qcow2 file, the only layout where `dedup` can share clusters.
 * `base` makes the result an overlay that stores only the clusters that differ from an earlier
 * image (incremental backups); `manifest` records every cluster's fingerprint on the way.
 *
 * Everything is validated before any output is created, and a failure part-way (read or write
 * error, abort, size mismatch) removes what this run created.
 */

import { fstatSync } from 'node:fs';
import { stat } from 'node:fs/promises';
import { relative, dirname, resolve } from 'node:path';
import { Duplex, Readable, type Writable } from 'node:stream';
import { asStream, chainUnchecked, flushable, gen, none } from 'stream-chain';
import { chainUnchecked as coreChain } from 'stream-chain/core';
import { blockEnd, toBatches, type Block, type BlockBatch, type BlockItem } from '../block.js';
import type { Progress } from '../progress.js';
import { AbortedError, CompressionUnsupportedError, DedupUnsupportedError, fileError, InvalidArgumentError, LimitExceededError, NotSeekableError, streamError } from '../errors.js';
import { checkVirtualSize, roundUpToSector } from '../format/index.js';
import { kindOf } from '../io/files.js';
import type { OutputTarget } from '../io/output.js';
import type { DiskImage, ImageFormat } from '../read/image.js';
import { DEFAULT_MAX_CHAIN_DEPTH } from '../format/constants.js';
import { detectZeros } from '../../transforms/zero-detect.js';
import type { BaseComparer } from '../../transforms/base-compare.js';
import type { DedupStats } from '../../transforms/dedup.js';
import type { ManifestWriter } from '../../transforms/manifest.js';
import { abortable, abortError, raceAbort } from './abort.js';
import { ClusterCutter, clusterizeBatches } from './clusterize.js';
import { checkCompressionType, type CompressionType, type CompressorPool } from './compress.js';
import { ExternalWriter, missingInputEnd } from './external-sink.js';
import type { InternalImageWriter } from './internal-sink.js';
import type { PlannedImageWriter } from './internal-stream.js';
import { defaultDataFileName, defaultDataFilePath } from './paths.js';
import { checkOutputName, refuseOverlaps, type RunFile } from '../io/same-file.js';
import { checkDataFileName, checkDedupSharing, resolveImageSettings, type ImageOptions, type ImageSettings, type WriteSummary } from './settings.js';
import { imageBlocks } from './image-source.js';
import type { StreamInput } from './stream-image.js';
import { BufferPool, openInput, readBatches, readBlocks, type OpenedInput } from './sources.js';
import { isNbdUri, type NbdTlsOptions } from '../io/nbd.js';
import type { NbdInput } from './nbd-source.js';
import { isS3Uri } from '../io/s3-uri.js';
import { inputSizeMismatch } from './clusterize.js';
import { checkCallbacks, checkOptionsObject, checkSignal, describeValue, isWritableLike } from '../internal/arguments.js';

/**
 * The input image: a path (its format probed, or given by `inputFormat`), `s3://bucket/key`
 * (raw), '-' for standard input, an NBD URI (nbd://, nbd+unix://, nbds://, nbds+unix://), a Node
 * Readable or any async iterable of raw bytes.
 */
export type ConvertInput = string | Readable | AsyncIterable<Uint8Array>;

/** Progress of a conversion (the input size is the total, when known). */
export type ConvertProgress = Progress;

export interface ConvertOptions extends ImageOptions {
  /**
   * The input: a path, '-' for standard input, a Node Readable or any async iterable of raw
   * bytes. A path is probed (src/read/probe.ts): raw is copied as it is, an image format the
   * readers open (qcow2 with its chain…) is read through its reader, and a recognised format
   * no reader opens is refused by name (UnsupportedFormatError), never taken as raw.
   */
  input: ConvertInput;
  /**
   * The format of a path input, instead of probing it (`raw` for untrusted raw files, so a
   * planted header is not obeyed).
   */
  inputFormat?: ImageFormat;
  /** The qcow2 file: a path, '-' for standard output, or a Writable (external layout only). */
  output: OutputTarget;
  /**
   * `external` (default): metadata in `output`, guest data in a raw data file at guest
   * offsets. `internal`: one qcow2 file with the data inside (needs a regular-file output).
   */
  layout?: 'external' | 'internal';
  /**
   * The raw data file (external layout): a path, or a Writable. Default: the output path with
   * its extension replaced by `.data`. Required when the output is '-' or a stream.
   */
  dataFile?: string | Writable;
  /**
   * The name stored in the header. Default: the data file's path relative to the output's
   * directory when it lies there or below (portable: the pair can move together), its absolute
   * path otherwise (with a warning: our readers refuse it); an object's key's last segment.
   */
  dataFileName?: string;
  /** The input size in bytes. Required for nothing, but lets the metadata stream while the data flows and checks the input's length. */
  size?: number;
  /**
   * Replace existing files at the output, data-file and manifest paths. Default false: no
   * output of any command replaces a file by surprise (the CLI's --force). A file the run
   * reads is never replaced, with or without it.
   */
  overwrite?: boolean;
  /**
   * fsync every file written (data file, metadata, image, and their directory after the
   * rename) before resolving, so a returned summary means the image survives a crash.
   * Default true; false trades that for speed. Streams have nothing to fsync.
   */
  sync?: boolean;
  /**
   * Store identical clusters once (internal layout only: with a data file every cluster must
   * sit at its guest offset, so none can be shared; and a refcount width of 2 bits or more, or
   * nothing could be shared). `maxEntries` caps the fingerprint index
   * (about 23 bytes per unique cluster); past it, new content is simply not deduplicated.
   */
  dedup?:
    | boolean
    | {
        /** Most distinct clusters indexed (default 2^26); past it, new content is not deduplicated. */
        maxEntries?: number;
      };
  /**
   * An earlier image of the same disk (qcow2 or raw). The result becomes an overlay whose
   * backing file is the base: clusters equal to the base at the same offset stay unallocated.
   * Forces the raw-data-file bit off (the spec forbids it with a backing file).
   */
  base?: string;
  /** The backing-file name stored in the header. Default: `base` relative to the output's directory. */
  baseName?: string;
  /** Compare with this manifest of the base (see transforms/manifest.ts) instead of reading the base. */
  baseManifest?: string;
  /** Write a fingerprint manifest of the new image to this path. */
  manifest?: string;
  /** Follow names stored inside the input and base images even outside their directory (see the path policy). */
  allowUnsafePaths?: boolean;
  /**
   * Most images the new overlay's chain may hold, itself included (default 128, as every
   * reader here): `base` is refused when the overlay would pass it.
   */
  maxChainDepth?: number;
  /**
   * Store clusters compressed (internal layout only: the spec forbids compressed clusters with
   * a data file), like `qemu-img convert -c`: `zlib` (raw deflate, qemu's default) or `zstd`
   * (Node.js ≥ 22.15). A cluster that does not shrink is stored as is. Default: none.
   */
  compression?: CompressionType;
  /** Worker threads compressing clusters. Default: one per core. The image is the same whatever the count. */
  compressionThreads?: number;
  /** Cancels the conversion: it rejects with an AbortedError and removes what it created. */
  signal?: AbortSignal;
  /** Called with each warning as it arises (also listed in the summary's `warnings`). */
  onWarning?: (message: string) => void;
  /**
   * NBD inputs: read only the clusters this dirty bitmap (meta context `qemu:dirty-bitmap:NAME`)
   * marks as changed, into an overlay of `base` (required); clean clusters stay unallocated. A
   * server that does not publish the bitmap fails before any output exists.
   */
  bitmap?: string;
  /** NBD inputs: TLS material (PEM files) for nbds:// URIs, and the stall timeout in milliseconds (default 30 s). */
  nbd?: {
    /** TLS material (PEM file paths) for nbds:// URIs. */
    tls?: NbdTlsOptions;
    /** Milliseconds without progress before the server counts as dead (default 30 s). */
    timeout?: number;
  };
  /** Called each time another `progressInterval` bytes of input are done, and once at the end. */
  onProgress?: (progress: ConvertProgress) => void;
  /** Bytes of input between two `onProgress` calls: a positive whole number. Default 32 MiB. */
  progressInterval?: number;
  /**
   * Stages of your own (see {@link ConvertStage}). A list runs on every batch after zero-detect
   * and the base comparison, before compression, the manifest and the sink; an object puts
   * stages at any of the {@link StagePoint}s between ours. They turn the native data mover off:
   * every cluster then goes through Blocks.
   */
  stages?: ConvertStages;
}

/**
 * Where a user's stages run, between the conversion's own:
 * `input` → zero-detect → `zeroDetected` → base compare → `compared` → compression →
 * `compressed` → manifest → `beforeSink` → the sink.
 * Stages at `input` see Blocks before their `zero` flag is set (zero-detect sets it after them,
 * so a stage there may change bytes freely); at `beforeSink` they see what the sink stores.
 * Stages at `compressed` and `beforeSink` must not change a Block's bytes: its `compressed`
 * bytes and the manifest's fingerprint were made from them.
 */
export type StagePoint = 'input' | 'zeroDetected' | 'compared' | 'compressed' | 'beforeSink';

/** User stages: a list (run at `compared`), or lists by {@link StagePoint}. */
export type ConvertStages = readonly ConvertStage[] | Readonly<Partial<Record<StagePoint, readonly ConvertStage[]>>>;

const STAGE_POINTS: readonly StagePoint[] = ['input', 'zeroDetected', 'compared', 'compressed', 'beforeSink'];

/** The user's stages by point, checked: an unknown point or a non-list is an InvalidArgumentError. */
function stagesByPoint(stages: ConvertStages | undefined): Record<StagePoint, readonly ConvertStage[]> {
  const byPoint: Record<StagePoint, readonly ConvertStage[]> = { input: [], zeroDetected: [], compared: [], compressed: [], beforeSink: [] };
  if (stages === undefined) return byPoint;
  if (Array.isArray(stages)) return { ...byPoint, compared: stages as readonly ConvertStage[] };
  for (const [point, list] of Object.entries(stages)) {
    if (!STAGE_POINTS.includes(point as StagePoint)) {
      throw new InvalidArgumentError(`convert: unknown stage point '${point}': use ${STAGE_POINTS.map((p) => `'${p}'`).join(', ')}`);
    }
    if (list === undefined) continue;
    if (!Array.isArray(list)) throw new InvalidArgumentError(`convert: stages.${point} must be a list of stages`);
    byPoint[point as StagePoint] = list as readonly ConvertStage[];
  }
  return byPoint;
}

function countStages(byPoint: Record<StagePoint, readonly ConvertStage[]>): number {
  return STAGE_POINTS.reduce((n, point) => n + byPoint[point].length, 0);
}

/** `dataClusters` counts clusters stored in the data file, or in the image (internal layout). */
export interface ConvertSummary extends WriteSummary {
  /** External layout: whether the metadata streamed with the data or was written at the end. */
  metadataLayout?: 'streamed' | 'at-end';
  /** The backing-file name stored in the header (overlays). */
  backingFile?: string;
  /** The manifest written, if any. */
  manifest?: string;
  /** Dedup statistics (internal layout with dedup). */
  dedup?: DedupStats;
  /** NBD inputs: bytes of guest data the server actually sent (zero, hole and clean extents are not read). */
  sourceBytesRead?: number;
  /** The compression type, and clusters stored compressed (compressed images). */
  compression?: {
    /** The compression type written in the header. */
    type: CompressionType;
    /** Clusters stored compressed (the others did not shrink, or were zero or shared). */
    clusters: number;
  };
}

/** The default `progressInterval`. */
const PROGRESS_STEP = 32 * 1024 * 1024;

/** What convert() writes blocks into: the external or the internal writer. */
interface BlockSink {
  writeItem(item: BlockItem): Promise<void>;
  readonly sawInputEnd: boolean;
  abort(): Promise<void>;
}

/**
 * A stage a user puts into a conversion (`stages`), stream-chain style: a function of one
 * batch (its return value goes on; `none` from stream-chain drops it, `many([...])` fans out,
 * async functions are awaited), a generator function of one batch, or a Node stream
 * (object mode, batches in and out). Use {@link perBlock} for a function of one Block.
 */
export type ConvertStage =
  | ((batch: BlockBatch) => unknown)
  | ((batch: BlockBatch) => AsyncGenerator<unknown> | Generator<unknown>)
  | NodeJS.ReadWriteStream;

/** Everything a conversion holds once its outputs are open: the stage list and how to end it. */
interface Conversion {
  readonly settings: ImageSettings;
  /** The input's length when known. */
  readonly size: number | undefined;
  readonly external: ExternalWriter | undefined;
  /** The single-file writer into a pipe (plan, then emit). */
  readonly planned: PlannedImageWriter | undefined;
  readonly baseCompared: boolean;
  readonly manifest: ManifestWriter | undefined;
  /** The stages from zero-detect to the sink (stream-chain items), users' at their points. */
  stages(user: Record<StagePoint, readonly ConvertStage[]>): unknown[];
  /** Records progress up to this guest byte. */
  advance(done: number): void;
  /** Commits the outputs; the summary. `throughStages`: the Blocks went through the stage list (not the native copy). */
  finish(throughStages: boolean): Promise<ConvertSummary>;
  /** Removes what this run created. Never throws. */
  abort(): Promise<void>;
  /** Closes the base image and manifest reader. */
  close(): Promise<void>;
}

/**
 * Converts a raw image into qcow2. Throws a Qcow2StreamError (InvalidArgumentError,
 * DedupUnsupportedError, InputSizeError, FileError, AbortedError…) with no output left behind.
 *
 * The Blocks go through the same stage list as {@link createConvertStream}'s (zero-detect →
 * [base compare] → the `stages` given → [compression] → [manifest] → sink), driven here without a stream per
 * stage: stream-chain's async-iterable core, one step per batch.
 */
export async function convert(options: ConvertOptions): Promise<ConvertSummary> {
  checkConvertArguments(options, 'convert()', true);
  // Objects (s3://) in or out: the same conversion over rewritten options (write/object-io.ts).
  // An object input is probed like a file: raw streams through ranged GETs, an image format
  // (given or probed) comes back with its format set and is read by its reader below.
  if (isS3Uri(options.input) && (options.inputFormat ?? 'raw') === 'raw') return convert(await (await import('./object-io.js')).withObjectInput({ ...options, input: options.input }));
  if (options.layout === 'internal' && isS3Uri(options.output)) return (await import('./object-io.js')).internalToObject(options, convert);
  const started = performance.now();
  const { signal } = options;
  const userStages = stagesByPoint(options.stages);
  const plan = await planConversion(options);
  const nbdUri = typeof options.input === 'string' && isNbdUri(options.input) ? options.input : undefined;
  // Connected (and the bitmap checked) before any output is created.
  const nbd = nbdUri === undefined ? undefined : await (await import('./nbd-source.js')).openNbdInput(nbdUri, options);
  let image: DiskImage | undefined;
  let input: OpenedInput | undefined;
  let streamed: StreamInput | undefined;
  try {
    // A path is probed: an image is read through its reader, never taken as raw bytes.
    image = typeof options.input === 'string' && !nbd ? await openImageInput(options.input, options, plan.warn) : undefined;
    input = typeof options.input === 'string' && !nbd && !image ? await openInput(options.input, options.size) : undefined;
    // A pipe is probed from its first bytes: raw goes on as raw, a streamOptimized VMDK or a
    // fixed VHD (-f vpc) is read in one pass, other formats need a file.
    if (input && !input.target.positional) {
      const probing = (await import('./stream-image.js')).openStreamInput(input.target, options.inputFormat, plan.settings.clusterSize);
      // The probe reads the first bytes: a quiet pipe must not outlast an abort.
      streamed = signal ? await raceAbort(probing, signal) : await probing;
      if (streamed.kind !== 'blocks') input = { ...input, target: streamed.target };
    }
  } catch (err) {
    // As below: a pipe's close may wait for a read an abort left pending.
    if (signal?.aborted && !input?.target.positional) void input?.close().catch(() => {});
    else await input?.close().catch(() => {});
    await image?.close().catch(() => {});
    await nbd?.close().catch(() => {});
    throw err;
  }
  let conversion: Conversion | undefined;
  try {
    // Compression holds more Blocks at once (batches in flight): recycle their buffers rather than drop them to the GC.
    // A user's stage might keep a Block, so with user stages nothing is pooled: a pool whose
    // buffers are never released would hold every buffer read (the whole input) until the end.
    const pool = (input || nbd || image) && countStages(userStages) === 0 ? new BufferPool(undefined, options.compression ? 48 : undefined) : undefined;
    conversion = await openConversion(options, plan, { input, nbd, image, streamed }, pool, started);
    const { settings, size } = conversion;
    const fileFd = input?.target.positional ? input.target.fd : undefined;
    let throughStages = true;
    const copyNatively = conversion.external?.canCopyFromFile && !conversion.baseCompared && !conversion.manifest && countStages(userStages) === 0;
    if (image && (image.format === 'vpc' || image.format === 'vhdx') && copyNatively) {
      // VHD and VHDX store blocks uncompressed: copy them natively from where they lie.
      const { copyImageToExternal } = await import('./file-copy.js');
      throughStages = false;
      await copyImageToExternal(image, conversion.external!, { signal, onAdvance: (done) => conversion!.advance(done) });
    } else if (fileFd !== undefined && copyNatively) {
      // Nothing but the zero check needs the bytes: copy them natively, no Block per cluster.
      const { copyFileToExternal } = await import('./file-copy.js');
      throughStages = false;
      await copyFileToExternal({ fd: fileFd, name: input!.name }, size!, conversion.external!, { signal, onAdvance: (done) => conversion!.advance(done) });
    } else if (fileFd !== undefined && conversion.planned?.canScanFile && !conversion.baseCompared && !conversion.manifest) {
      // A single-file image into a pipe whose plan needs only the zero check: scan natively.
      throughStages = false;
      await conversion.planned.scanFile({ fd: fileFd, name: input!.name }, size!, { signal, onAdvance: (done) => conversion!.advance(done) });
    } else {
      const sourceOptions = { clusterSize: settings.clusterSize, ...(size === undefined ? {} : { size }) };
      let batches: AsyncIterable<BlockBatch>;
      if (nbd) {
        // One batch per read buffer. A server can stall (up to the client's timeout): race
        // each batch against the signal.
        batches = nbd.batches(settings.clusterSize, pool);
        if (signal) batches = abortable(batches, signal);
      } else if (image) {
        // Ranges no layer holds data for come as zero runs, never read.
        batches = toBatches(imageBlocks(image, { clusterSize: settings.clusterSize, ...(pool ? { pool } : {}) }), sourceOptions);
      } else if (streamed?.kind === 'blocks') {
        // A streamOptimized VMDK from a pipe: its grains in order, batched here.
        batches = toBatches(signal ? abortable(streamed.blocks, signal) : streamed.blocks, sourceOptions);
      } else if (input) {
        // Holes come as zero runs, never read: every stage handles runs.
        batches = readBatches(input.target, { ...sourceOptions, zeroRuns: true, ...(pool ? { pool } : {}) });
        // A pipe can block for ever: race each read against the abort signal. (File reads
        // return promptly; the per-batch check in the sink is enough for them.)
        if (signal && !input.target.positional) batches = abortable(batches, signal);
      } else {
        batches = clusterizeBatches(options.input as Readable | AsyncIterable<Uint8Array>, sourceOptions);
        if (signal) batches = abortable(batches, signal);
      }
      await runStages(batches, conversion.stages(userStages));
    }
    if (signal?.aborted) throw abortError(signal);
    return await conversion.finish(throughStages);
  } catch (err) {
    await conversion?.abort();
    throw err;
  } finally {
    await conversion?.close();
    await nbd?.close().catch(() => {});
    await image?.close().catch(() => {});
    // After an abort a read of a quiet pipe (without the addon) may never return, and closing
    // its handle would wait for that read: close it in the background instead (the CLI exits
    // right after). A regular file's reads always return: wait for its close.
    if (signal?.aborted && !input?.target.positional) void input?.close().catch(() => {});
    else await input?.close();
  }
}

/** Options of {@link createConvertStream}: convert()'s, with the raw bytes written into the stream instead of `input`. */
export type ConvertStreamOptions = Omit<ConvertOptions, 'input'>;

/** The Duplex of {@link createConvertStream}: raw bytes in; the summary out (one object), and on `finished`. */
export interface ConvertStream extends Duplex {
  /**
   * The summary once the image is complete (its outputs committed); rejects with the error
   * that stopped the conversion (a Qcow2StreamError; an AbortedError when the stream was
   * destroyed first). Nothing is left behind on failure.
   */
  readonly finished: Promise<ConvertSummary>;
}

/**
 * convert() as one Duplex, built with stream-chain's `chain()` from the same stage list:
 * raw bytes in → clusterize → zero-detect → [base compare] → your `stages` → [compression] → [manifest] →
 * sink. Write the raw image into it (or `pipeline(source, stream)`); `await stream.finished`
 * gives the summary, which is also the one object the readable side yields. Blocks move in
 * batches (one per input chunk), so a stage of yours costs one call per chunk.
 *
 * ```ts
 * const stream = createConvertStream({ output: 'disk.qcow2', stages: [perBlock((b) => { … })] });
 * await pipeline(createReadStream('disk.raw', { highWaterMark: 2 << 20 }), stream);
 * const summary = await stream.finished;
 * ```
 */
export function createConvertStream(options: ConvertStreamOptions): ConvertStream {
  checkConvertArguments(options, 'createConvertStream()', false);
  const started = performance.now();
  const userStages = stagesByPoint(options.stages);
  let resolveFinished!: (summary: ConvertSummary) => void;
  let rejectFinished!: (reason: unknown) => void;
  const finished = new Promise<ConvertSummary>((resolve, reject) => {
    resolveFinished = resolve;
    rejectFinished = reject;
  });
  // Callers who only await pipeline() see the error there; an unobserved rejection must not crash.
  finished.catch(() => {});
  // The outputs open while the first bytes arrive; the first stage waits for them.
  let conversion: Conversion | undefined;
  const opening = planConversion({ ...options, input: '' }).then(async (plan) => (conversion = await openConversion({ ...options, input: '' }, plan, { input: undefined, nbd: undefined, image: undefined, streamed: undefined }, undefined, started)));
  opening.catch(() => {});
  let settled = false;
  const fail = async (err: unknown) => {
    if (settled) return;
    settled = true;
    // The outputs may still be opening (a source can die before they are): wait, then remove them.
    await opening.catch(() => {});
    await conversion?.abort();
    await conversion?.close();
    // What stopped the stream from outside (a source that died, a pipeline's abort) comes out as ours.
    rejectFinished(streamError(err, 'input'));
  };
  // Bytes → batches as a per-chunk function: one fused stage with the ones after it.
  let cutter: ClusterCutter | undefined;
  const cutterFor = (ready: Conversion) =>
    (cutter ??= new ClusterCutter({ clusterSize: ready.settings.clusterSize, ...(ready.size === undefined ? {} : { size: ready.size }) }));
  const stages = [
    flushable<unknown, unknown>(
      async (chunk) => cutterFor(await opening).push(chunk) ?? none,
      async () => cutterFor(await opening).end(),
    ),
    // The rest of the list is known once the outputs are open (which stages the options need).
    ...lazyStages(opening, userStages),
    flushable<unknown, unknown>(
      (summary) => summary,
      async () => {
        const summary = await conversion!.finish(true);
        settled = true;
        await conversion!.close();
        resolveFinished(summary);
        return summary;
      },
    ),
  ];
  // Bytes in: Node's default of 16 KiB (64 KiB on 22+) paused the source after every chunk, so
  // reading never overlapped the stages and the sink (a 2 GiB file: 1.7-2.5 s, 1.1-1.4 s now).
  const stream = chainUnchecked<Uint8Array, ConvertSummary>(bounded(stages), {
    writableObjectMode: false,
    readableObjectMode: true,
    writableHighWaterMark: INPUT_HIGH_WATER_MARK,
  });
  stream.on('error', (err) => void fail(err));
  stream.on('close', () => void fail(new AbortedError('The conversion stream was destroyed before the image was complete')));
  options.signal?.addEventListener('abort', () => stream.destroy(abortError(options.signal!)), { once: true });
  return Object.assign(stream as unknown as Duplex, { finished });
}

/**
 * The conversion's stages for a stream built before the outputs open: the same functions as
 * {@link Conversion.stages}, each looked up once the conversion is ready (user stages as given).
 */
function lazyStages(opening: Promise<Conversion>, user: Record<StagePoint, readonly ConvertStage[]>): unknown[] {
  let own: unknown[] | undefined;
  const ownStage = (i: number) => async (batch: BlockBatch) => {
    own ??= (await opening).stages(stagesByPoint(undefined));
    return (own[i] as (b: BlockBatch) => unknown)(batch);
  };
  return arrangeStages(
    { zeroDetect: ownStage(0), baseCompare: ownStage(1), compression: ownStage(2), manifest: ownStage(3), sink: ownStage(4) },
    user,
  );
}

/** The conversion's own stages (a pass-through where the options need none). */
interface OwnStages {
  zeroDetect: unknown;
  baseCompare: unknown;
  compression: unknown;
  manifest: unknown;
  sink: unknown;
}

/** Ours in order, with the user's at their points between them. */
function arrangeStages(own: OwnStages, user: Record<StagePoint, readonly ConvertStage[]>): unknown[] {
  return [
    ...user.input,
    own.zeroDetect,
    ...user.zeroDetected,
    own.baseCompare,
    ...user.compared,
    own.compression,
    ...user.compressed,
    own.manifest,
    ...user.beforeSink,
    own.sink,
  ];
}

/** Raw bytes a conversion stream buffers ahead of its first stage: a few of a source's 2 MiB reads. */
const INPUT_HIGH_WATER_MARK = 8 * 1024 * 1024;

/** Drives a stage list over batches: stream-chain's async-iterable core, or its Node chain when a stage is a stream. */
async function runStages(batches: AsyncIterable<BlockBatch>, stages: unknown[]): Promise<void> {
  if (stages.some(isNodeStream)) {
    const stream = chainUnchecked([Readable.from(batches, { objectMode: true, highWaterMark: INNER_HIGH_WATER_MARK }), ...bounded(stages)]);
    for await (const _ of stream) void _;
    return;
  }
  for await (const _ of coreChain(stages)(batches)) void _;
}

/**
 * Batches a stream stage may hold on each side. A batch is a 2 MiB read, and stream-chain's own
 * stages keep Node's object-mode default of 16 per side (chain options reach only the outer
 * wrapper): 64 MiB per stage. Two keep the stages overlapping at a few MiB each.
 */
const INNER_HIGH_WATER_MARK = 2;

/**
 * The stage list as stream-chain would build it, with bounded queues: each run of functions
 * fused into one `asStream(gen(...))` (what chain() does itself) with
 * {@link INNER_HIGH_WATER_MARK}, streams as given.
 */
function bounded(items: readonly unknown[]): unknown[] {
  const out: unknown[] = [];
  let group: unknown[] = [];
  const close = () => {
    if (group.length === 0) return;
    out.push(asStream(gen(...(group as [(x: unknown) => unknown])), { readableHighWaterMark: INNER_HIGH_WATER_MARK, writableHighWaterMark: INNER_HIGH_WATER_MARK }));
    group = [];
  };
  for (const item of items) {
    if (isNodeStream(item)) {
      close();
      out.push(item);
    } else group.push(item);
  }
  close();
  return out;
}

function isNodeStream(item: unknown): boolean {
  return typeof item === 'object' && item !== null && typeof (item as { pipe?: unknown }).pipe === 'function';
}

function isByteSource(input: unknown): boolean {
  return typeof input === 'object' && input !== null && (Symbol.asyncIterator in input || Symbol.iterator in input);
}

/**
 * The types of what a JavaScript caller passed, checked before anything else runs (the option
 * combinations are checkLayoutOptions'): each wrong one is an InvalidArgumentError that shows
 * the value, never a TypeError from inside.
 */
function checkConvertArguments(options: ConvertOptions | ConvertStreamOptions, call: string, hasInput: boolean): void {
  checkOptionsObject(options, call);
  if (hasInput) {
    const { input } = options as ConvertOptions;
    if (typeof input !== 'string' && !isByteSource(input)) {
      throw new InvalidArgumentError(`${call}: input must be a path, '-', a Readable or an async iterable of bytes, not ${describeValue(input)}`);
    }
  }
  const { output, dataFile } = options;
  if (typeof output !== 'string' && !isWritableLike(output)) {
    throw new InvalidArgumentError(`${call}: output must be a path, '-', an s3:// URI or a Writable, not ${describeValue(output)}`);
  }
  if (dataFile !== undefined && typeof dataFile !== 'string' && !isWritableLike(dataFile)) {
    throw new InvalidArgumentError(`${call}: dataFile must be a path, an s3:// URI or a Writable, not ${describeValue(dataFile)}`);
  }
  for (const name of ['inputFormat', 'dataFileName', 'base', 'baseName', 'baseManifest', 'manifest', 'bitmap'] as const) {
    const value = options[name];
    if (value !== undefined && typeof value !== 'string') throw new InvalidArgumentError(`${call}: ${name} must be a string, not ${describeValue(value)}`);
  }
  for (const name of ['size', 'progressInterval', 'compressionThreads', 'maxChainDepth'] as const) {
    const value = options[name];
    if (value !== undefined && typeof value !== 'number') throw new InvalidArgumentError(`${call}: ${name} must be a number, not ${describeValue(value)}`);
  }
  checkSignal(options.signal);
  checkCallbacks(options, ['onProgress', 'onWarning']);
  if (options.stages !== undefined && (typeof options.stages !== 'object' || options.stages === null)) {
    throw new InvalidArgumentError(`${call}: stages must be a list of stages or lists by stage point, not ${describeValue(options.stages)}`);
  }
}

/** What convert() checks and decides before anything is opened. */
interface ConversionPlan {
  layout: 'external' | 'internal';
  settings: ImageSettings;
  dataFile: string | Writable | undefined;
  dataFileName: string | undefined;
  backing: { name: string; format: string } | undefined;
  /** Warnings so far (more may come while the run goes). */
  warnings: string[];
  /** Adds a warning (and tells onWarning). */
  warn: (message: string) => void;
}

async function planConversion(options: ConvertOptions): Promise<ConversionPlan> {
  const layout = options.layout ?? 'external';
  const warnings: string[] = [];
  const warn = (message: string) => {
    warnings.push(message);
    options.onWarning?.(message);
  };
  const { output, signal } = options;
  checkLayoutOptions(options, layout);
  const settings = resolveImageSettings({
    ...options,
    // A backing file and the raw bit exclude each other; the internal layout has no data file.
    dataFileRaw: layout === 'external' && options.base === undefined && (options.dataFileRaw ?? true),
  });
  if (options.size !== undefined) {
    if (!Number.isSafeInteger(options.size) || options.size < 0) throw new InvalidArgumentError(`Invalid size ${describeValue(options.size)}: it must be a whole number of bytes, 0 or more`);
    checkVirtualSize(roundUpToSector(options.size), settings.clusterBits);
  }
  let dataFile: string | Writable | undefined;
  let dataFileName: string | undefined;
  if (layout === 'external') {
    dataFile = options.dataFile;
    if (dataFile === undefined) {
      if (typeof output !== 'string' || output === '-') {
        throw new InvalidArgumentError('A data-file path is needed when the metadata goes to standard output or a stream', {
          hint: 'Pass --data-file PATH (API: dataFile)',
        });
      }
      dataFile = defaultDataFilePath(output);
    }
    if (dataFile === '-') throw new InvalidArgumentError('The data file must be a path or a Writable, not standard output');
    dataFileName = options.dataFileName ?? (typeof dataFile === 'string' ? defaultDataFileName(output, dataFile) : undefined);
    if (dataFileName === undefined) throw new InvalidArgumentError('dataFileName is required when the data file is a stream');
    checkDataFileName(dataFileName, settings);
  }
  if (options.dedup) checkDedupSharing(settings);
  const backing = options.base === undefined ? undefined : await describeBacking(options.base, options.baseName, output);
  if (signal?.aborted) throw abortError(signal);
  return { layout, settings, dataFile, dataFileName, backing, warnings, warn };
}

/** Opens the outputs (and the base, manifest, hasher a conversion needs) and builds its stage list. */
async function openConversion(
  options: ConvertOptions,
  plan: ConversionPlan,
  sources: { input: OpenedInput | undefined; nbd: NbdInput | undefined; image: DiskImage | undefined; streamed: StreamInput | undefined },
  pool: BufferPool | undefined,
  started: number,
): Promise<Conversion> {
  const { layout, settings, dataFile, dataFileName, backing, warnings, warn } = plan;
  const { input, nbd, image, streamed } = sources;
  const { output, signal } = options;
  const needsHasher = Boolean(options.dedup) || options.manifest !== undefined || options.baseManifest !== undefined;
  // What only some conversions use (the reader, hashing, manifests, the internal layout) is
  // loaded when used: a plain conversion starts faster without it.
  const hasher = needsHasher ? await (await import('../../transforms/fingerprint.js')).createHasher() : undefined;
  // Every file this run writes is fsynced unless the caller opted out.
  const sync = options.sync ?? true;
  const opened: Array<{ close(): Promise<void> }> = [];
  const closeOpened = async () => {
    for (const resource of opened) await resource.close().catch(() => {});
  };
  let sink: BlockSink | undefined;
  let manifest: ManifestWriter | undefined;
  try {
    const imageSize = image ? image.virtualSize : streamed?.kind === 'blocks' ? await streamed.size : undefined;
    if (imageSize !== undefined && options.size !== undefined && options.size !== imageSize) throw inputSizeMismatch(options.size, imageSize);
    const size = nbd ? nbd.size : (imageSize ?? (input ? input.size : options.size));
    if (size !== undefined) checkVirtualSize(roundUpToSector(size), settings.clusterBits);
    // An incremental from a dirty bitmap knows what changed: the base is only the backing file.
    const incremental = options.bitmap !== undefined;
    // Opened with a manifest too: its chain is counted, and its files are inputs of this run.
    const baseImage = options.base !== undefined ? await openBase(options) : undefined;
    if (baseImage) opened.push(baseImage);
    if (baseImage) checkNewChainDepth(baseImage, options.maxChainDepth);
    await refuseOverlaps(await readFiles(input, image, options, baseImage), writtenFiles(output, dataFile, options.manifest));
    const baseManifest = options.baseManifest === undefined ? undefined : await (await import('../../transforms/manifest.js')).ManifestReader.open(options.baseManifest);
    if (baseManifest) opened.push(baseManifest);
    // Every stage of ours lets go of a Block once the sink is done with it (with user stages
    // there is no pool: the GC takes the buffers).
    const onBlockDone = pool ? (block: Block) => pool.release(block.data) : undefined;

    let external: ExternalWriter | undefined;
    let internal: InternalImageWriter | PlannedImageWriter | undefined;
    let planned: PlannedImageWriter | undefined;
    let compressor: CompressorPool | undefined;
    if (layout === 'external') {
      external = await ExternalWriter.create({
        clusterSize: settings.clusterSize,
        dataFileRaw: settings.dataFileRaw,
        refcountBits: 2 ** settings.refcountOrder,
        output,
        dataFile: dataFile!,
        dataFileName: dataFileName!,
        overwrite: options.overwrite ?? false,
        // The sink says when the stored name will not lead our readers to the data file.
        onWarning: warn,
        sync,
        backing,
        ...(size === undefined ? {} : { size }),
        ...(onBlockDone ? { onBlockDone } : {}),
      });
    } else {
      // A pipe or a Writable takes the image in order: plan in a first pass over the input, then emit.
      const toStream = typeof output !== 'string' || output === '-';
      if (toStream && countStages(stagesByPoint(options.stages)) > 0) {
        // Pass 2 rereads the input: bytes a stage changed in pass 1 would not be the bytes written.
        throw new InvalidArgumentError('A single-file image to a pipe or stream reads the input twice, so it cannot take stages of your own', {
          hint: 'Write the image to a file, or use the default external data-file layout, which takes stages into a pipe too',
        });
      }
      if (toStream && !input?.target.positional) {
        throw new NotSeekableError(
          'A single-file image to a pipe or stream needs a seekable input (a regular file): it is read twice, once to plan the layout and once for the data',
          { hint: 'Convert from a file, write the image to a file, or use the default external data-file layout, which streams from and to pipes' },
        );
      }
      if (options.compression) {
        const { CompressorPool } = await import('./compress.js');
        compressor = CompressorPool.create({
          type: options.compression,
          clusterSize: settings.clusterSize,
          ...(options.compressionThreads === undefined ? {} : { threads: options.compressionThreads }),
        });
        // Closed with the rest, on every path (finish, abort, a failure while opening).
        opened.push(compressor);
      }
      if (toStream) {
        const { PlannedImageWriter } = await import('./internal-stream.js');
        const target = input!.target;
        const pool2 = compressor;
        const compressBlocks = pool2 ? (await import('./compress.js')).compressBlocks : undefined;
        internal = planned = await PlannedImageWriter.create({
          output,
          size: size!,
          clusterBits: settings.clusterBits,
          refcountOrder: settings.refcountOrder,
          compression: options.compression,
          dedup: options.dedup ? { hasher: hasher!, ...dedupLimits(options.dedup) } : undefined,
          backing,
          sync,
          overwrite: options.overwrite ?? false,
          onBlockDone,
          readInput: (buffer, position, length) => target.read(buffer, 0, length, position),
          reread: () => readBlocks(target, { clusterSize: settings.clusterSize, size: size!, zeroRuns: true, ...(pool ? { pool } : {}) }),
          copySource: target.fd === undefined ? undefined : { fd: target.fd, name: target.name },
          compress: pool2 && compressBlocks ? (blocks) => compressBlocks(blocks, { pool: pool2 }) : undefined,
        });
      } else internal = await (await import('./internal-sink.js')).InternalImageWriter.create({
        compression: options.compression,
        output: output as string,
        clusterSize: settings.clusterSize,
        refcountBits: 2 ** settings.refcountOrder,
        dedup: options.dedup ? { hasher: hasher!, ...dedupLimits(options.dedup) } : undefined,
        overwrite: options.overwrite ?? false,
        sync,
        backing,
        onBlockDone,
      });
    }
    sink = (external ?? internal)!;
    if (options.manifest !== undefined) manifest = await (await import('../../transforms/manifest.js')).ManifestWriter.create({ output: options.manifest, hasher: hasher!, clusterSize: settings.clusterSize, sync, overwrite: options.overwrite ?? false });
    let comparer: BaseComparer | undefined;
    // An incremental from a dirty bitmap knows what changed: the base is only the backing file.
    if ((baseImage || baseManifest) && !incremental) {
      const { createBaseComparer, createManifestComparer } = await import('../../transforms/base-compare.js');
      // With a manifest the base is open too (its chain is counted), but the manifest is compared.
      comparer = baseManifest
        ? createManifestComparer({ manifest: baseManifest, hasher: hasher!, clusterSize: settings.clusterSize })
        : createBaseComparer({ base: baseImage!, clusterSize: settings.clusterSize });
    }

    const progressInterval = options.progressInterval ?? PROGRESS_STEP;
    let nextReport = progressInterval;
    let bytesDone = 0;
    const report = () => options.onProgress?.(size === undefined ? { bytesDone } : { bytesDone, bytesTotal: size });
    const advance = (done: number) => {
      bytesDone = done;
      // The last report is left to the one after finishing (no duplicate at 100%).
      if (options.onProgress && bytesDone >= nextReport && bytesDone !== size) {
        report();
        nextReport = bytesDone + progressInterval;
      }
    };
    const clusterSize = settings.clusterSize;
    const theSink = sink;
    const theManifest = manifest;
    const theCompressor = compressor;
    const compressBatch = theCompressor ? (await import('./compress.js')).compressBatch : undefined;
    // A batch's compressed bytes live in the pool's reused buffers until the sink has them.
    const releases = new WeakMap<BlockBatch, () => void>();
    const pass = (batch: BlockBatch) => batch;
    const stages = (user: Record<StagePoint, readonly ConvertStage[]>): unknown[] => arrangeStages({
      zeroDetect: detectZeros<BlockBatch>,
      baseCompare: comparer ? (batch: BlockBatch) => comparer.compareBatch(batch) : pass,
      // After the users' stages before it (they may change the bytes), before the sink.
      compression: theCompressor && compressBatch
        ? async (batch: BlockBatch) => {
            releases.set(batch, await compressBatch(batch.blocks, theCompressor));
            return batch;
          }
        : pass,
      manifest: theManifest
        ? async (batch: BlockBatch) => {
            // The manifest reads the bytes first: the sink may recycle them once written.
            if (incremental && baseManifest) for (const block of batch.blocks) await theManifest.addUnchanged(block, baseManifest);
            else for (const block of batch.blocks) await theManifest.add(block);
            return batch;
          }
        : pass,
      sink: async (batch: BlockBatch) => {
        if (signal?.aborted) throw abortError(signal);
        await theSink.writeItem(batch);
        releases.get(batch)?.();
        releases.delete(batch);
        const last = batch.blocks[batch.blocks.length - 1];
        if (batch.inputEnd !== undefined) advance(batch.inputEnd);
        else if (last) advance(blockEnd(last, clusterSize));
        return none;
      },
    }, user);
    return {
      settings,
      size,
      external,
      planned,
      baseCompared: comparer !== undefined,
      manifest,
      stages,
      advance,
      async finish(throughStages) {
        // The stages must have passed the source's last batch on, or the image's length is unknown.
        if (throughStages && !theSink.sawInputEnd) throw missingInputEnd('convert');
        // A fixed VHD's footer is known once the stream ended: it must describe what came before it.
        if (streamed?.kind === 'fixed-vhd') streamed.check(bytesDone);
        const summary = external ? await finishExternal(external) : await finishInternal(internal!, options.compression);
        await theManifest?.finish(summary.virtualSize);
        report();
        return {
          ...summary,
          ...(backing ? { backingFile: backing.name } : {}),
          ...(options.manifest !== undefined ? { manifest: options.manifest } : {}),
          warnings,
          ...(nbd ? { sourceBytesRead: nbd.bytesRead } : {}),
          seconds: (performance.now() - started) / 1000,
        };
      },
      async abort() {
        await theSink.abort();
        await theManifest?.abort();
      },
      close: closeOpened,
    };
  } catch (err) {
    await sink?.abort();
    await manifest?.abort();
    await closeOpened();
    throw err;
  }
}

/** Option combinations that cannot work, refused before anything is opened. */
function checkLayoutOptions(options: ConvertOptions, layout: 'external' | 'internal'): void {
  if (layout !== 'external' && layout !== 'internal') throw new InvalidArgumentError(`Unknown layout ${describeValue(layout)}: use 'external' or 'internal'`);
  if (typeof options.output === 'string') checkOutputName(options.output, 'output');
  if (typeof options.dataFile === 'string') checkOutputName(options.dataFile, 'data file');
  if (options.manifest !== undefined) checkOutputName(options.manifest, 'manifest');
  const { progressInterval } = options;
  if (progressInterval !== undefined && (!Number.isSafeInteger(progressInterval) || progressInterval <= 0)) {
    throw new InvalidArgumentError(`Invalid progressInterval ${describeValue(progressInterval)}: it must be a positive whole number of bytes`);
  }
  if (options.dedup && layout === 'external') {
    throw new DedupUnsupportedError(
      'Dedup cannot share clusters in an external data file: with a data file every guest cluster must sit at its own guest offset (qcow2 spec, incompatible feature bit 2)',
      { hint: "Use --internal --dedup (API: layout: 'internal', dedup: true) for one qcow2 file with shared clusters, or --base PREV and --manifest (API: base, manifest) for incremental backups with a data file" },
    );
  }
  if (layout === 'internal' && (options.dataFile !== undefined || options.dataFileName !== undefined)) {
    throw new InvalidArgumentError("An internal image has no data file: drop --data-file / --data-file-name (API: dataFile, dataFileName), or drop --internal (API: layout: 'internal')");
  }
  if (options.base !== undefined && options.dataFileRaw === true) {
    throw new InvalidArgumentError('The raw-data-file bit cannot be set on an overlay: with a backing file the data file alone is not the guest image', {
      hint: 'Drop dataFileRaw: true (overlays always clear the bit)',
    });
  }
  if (options.baseManifest !== undefined && options.base === undefined) {
    throw new InvalidArgumentError('--base-manifest (API: baseManifest) needs --base (API: base): the base image becomes the backing file of the new image');
  }
  if (options.bitmap !== undefined) {
    if (typeof options.input !== 'string' || !isNbdUri(options.input)) {
      throw new InvalidArgumentError('--bitmap (API: bitmap) reads a dirty bitmap over NBD: the input must be an NBD URI (nbd://…, nbd+unix://…)');
    }
    if (options.base === undefined) {
      throw new InvalidArgumentError('--bitmap (API: bitmap) needs --base (API: base): the clusters it leaves out come from the previous backup', {
        hint: 'Pass --base PREVIOUS.qcow2 (API: base), the image the bitmap was started against',
      });
    }
    if (options.manifest !== undefined && options.baseManifest === undefined) {
      throw new InvalidArgumentError('--bitmap with --manifest (API: bitmap, manifest) needs --base-manifest (API: baseManifest): the clean clusters are not read, so their fingerprints come from the base\'s manifest');
    }
  }
  if (options.baseName !== undefined && options.base === undefined) {
    throw new InvalidArgumentError('--base-name (API: baseName) needs --base (API: base)');
  }
  if (options.compression !== undefined) {
    if (layout === 'external') {
      throw new CompressionUnsupportedError(
        'Compressed clusters cannot be written with an external data file: the qcow2 spec forbids them there (every guest cluster sits at its own offset in the data file)',
        'layout',
        { hint: "Add --internal (API: layout: 'internal') for one compressed qcow2 file" },
      );
    }
    checkCompressionType(options.compression);
  }
  if (options.compressionThreads !== undefined && options.compression === undefined) {
    throw new InvalidArgumentError('compressionThreads needs compression');
  }
}

function dedupLimits(dedup: true | { maxEntries?: number }): { maxEntries?: number } {
  return dedup === true || dedup.maxEntries === undefined ? {} : { maxEntries: dedup.maxEntries };
}

/**
 * The backing file's stored name and format. qemu resolves a relative backing name against the
 * overlay's directory, so the default name is the base's path relative to the output's.
 */
async function describeBacking(base: string, baseName: string | undefined, output: OutputTarget): Promise<{ name: string; format: string }> {
  const format = await (await import('../read/image.js')).probeFormat(base);
  if (baseName !== undefined) return { name: baseName, format };
  // Relative even when both paths are absolute: the pair keeps working when the folder moves.
  if (typeof output !== 'string' || output === '-') return { name: base, format };
  return { name: relative(dirname(resolve(output)), resolve(base)) || base, format };
}

/** Opens the base for byte comparison; names stored inside it go through the path policy. */
async function openBase(options: ConvertOptions): Promise<DiskImage> {
  const { openDisk } = await import('../read/image.js');
  return openDisk(options.base!, {
    ...(options.allowUnsafePaths ? { allowUnsafePaths: true } : {}),
    ...(options.maxChainDepth === undefined ? {} : { maxChainDepth: options.maxChainDepth }),
  });
}

/** Refuses an overlay that would make a chain longer than every reader here (and export) accepts. */
function checkNewChainDepth(base: DiskImage, maxChainDepth = DEFAULT_MAX_CHAIN_DEPTH): void {
  let images = 1;
  for (let layer: DiskImage | undefined = base; layer; layer = layer.backing) images++;
  if (images > maxChainDepth) {
    throw new LimitExceededError(`The new overlay would make a backing chain of ${images} images, more than the ${maxChainDepth} that reading it allows`, {
      structure: 'backing chain',
      limit: maxChainDepth,
      actual: images,
      hint: 'Start a new full image (convert without --base), or raise the limit (--max-chain-depth, maxChainDepth in the API) here and when reading',
    });
  }
}

/** The external sink's result as convert's summary (the run's own fields are added by the caller). */
async function finishExternal(writer: ExternalWriter) {
  const { metadataClusters: _clusters, l2Tables: _tables, warnings: _warnings, ...result } = await writer.finish();
  return result;
}

/** The single-file writer's result as convert's summary. */
async function finishInternal(writer: InternalImageWriter | PlannedImageWriter, compression: CompressionType | undefined) {
  const { compressedClusters, fileClusters: _file, bytesWritten: _bytes, warnings: _warnings, dedup, ...result } = await writer.finish();
  return {
    ...result,
    ...(dedup ? { dedup } : {}),
    ...(compression ? { compression: { type: compression, clusters: compressedClusters } } : {}),
  };
}

/** Every file the conversion reads: the input, the base (its whole chain), the base manifest. */
async function readFiles(input: OpenedInput | undefined, image: DiskImage | undefined, options: ConvertOptions, baseImage: DiskImage | undefined): Promise<RunFile[]> {
  const files: RunFile[] = [];
  if (input?.file) files.push({ role: 'input', path: input.file.path, stats: await input.file.handle.stat() });
  // An image input: none of the files it reads (its chain, data files) may be written.
  if (image) files.push(...(await import('../read/chain-files.js')).chainFiles(image, 'input'));
  if (baseImage) files.push(...(await import('../read/chain-files.js')).chainFiles(baseImage, 'base'));
  else if (options.base !== undefined) files.push({ role: 'base', path: options.base });
  if (options.baseManifest !== undefined) files.push({ role: 'base manifest', path: options.baseManifest });
  return files;
}

/** Every file the conversion writes. */
function writtenFiles(output: OutputTarget, dataFile: string | Writable | undefined, manifest: string | undefined): RunFile[] {
  const files: RunFile[] = [];
  if (typeof output === 'string' && output !== '-') files.push({ role: 'output', path: output });
  if (typeof dataFile === 'string') {
    files.push({ role: 'data file', path: dataFile, hint: 'To use an existing raw file as the data file without copying it, run: qcow2-stream wrap RAW OUTPUT (API: wrap(raw, output))' });
  }
  if (manifest !== undefined) files.push({ role: 'manifest', path: manifest });
  return files;
}

/**
 * Opens a path input as an image when it is not raw: probed unless `inputFormat` says. Returns
 * undefined for raw input (standard input, a pipe, or a file probed or declared raw), which the
 * raw sources read. Recognised formats no reader opens are refused by name here.
 */
async function openImageInput(path: string, options: ConvertOptions, warn: (message: string) => void): Promise<DiskImage | undefined> {
  if (options.inputFormat === 'raw') return undefined;
  let seekable = isS3Uri(path);
  try {
    if (!seekable) {
      const kind = kindOf(path === '-' ? fstatSync(0) : await stat(path));
      seekable = kind === 'file' || kind === 'block-device';
    }
  } catch (err) {
    throw fileError(err, 'open', path);
  }
  // A pipe is probed from its first bytes by the stream reader (write/stream-image.ts).
  if (!seekable) return undefined;
  // '< image' on standard input: the file behind it, read like any file.
  if (path === '-') path = '/dev/stdin';
  const { openDisk, probeFormat } = await import('../read/image.js');
  const format = options.inputFormat ?? (await probeFormat(path, { onWarning: warn }));
  if (format === 'raw') return undefined;
  return openDisk(path, {
    format,
    ...(options.allowUnsafePaths ? { allowUnsafePaths: true } : {}),
    onWarning: warn,
  });
}
