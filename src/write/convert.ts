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
import type { Readable, Writable } from 'node:stream';
import { blockEnd, type Block } from '../block.js';
import type { Progress } from '../progress.js';
import { CompressionUnsupportedError, DedupUnsupportedError, fileError, InvalidArgumentError, LimitExceededError, NotSeekableError } from '../errors.js';
import { checkVirtualSize, roundUpToSector } from '../format/index.js';
import { kindOf } from '../io/files.js';
import type { OutputTarget } from '../io/output.js';
import type { DiskImage, ImageFormat } from '../read/image.js';
import { DEFAULT_MAX_CHAIN_DEPTH } from '../format/constants.js';
import { zeroDetect } from '../../transforms/zero-detect.js';
import type { DedupStats } from '../../transforms/dedup.js';
import type { ManifestWriter } from '../../transforms/manifest.js';
import { abortable, abortError } from './abort.js';
import { clusterize } from './clusterize.js';
import { checkCompressionType, type CompressionType, type CompressorPool } from './compress.js';
import { ExternalWriter } from './external-sink.js';
import type { InternalImageWriter } from './internal-sink.js';
import type { PlannedImageWriter } from './internal-stream.js';
import { defaultDataFilePath } from './paths.js';
import { checkOutputName, refuseOverlaps, type RunFile } from '../io/same-file.js';
import { storedNameFindsFile } from '../io/path-policy.js';
import { checkDataFileName, resolveImageSettings, type ImageOptions, type ImageSettings, type ImageShape } from './settings.js';
import { imageBlocks } from './image-source.js';
import type { StreamInput } from './stream-image.js';
import { BufferPool, openInput, readBlocks, type OpenedInput } from './sources.js';
import { isNbdUri, type NbdTlsOptions } from '../io/nbd.js';
import { isS3Uri, keyBaseName } from '../io/s3-uri.js';
import { inputSizeMismatch } from './clusterize.js';

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
  /** The name stored in the header. Default: the data-file path exactly as given (like qemu-img). */
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
   * sit at its guest offset, so none can be shared). `maxEntries` caps the fingerprint index
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
}

/** `dataClusters` counts clusters stored in the data file, or in the image (internal layout). */
export interface ConvertSummary extends ImageShape {
  /** The layout written (see {@link ConvertOptions.layout}). */
  layout: 'external' | 'internal';
  /** Guest bytes read (the input size). */
  inputBytes: number;
  /** Clusters that share an earlier cluster's storage (dedup). */
  duplicateClusters: number;
  /** Clusters equal to the base, left unallocated (overlays). */
  unchangedClusters: number;
  /** Bytes of guest data written (to the data file, or inside the image). */
  dataBytesWritten: number;
  /** Bytes of metadata written (the metadata file, or the image's metadata clusters). */
  metadataBytesWritten: number;
  /** External layout: whether the metadata streamed with the data or was written at the end. */
  metadataLayout?: 'streamed' | 'at-end';
  /** The data file path, when it is a path (external layout). */
  dataFile: string | undefined;
  /** The data-file name stored in the header (external layout). */
  dataFileName: string | undefined;
  /** The backing-file name stored in the header (overlays). */
  backingFile?: string;
  /** The manifest written, if any. */
  manifest?: string;
  /** Dedup statistics (internal layout with dedup). */
  dedup?: DedupStats;
  /** What the run warned about (e.g. a stored data-file name our readers will refuse). */
  warnings: readonly string[];
  /** NBD inputs: bytes of guest data the server actually sent (zero, hole and clean extents are not read). */
  sourceBytesRead?: number;
  /** The compression type, and clusters stored compressed (compressed images). */
  compression?: {
    /** The compression type written in the header. */
    type: CompressionType;
    /** Clusters stored compressed (the others did not shrink, or were zero or shared). */
    clusters: number;
  };
  /** Wall-clock seconds. */
  seconds: number;
}

/** The default `progressInterval`. */
const PROGRESS_STEP = 32 * 1024 * 1024;

/** What convert() writes blocks into: the external or the internal writer. */
interface BlockSink {
  write(block: Block): Promise<void>;
  abort(): Promise<void>;
}

/**
 * Converts a raw image into qcow2. Throws a Qcow2StreamError (InvalidArgumentError,
 * DedupUnsupportedError, InputSizeError, FileError, AbortedError…) with no output left behind.
 */
export async function convert(options: ConvertOptions): Promise<ConvertSummary> {
  // Objects (s3://) in or out: the same conversion over rewritten options (write/object-io.ts).
  if (isS3Uri(options.input)) return convert(await (await import('./object-io.js')).withObjectInput({ ...options, input: options.input }));
  if (options.layout === 'internal' && isS3Uri(options.output)) return (await import('./object-io.js')).internalToObject(options, convert);
  const started = performance.now();
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
    if (!Number.isSafeInteger(options.size) || options.size < 0) throw new InvalidArgumentError(`Invalid size ${options.size}`);
    checkVirtualSize(roundUpToSector(options.size), settings.clusterBits);
  }
  let dataFile: string | Writable | undefined;
  let dataFileName: string | undefined;
  if (layout === 'external') {
    dataFile = options.dataFile;
    if (dataFile === undefined) {
      if (typeof output !== 'string' || output === '-') {
        throw new InvalidArgumentError('A data-file path is needed when the metadata goes to standard output or a stream', {
          hint: 'Pass --data-file PATH',
        });
      }
      dataFile = defaultDataFilePath(output);
    }
    if (dataFile === '-') throw new InvalidArgumentError('The data file must be a path or a Writable, not standard output');
    // An object's stored name is its key's last segment: the two objects are fetched side by side.
    dataFileName = options.dataFileName ?? (isS3Uri(dataFile) ? keyBaseName(dataFile) : typeof dataFile === 'string' ? dataFile : undefined);
    if (dataFileName === undefined) throw new InvalidArgumentError('dataFileName is required when the data file is a stream');
    checkDataFileName(dataFileName, settings);
    if (typeof output === 'string' && output !== '-' && typeof dataFile === 'string' && !storedNameFindsFile(output, dataFileName, dataFile)) {
      warn(
        `The data-file name '${dataFileName}' stored in '${output}' does not lead from the image's directory to the data file, or leads outside it: qemu may open it (from the right working directory), ` +
          `but qcow2-stream's readers refuse it unless given --data-file (dataFile) or --allow-unsafe-paths. Keep the data file in the image's directory or below it`,
      );
    }
  }
  const backing = options.base === undefined ? undefined : await describeBacking(options.base, options.baseName, output);
  if (signal?.aborted) throw abortError(signal);

  const needsHasher = Boolean(options.dedup) || options.manifest !== undefined || options.baseManifest !== undefined;
  // What only some conversions use (the reader, hashing, manifests, the internal layout) is
  // loaded when used: a plain conversion starts faster without it.
  const hasher = needsHasher ? await (await import('../../transforms/fingerprint.js')).createHasher() : undefined;
  // Every file this run writes is fsynced unless the caller opted out.
  const sync = options.sync ?? true;
  const opened: Array<{ close(): Promise<void> }> = [];
  const nbdUri = typeof options.input === 'string' && isNbdUri(options.input) ? options.input : undefined;
  // Connected (and the bitmap checked) before any output is created.
  const nbd = nbdUri === undefined ? undefined : await (await import('./nbd-source.js')).openNbdInput(nbdUri, options);
  if (nbd) opened.push(nbd);
  // A path is probed: an image is read through its reader, never taken as raw bytes.
  const image = typeof options.input === 'string' && !nbd ? await openImageInput(options.input, options, warn) : undefined;
  if (image) opened.push(image);
  let input: OpenedInput | undefined;
  try {
    input = typeof options.input === 'string' && !nbd && !image ? await openInput(options.input, options.size) : undefined;
    // A pipe is probed from its first bytes: raw goes on as raw, a streamOptimized VMDK or a
    // fixed VHD (-f vpc) is read in one pass, other formats need a file.
    let streamed: StreamInput | undefined;
    if (input && !input.target.positional) {
      streamed = await (await import('./stream-image.js')).openStreamInput(input.target, options.inputFormat, settings.clusterSize);
      if (streamed.kind !== 'blocks') input = { ...input, target: streamed.target };
    }
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
    // Compression holds more Blocks at once (batches in flight): recycle their buffers rather than drop them to the GC.
    const pool = input || nbd || image ? new BufferPool(undefined, options.compression ? 48 : undefined) : undefined;
    // Every stage below is ours and lets go of a Block once the sink is done with it.
    const onBlockDone = pool ? (block: Block) => pool.release(block.data) : undefined;

    let external: ExternalWriter | undefined;
    let internal: InternalImageWriter | PlannedImageWriter | undefined;
    let compressor: CompressorPool | undefined;
    if (layout === 'external') {
      external = await ExternalWriter.open({
        clusterSize: settings.clusterSize,
        dataFileRaw: settings.dataFileRaw,
        refcountBits: 2 ** settings.refcountOrder,
        output,
        dataFile: dataFile!,
        dataFileName: dataFileName!,
        overwrite: options.overwrite ?? false,
        overwriteOutput: options.overwrite ?? false,
        sync,
        backing,
        ...(size === undefined ? {} : { size }),
        ...(onBlockDone ? { onBlockDone } : {}),
      });
    } else {
      // A pipe or a Writable takes the image in order: plan in a first pass over the input, then emit.
      const toStream = typeof output !== 'string' || output === '-';
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
      }
      if (toStream) {
        const { PlannedImageWriter } = await import('./internal-stream.js');
        const target = input!.target;
        const pool2 = compressor;
        const compressBlocks = pool2 ? (await import('./compress.js')).compressBlocks : undefined;
        internal = await PlannedImageWriter.create({
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
          compress: pool2 && compressBlocks ? (blocks) => compressBlocks(blocks, pool2) : undefined,
        });
      } else internal = await (await import('./internal-sink.js')).InternalImageWriter.create({
        compression: options.compression,
        output: output as string,
        clusterBits: settings.clusterBits,
        refcountOrder: settings.refcountOrder,
        dedup: options.dedup ? { hasher: hasher!, ...dedupLimits(options.dedup) } : undefined,
        overwrite: options.overwrite ?? false,
        sync,
        backing,
        onBlockDone,
      });
    }
    const sink: BlockSink = (external ?? internal)!;
    let manifest: ManifestWriter | undefined;
    try {
      if (options.manifest !== undefined) manifest = await (await import('../../transforms/manifest.js')).ManifestWriter.create(options.manifest, hasher!, settings.clusterBits, { sync, overwrite: options.overwrite ?? false });
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
      /** The general path: Blocks through every stage that needs the bytes. */
      async function writeBlocks(): Promise<void> {
        const sourceOptions = { clusterSize: settings.clusterSize, ...(size === undefined ? {} : { size }) };
        let blocks: AsyncIterable<Block>;
        if (nbd) {
          // A server can stall (up to the client's timeout): race each Block against the signal.
          blocks = nbd.blocks(settings.clusterSize, pool);
          if (signal) blocks = abortable(blocks, signal);
        } else if (image) {
          // Ranges no layer holds data for come as zero runs, never read.
          blocks = imageBlocks(image, { clusterSize: settings.clusterSize, ...(pool ? { pool } : {}) });
        } else if (streamed?.kind === 'blocks') {
          blocks = signal ? abortable(streamed.blocks, signal) : streamed.blocks;
        } else if (input) {
          // Holes come as zero runs, never read: every stage below handles runs.
          blocks = readBlocks(input.target, { ...sourceOptions, zeroRuns: true, ...(pool ? { pool } : {}) });
          // A pipe can block for ever: race each read against the abort signal. (File reads
          // return promptly; the per-block check below is enough for them.)
          if (signal && !input.target.positional) blocks = abortable(blocks, signal);
        } else {
          const bytes = options.input as Readable | AsyncIterable<Uint8Array>;
          blocks = clusterize(bytes, sourceOptions);
          if (signal) blocks = abortable(blocks, signal);
        }
        blocks = zeroDetect(blocks);
        if ((baseImage || baseManifest) && !incremental) {
          const { compareWithBase, compareWithManifest } = await import('../../transforms/base-compare.js');
          if (baseManifest) blocks = compareWithManifest(blocks, baseManifest, hasher!, settings.clusterBits).blocks;
          else blocks = compareWithBase(blocks, baseImage!, settings.clusterSize).blocks;
        }
        if (compressor) blocks = (await import('./compress.js')).compressBlocks(blocks, compressor);

        for await (const block of blocks) {
          if (signal?.aborted) throw abortError(signal);
          // The manifest reads the bytes first: the sink may recycle them once written.
          if (incremental && baseManifest) await manifest?.addUnchanged(block, baseManifest);
          else await manifest?.add(block);
          await sink.write(block);
          advance(blockEnd(block, settings.clusterSize));
        }
      }
      const fileFd = input?.target.positional ? input.target.fd : undefined;
      if (image && (image.format === 'vpc' || image.format === 'vhdx') && external?.canCopyFromFile && !baseImage && !baseManifest && !manifest) {
        // VHD and VHDX store blocks uncompressed: copy them natively from where they lie.
        const { copyImageToExternal } = await import('./file-copy.js');
        await copyImageToExternal(image, external, { signal, onAdvance: advance });
      } else if (fileFd !== undefined && external?.canCopyFromFile && !baseImage && !baseManifest && !manifest) {
        // Nothing but the zero check needs the bytes: copy them natively, no Block per cluster.
        const { copyFileToExternal } = await import('./file-copy.js');
        await copyFileToExternal({ fd: fileFd, name: input!.name }, size!, external, { signal, onAdvance: advance });
      } else {
        await writeBlocks();
      }
      // A fixed VHD's footer is known once the stream ended: it must describe what came before it.
      if (streamed?.kind === 'fixed-vhd') streamed.check(bytesDone);
      if (signal?.aborted) throw abortError(signal);
      const summary = external ? await finishExternal(external, dataFile, dataFileName) : await finishInternal(internal!, settings, options.compression);
      await manifest?.finish(summary.virtualSize);
      report();
      return {
        ...summary,
        ...(backing ? { backingFile: backing.name } : {}),
        ...(options.manifest !== undefined ? { manifest: options.manifest } : {}),
        warnings,
        ...(nbd ? { sourceBytesRead: nbd.bytesRead } : {}),
        seconds: (performance.now() - started) / 1000,
      };
    } catch (err) {
      await sink.abort();
      await manifest?.abort();
      throw err;
    } finally {
      await compressor?.close();
    }
  } finally {
    for (const resource of opened) await resource.close().catch(() => {});
    // After an abort a read of a quiet pipe may never return, and closing its handle would wait
    // for that read: close it in the background instead (the CLI exits right after). A file's
    // reads return promptly, so it is closed before convert() settles, like every other path.
    if (signal?.aborted && !input?.target.positional) void input?.close().catch(() => {});
    else await input?.close();
  }
}

/** Option combinations that cannot work, refused before anything is opened. */
function checkLayoutOptions(options: ConvertOptions, layout: 'external' | 'internal'): void {
  if (layout !== 'external' && layout !== 'internal') throw new InvalidArgumentError(`Unknown layout '${String(layout)}': use 'external' or 'internal'`);
  if (typeof options.output === 'string') checkOutputName(options.output, 'output');
  if (typeof options.dataFile === 'string') checkOutputName(options.dataFile, 'data file');
  if (options.manifest !== undefined) checkOutputName(options.manifest, 'manifest');
  const { progressInterval } = options;
  if (progressInterval !== undefined && (!Number.isSafeInteger(progressInterval) || progressInterval <= 0)) {
    throw new InvalidArgumentError(`Invalid progressInterval ${progressInterval}: it must be a positive whole number of bytes`);
  }
  if (options.dedup && layout === 'external') {
    throw new DedupUnsupportedError(
      'Dedup cannot share clusters in an external data file: with a data file every guest cluster must sit at its own guest offset (qcow2 spec, incompatible feature bit 2)',
      { hint: 'Use --internal --dedup for one qcow2 file with shared clusters, or --base PREV (and --manifest) for incremental backups with a data file' },
    );
  }
  if (layout === 'internal' && (options.dataFile !== undefined || options.dataFileName !== undefined)) {
    throw new InvalidArgumentError('An internal image has no data file: drop --data-file / --data-file-name, or drop --internal');
  }
  if (options.base !== undefined && options.dataFileRaw === true) {
    throw new InvalidArgumentError('The raw-data-file bit cannot be set on an overlay: with a backing file the data file alone is not the guest image', {
      hint: 'Drop the raw-data-file option (overlays always clear it)',
    });
  }
  if (options.baseManifest !== undefined && options.base === undefined) {
    throw new InvalidArgumentError('--base-manifest needs --base: the base image becomes the backing file of the new image');
  }
  if (options.bitmap !== undefined) {
    if (typeof options.input !== 'string' || !isNbdUri(options.input)) {
      throw new InvalidArgumentError('--bitmap reads a dirty bitmap over NBD: the input must be an NBD URI (nbd://…, nbd+unix://…)');
    }
    if (options.base === undefined) {
      throw new InvalidArgumentError('--bitmap needs --base: the clusters it leaves out come from the previous backup', {
        hint: 'Pass --base PREVIOUS.qcow2 (the image the bitmap was started against)',
      });
    }
    if (options.manifest !== undefined && options.baseManifest === undefined) {
      throw new InvalidArgumentError('--bitmap with --manifest needs --base-manifest: the clean clusters are not read, so their fingerprints come from the base\'s manifest');
    }
  }
  if (options.baseName !== undefined && options.base === undefined) {
    throw new InvalidArgumentError('--base-name needs --base');
  }
  if (options.compression !== undefined) {
    if (layout === 'external') {
      throw new CompressionUnsupportedError(
        'Compressed clusters cannot be written with an external data file: the qcow2 spec forbids them there (every guest cluster sits at its own offset in the data file)',
        'layout',
        { hint: 'Add --internal for one compressed qcow2 file' },
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

async function finishExternal(writer: ExternalWriter, dataFile: string | Writable | undefined, dataFileName: string | undefined) {
  const result = await writer.finish();
  return {
    layout: 'external' as const,
    inputBytes: result.inputBytes,
    virtualSize: result.virtualSize,
    clusterSize: result.clusterSize,
    refcountBits: result.refcountBits,
    dataFileRaw: result.dataFileRaw,
    clusters: result.clusters,
    dataClusters: result.dataClusters,
    zeroClusters: result.zeroClusters - result.unchangedClusters,
    duplicateClusters: 0,
    unchangedClusters: result.unchangedClusters,
    dataBytesWritten: result.dataBytesWritten,
    metadataBytesWritten: result.metadataBytesWritten,
    metadataLayout: result.metadataLayout,
    dataFile: typeof dataFile === 'string' ? dataFile : undefined,
    dataFileName,
  };
}

async function finishInternal(writer: InternalImageWriter | PlannedImageWriter, settings: ImageSettings, compression: CompressionType | undefined) {
  const inputBytes = writer.inputBytes;
  const result = await writer.finish();
  const virtualSize = roundUpToSector(inputBytes);
  const metadataClusters = result.fileClusters - result.clusters.stored;
  return {
    layout: 'internal' as const,
    inputBytes,
    virtualSize,
    clusterSize: settings.clusterSize,
    refcountBits: 2 ** settings.refcountOrder,
    dataFileRaw: false,
    clusters: result.clusters.total,
    dataClusters: result.clusters.stored,
    zeroClusters: result.clusters.total - result.clusters.stored - result.clusters.duplicate - result.clusters.unchangedFromBase,
    duplicateClusters: result.clusters.duplicate,
    unchangedClusters: result.clusters.unchangedFromBase,
    dataBytesWritten: result.dataBytes,
    metadataBytesWritten: metadataClusters * settings.clusterSize,
    dataFile: undefined,
    dataFileName: undefined,
    ...(result.dedup ? { dedup: result.dedup } : {}),
    ...(compression ? { compression: { type: compression, clusters: result.clusters.compressed } } : {}),
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
    files.push({ role: 'data file', path: dataFile, hint: 'To use an existing raw file as the data file without copying it, run: qcow2-stream wrap RAW OUTPUT' });
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
  let seekable: boolean;
  try {
    const kind = kindOf(path === '-' ? fstatSync(0) : await stat(path));
    seekable = kind === 'file' || kind === 'block-device';
  } catch (err) {
    throw fileError(err, 'open', path);
  }
  // A pipe is probed from its first bytes by the stream reader (write/stream-image.ts).
  if (!seekable) return undefined;
  // '< image' on standard input: the file behind it, read like any file.
  if (path === '-') path = '/dev/stdin';
  const { openDisk, probeFormat } = await import('../read/image.js');
  const format = options.inputFormat ?? (await probeFormat(path, warn));
  if (format === 'raw') return undefined;
  return openDisk(path, {
    format,
    ...(options.allowUnsafePaths ? { allowUnsafePaths: true } : {}),
    onWarning: warn,
  });
}
