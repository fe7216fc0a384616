/**
 * `wrap()`: writes only the qcow2 metadata around an existing raw file, which becomes the data
 * file as it is. The raw file is opened read-only and never modified or truncated (qemu 7.2's
 * `create -o data_file=…` truncates it; users lost images to that, pitfall P10).
 *
 * Raw mode (default): the metadata depends only on the size, so the file is not even read.
 * Sparse mode (`dataFileRaw: false`): the file is scanned for all-zero clusters, which are
 * left unallocated.
 *
 * The virtual size is the raw size rounded up to 512. The padding cannot be written (the file
 * is never modified), and need not be: qemu reads past the end of a data file as zeros.
 */

import { blockEnd } from '../block.js';
import { InvalidArgumentError } from '../errors.js';
import type { Progress } from '../progress.js';
import { checkVirtualSize, roundUpToSector } from '../format/index.js';
import { isAllZero } from '../io/buffers.js';
import { openForRead } from '../io/files.js';
import { OffsetWriter, type OutputTarget } from '../io/output.js';
import { abortError } from './abort.js';
import { MetadataEmitter, type MetadataResult } from './metadata.js';
import { checkOutputName, refuseOverlaps } from '../io/same-file.js';
import { dataFileNameWarning, defaultDataFileName } from './paths.js';
import { checkDataFileName, resolveImageSettings, type ImageOptions, type WriteSummary } from './settings.js';
import { BufferPool, fileHandleTarget, readBlocks } from './sources.js';

const PROGRESS_STEP = 32 * 1024 * 1024;

export interface WrapOptions extends ImageOptions {
  /** The existing raw image file, which becomes the data file as it is (opened read-only). */
  input: string;
  /** Where the qcow2 metadata goes: a path, '-' for standard output, or a Writable. */
  output: OutputTarget;
  /**
   * The name stored in the header. Default, as convert's: `input`'s path relative to the
   * output's directory when it lies there or below, else its absolute path (with a warning:
   * our readers refuse it); as given when the output is not a path.
   */
  dataFileName?: string;
  /** fsync the metadata file (and its directory) before resolving. Default true. */
  sync?: boolean;
  /** Replace an existing file at the output path. Default false (the CLI's --force). */
  overwrite?: boolean;
  /** Called with each warning as it arises (also listed in the summary's `warnings`). */
  onWarning?: (message: string) => void;
  /** Cancels the scan: it rejects with an AbortedError and removes the metadata file. */
  signal?: AbortSignal;
  /** Called every 32 MiB while a sparse-mode wrap scans the raw file, and at the end. */
  onProgress?: (progress: Progress) => void;
}

/**
 * `dataClusters`: all clusters in raw mode, the non-zero ones in sparse mode; `inputBytes` is
 * the raw file's size, `dataFile` the raw file, and nothing is written to it
 * (`dataBytesWritten` is 0).
 */
export interface WrapSummary extends WriteSummary {
  /** Always `external`: the raw file is the data file. */
  layout: 'external';
  /** The raw file. */
  dataFile: string;
  /** The data-file name stored in the header. */
  dataFileName: string;
  /** Bytes of raw file read (0 in raw mode: nothing needs reading). */
  bytesRead: number;
  /** Clusters of the metadata file. */
  metadataClusters: number;
  /** L2 tables written. */
  l2Tables: number;
}

/**
 * Writes qcow2 metadata to `output` that uses the existing raw file `input` as its data file.
 * Refuses an output that is the raw file itself. The raw file is only ever read.
 */
export async function wrap(options: WrapOptions): Promise<WrapSummary> {
  const started = performance.now();
  const settings = resolveImageSettings(options);
  const { input: rawPath, output, signal } = options;
  if (typeof rawPath !== 'string' || rawPath === '') throw new InvalidArgumentError('wrap: input must be the path of a raw image file');
  if (typeof output === 'string') checkOutputName(output, 'output');
  const dataFileName = options.dataFileName ?? defaultDataFileName(output, rawPath);
  checkDataFileName(dataFileName, settings);
  const warnings: string[] = [];
  const warning = dataFileNameWarning(output, dataFileName, rawPath);
  if (warning !== undefined) {
    warnings.push(warning);
    options.onWarning?.(warning);
  }

  const raw = await openForRead(rawPath);
  try {
    if (raw.kind !== 'file') {
      throw new InvalidArgumentError(`'${rawPath}' is not a regular file; wrap needs a raw image file to use as the data file`);
    }
    const virtualSize = roundUpToSector(raw.size);
    checkVirtualSize(virtualSize, settings.clusterBits);
    if (typeof output === 'string' && output !== '-') {
      await refuseOverlaps([{ role: 'raw file', path: rawPath, stats: await raw.handle.stat() }], [{ role: 'output', path: output }]);
    }
    if (signal?.aborted) throw abortError(signal);

    const metadata = await OffsetWriter.create(output, { label: 'metadata file', sync: options.sync ?? true, overwrite: options.overwrite ?? false });
    try {
      const emitter = new MetadataEmitter(metadata, { settings, dataFileName, virtualSize });
      await emitter.start();
      let dataClusters = 0;
      let bytesRead = 0;
      const clusters = Math.ceil(virtualSize / settings.clusterSize);
      if (settings.dataFileRaw) {
        dataClusters = clusters;
      } else {
        const target = fileHandleTarget(raw.handle, { name: rawPath });
        const pool = new BufferPool();
        let nextReport = PROGRESS_STEP;
        // Holes of the raw file come as zero runs (never read) when the extent probe is built.
        for await (const block of readBlocks(target, { clusterSize: settings.clusterSize, size: raw.size, pool, zeroRuns: true })) {
          if (signal?.aborted) throw abortError(signal);
          bytesRead = blockEnd(block, settings.clusterSize);
          if (bytesRead >= nextReport) {
            options.onProgress?.({ bytesDone: bytesRead, bytesTotal: raw.size });
            nextReport = bytesRead + PROGRESS_STEP;
          }
          if (block.count !== undefined) {
            // A run's bytes are a shared zero cluster, not a pool buffer: nothing to release.
            const recorded = emitter.recordRun(block.index, block.count, 'zero');
            if (recorded) await recorded;
            continue;
          }
          const hasData = !isAllZero(block.data);
          pool.release(block.data);
          if (hasData) dataClusters++;
          const recorded = emitter.record(block.index, hasData ? 'data' : 'zero');
          if (recorded) await recorded;
        }
      }
      const result: MetadataResult = await emitter.finish(virtualSize);
      options.onProgress?.({ bytesDone: raw.size, bytesTotal: raw.size });
      await metadata.commit();
      return {
        layout: 'external',
        inputBytes: raw.size,
        virtualSize,
        clusterSize: settings.clusterSize,
        refcountBits: 2 ** settings.refcountOrder,
        dataFileRaw: settings.dataFileRaw,
        clusters,
        dataClusters,
        zeroClusters: clusters - dataClusters,
        duplicateClusters: 0,
        unchangedClusters: 0,
        dataBytesWritten: 0,
        bytesRead,
        metadataBytesWritten: metadata.bytesWritten,
        metadataClusters: result.metadataClusters,
        l2Tables: result.l2Tables,
        dataFile: rawPath,
        dataFileName,
        warnings,
        seconds: (performance.now() - started) / 1000,
      };
    } catch (err) {
      await metadata.abort();
      throw err;
    }
  } finally {
    await raw.handle.close().catch(() => {});
  }
}
