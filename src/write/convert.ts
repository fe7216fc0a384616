/**
 * `convert()`: raw bytes in, a qcow2 metadata file plus its raw data file out, in one call.
 * It composes the generator stages directly (source → zero-detect → external sink) with no
 * stream hop per block. Everything is validated before any output is created, and a failure
 * part-way (read or write error, abort, size mismatch) removes what this run created.
 */

import type { Readable, Writable } from 'node:stream';
import type { Block } from '../block.js';
import { InvalidArgumentError } from '../errors.js';
import { checkVirtualSize, roundUpToSector } from '../format/index.js';
import type { OutputTarget } from '../io/output.js';
import { zeroDetect } from '../../transforms/zero-detect.js';
import { abortable, abortError } from './abort.js';
import { clusterize } from './clusterize.js';
import { ExternalWriter, type SinkResult } from './external-sink.js';
import { defaultDataFilePath, identify, sameFile, type FileIdentity } from './paths.js';
import { checkDataFileName, resolveImageSettings, type ImageOptions } from './settings.js';
import { BufferPool, openInput, readBlocks, type OpenedInput } from './sources.js';

/** A raw image: a path, '-' for standard input, a Node Readable or any async iterable of bytes. */
export type ConvertInput = string | Readable | AsyncIterable<Uint8Array>;

export interface ConvertProgress {
  /** Guest bytes processed so far. */
  bytesDone: number;
  /** The input size, when known. */
  bytesTotal?: number;
}

export interface ConvertOptions extends ImageOptions {
  input: ConvertInput;
  /** The qcow2 metadata file: a path, '-' for standard output, or a Writable. */
  output: OutputTarget;
  /**
   * The raw data file: a path, or a Writable. Default: the output path with its extension
   * replaced by `.data`. Required when the output is '-' or a stream.
   */
  dataFile?: string | Writable;
  /** The name stored in the header. Default: the data-file path exactly as given (like qemu-img). */
  dataFileName?: string;
  /** The input size in bytes. Required for nothing, but lets the metadata stream while the data flows and checks the input's length. */
  size?: number;
  /** Replace an existing data file. Default false: never clobber a file by surprise. */
  overwrite?: boolean;
  signal?: AbortSignal;
  /** Called every 32 MiB of input and at the end. */
  onProgress?: (progress: ConvertProgress) => void;
}

export interface ConvertSummary extends SinkResult {
  /** The data file path, when it is a path. */
  dataFile: string | undefined;
  /** The name stored in the header. */
  dataFileName: string;
  /** Wall-clock seconds. */
  seconds: number;
}

const PROGRESS_STEP = 32 * 1024 * 1024;

/**
 * Converts a raw image into a qcow2 image with an external data file.
 * Throws a Qcow2StreamError (InvalidArgumentError, InputSizeError, FileError, AbortedError…)
 * with no output left behind.
 */
export async function convert(options: ConvertOptions): Promise<ConvertSummary> {
  const started = performance.now();
  const settings = resolveImageSettings(options);
  const { output, signal } = options;
  if (options.size !== undefined) {
    if (!Number.isSafeInteger(options.size) || options.size < 0) throw new InvalidArgumentError(`Invalid size ${options.size}`);
    checkVirtualSize(roundUpToSector(options.size), settings.clusterBits);
  }
  let dataFile = options.dataFile;
  if (dataFile === undefined) {
    if (typeof output !== 'string' || output === '-') {
      throw new InvalidArgumentError('A data-file path is needed when the metadata goes to standard output or a stream', {
        hint: 'Pass --data-file PATH',
      });
    }
    dataFile = defaultDataFilePath(output);
  }
  if (dataFile === '-') throw new InvalidArgumentError('The data file must be a path or a Writable, not standard output');
  const dataFileName = options.dataFileName ?? (typeof dataFile === 'string' ? dataFile : undefined);
  if (dataFileName === undefined) throw new InvalidArgumentError('dataFileName is required when the data file is a stream');
  checkDataFileName(dataFileName, settings);
  if (signal?.aborted) throw abortError(signal);

  const input = typeof options.input === 'string' ? await openInput(options.input, options.size) : undefined;
  try {
    const size = input ? input.size : options.size;
    if (size !== undefined) checkVirtualSize(roundUpToSector(size), settings.clusterBits);
    await refuseSameFiles(input, output, dataFile);
    const pool = input ? new BufferPool() : undefined;

    const writer = await ExternalWriter.open({
      clusterSize: settings.clusterSize,
      dataFileRaw: settings.dataFileRaw,
      refcountBits: 2 ** settings.refcountOrder,
      output,
      dataFile,
      dataFileName,
      overwrite: options.overwrite ?? false,
      ...(size === undefined ? {} : { size }),
      // Every stage below is ours and lets go of a Block once the sink is done with it.
      ...(pool ? { onBlockDone: (block: Block) => pool.release(block.data) } : {}),
    });
    try {
      const sourceOptions = { clusterSize: settings.clusterSize, ...(size === undefined ? {} : { size }) };
      let blocks: AsyncIterable<Block>;
      if (input) {
        blocks = readBlocks(input.target, { ...sourceOptions, ...(pool ? { pool } : {}) });
        // A pipe can block for ever: race each read against the abort signal. (File reads
        // return promptly; the per-block check below is enough for them.)
        if (signal && !input.target.positional) blocks = abortable(blocks, signal);
      } else {
        const bytes = options.input as Readable | AsyncIterable<Uint8Array>;
        blocks = clusterize(bytes, sourceOptions);
        if (signal) blocks = abortable(blocks, signal);
      }
      let nextReport = PROGRESS_STEP;
      const report = (bytesDone: number) => options.onProgress?.(size === undefined ? { bytesDone } : { bytesDone, bytesTotal: size });
      for await (const block of zeroDetect(blocks)) {
        if (signal?.aborted) throw abortError(signal);
        await writer.write(block);
        if (options.onProgress) {
          const done = block.index * settings.clusterSize + block.data.length;
          if (done >= nextReport) {
            report(done);
            nextReport = done + PROGRESS_STEP;
          }
        }
      }
      if (signal?.aborted) throw abortError(signal);
      const result = await writer.finish();
      report(result.inputBytes);
      return {
        ...result,
        dataFile: typeof dataFile === 'string' ? dataFile : undefined,
        dataFileName,
        seconds: (performance.now() - started) / 1000,
      };
    } catch (err) {
      await writer.abort();
      throw err;
    }
  } finally {
    // After an abort a read of a quiet pipe may never return, and closing its handle would wait
    // for that read: close in the background instead (the CLI exits right after).
    if (signal?.aborted) void input?.close().catch(() => {});
    else await input?.close();
  }
}

/**
 * Refuses a data file or output that is the input itself, and a data file that is the output:
 * either would destroy the user's image. Nothing has been created at this point.
 */
async function refuseSameFiles(input: OpenedInput | undefined, output: OutputTarget, dataFile: string | Writable): Promise<void> {
  const inputId: FileIdentity | undefined = input?.file ? { stats: await input.file.handle.stat(), path: '' } : undefined;
  if (inputId && input?.file && input.file.path !== '/dev/stdin') inputId.path = (await identify(input.file.path, inputId.stats)).path;
  const dataId = typeof dataFile === 'string' ? await identify(dataFile) : undefined;
  const outputId = typeof output === 'string' && output !== '-' ? await identify(output) : undefined;
  if (inputId && dataId && sameFile(inputId, dataId)) {
    throw new InvalidArgumentError(`The data file '${String(dataFile)}' is the input itself; refusing to overwrite it`, {
      hint: 'To use an existing raw file as the data file without copying it, run: qcow2-stream wrap RAW OUTPUT',
    });
  }
  if (inputId && outputId && sameFile(inputId, outputId)) {
    throw new InvalidArgumentError(`The output '${String(output)}' is the input itself; refusing to overwrite it`);
  }
  if (dataId && outputId && sameFile(dataId, outputId)) {
    throw new InvalidArgumentError(`The data file and the metadata output are the same file '${String(output)}'`, {
      hint: 'Pass a different --data-file',
    });
  }
}
