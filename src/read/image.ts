/**
 * The reader's public face: the {@link DiskImage} interface every format reader implements, and
 * the open calls that dispatch to them.
 *
 * Each on-disk format has its own reader file (qcow2-reader.ts, raw-reader.ts), built on the
 * shared mechanism of base-image.ts; probe.ts tells the formats apart.
 */

import type { AsyncIterableX } from '@reactivex/ix-esnext-esm/asynciterable';
import type { ParsedHeader } from '../format/index.js';
import { newContext } from './base-image.js';
import { openQcow2 } from './qcow2-reader.js';
import { openRaw } from './raw-reader.js';
import { openVhd } from './vhd-reader.js';
import { openVmdk } from './vmdk-reader.js';
import { openVhdx } from './vhdx-reader.js';
import { InvalidArgumentError } from '../errors.js';
import { checkOptionsObject, checkPath } from '../internal/arguments.js';
import { probeFormat } from './probe.js';

export { extentFile, openSeekable, type ExtentFile } from './base-image.js';
export { DEFAULT_MAX_CHAIN_DEPTH } from '../format/constants.js';
export { isDataFileRaw, readHeader, validateTables } from './qcow2-reader.js';
export { probeFormat } from './probe.js';

/** Image formats the reader opens. */
export type ImageFormat = 'qcow2' | 'raw' | 'vpc' | 'vmdk' | 'vhdx';

/**
 * What a guest range is, as seen from the top of the chain:
 * - `data`: bytes stored in a file (possibly compressed);
 * - `zero`: a layer says it reads as zeros (zero flag, zero subcluster);
 * - `unallocated`: no layer of the chain holds it; reads as zeros.
 */
export type ExtentKind = 'data' | 'zero' | 'unallocated';

/** A run of guest bytes with one kind, one layer and (for data) contiguous host bytes. */
export interface Extent {
  /** Guest offset. */
  start: number;
  /** Bytes in the run. */
  length: number;
  /** What the run is: see {@link ExtentKind}. */
  kind: ExtentKind;
  /** Which layer answered: 0 is the image itself, 1 its backing file, and so on. */
  depth: number;
  /** The file holding the bytes (data, and zero ranges with preallocated space). */
  file?: string;
  /** Offset of `start` in `file` (for compressed data: where the compressed stream starts). */
  hostOffset?: number;
  /** The bytes are in a compressed cluster (`hostOffset` is then the stream's byte offset). */
  compressed?: boolean;
}

/** Options of {@link openImage} and {@link openDisk}. */
export interface OpenImageOptions {
  /**
   * The external data file to use, chosen by the caller; bypasses the path policy for it.
   * Only valid for images with the external-data-file feature.
   */
  dataFile?: string;
  /** The backing image to use, chosen by the caller; bypasses the path policy for it. */
  backing?: string;
  /** Format of `backing` (default: probed). */
  backingFormat?: ImageFormat;
  /** Allow names stored in images to point anywhere local (see src/io/path-policy.ts). */
  allowUnsafePaths?: boolean;
  /** Called once per distinct warning (a short data file, a dirty or corrupt bit…). */
  onWarning?: (message: string) => void;
  /**
   * Most images in the chain, the top image and a raw file at the bottom included. Default
   * 128 (qemu sets no limit; nightly overlays make long chains).
   */
  maxChainDepth?: number;
  /**
   * VHD, VMDK and VHDX: open only the image, not the parent it names (inspecting an untrusted
   * image must not touch the files it names: `info`). Ranges the parent would answer read as
   * unallocated zeros. @internal
   */
  withoutParents?: boolean;
  /**
   * Bytes of L2 tables kept in memory for the top image. Default 8 MiB (at least 4 tables);
   * each backing image keeps an eighth of it, so a long chain stays small.
   */
  l2CacheBytes?: number;
}

/** Options of {@link openDisk}: the format may be given or probed. */
export interface OpenDiskOptions extends OpenImageOptions {
  /** `qcow2`, `raw`, or undefined to probe the magic. Give it for untrusted raw files. */
  format?: ImageFormat;
}

/** A disk image opened for reading: qcow2 (any chain) or raw. */
export interface DiskImage {
  /** `qcow2` or `raw`. */
  readonly format: ImageFormat;
  /** The path as given. */
  readonly path: string;
  /** Guest size in bytes. */
  readonly virtualSize: number;
  /** qcow2 cluster size; 64 KiB for raw files (the granularity extents and exports use). */
  readonly clusterSize: number;
  /** The parsed qcow2 header (undefined for raw). */
  readonly header: ParsedHeader | undefined;
  /** The opened backing image, if any. */
  readonly backing: DiskImage | undefined;
  /** The data file actually opened (after the path policy), if the image has one. */
  readonly dataFilePath: string | undefined;
  /** Warnings raised so far (each once), also passed to `onWarning`. */
  readonly warnings: readonly string[];
  /** Reads `length` guest bytes at `offset` into a new buffer. */
  read(offset: number, length: number): Promise<Uint8Array>;
  /** Reads `target.length` guest bytes at `offset` into `target`. */
  readInto(target: Uint8Array, offset: number): Promise<void>;
  /**
   * Coalesced extents covering [start, end) (default: the whole image), in order: an ix
   * AsyncIterableX, so `image.extents().pipe(filter((e) => e.data), map(…))` works.
   */
  extents(start?: number, end?: number): AsyncIterableX<Extent>;
  /** Closes every file of the chain. */
  close(): Promise<void>;
  /** {@link close}, for `await using image = await openImage(path)`: the image closes when the block ends. */
  [Symbol.asyncDispose](): Promise<void>;
}

/**
 * Opens a qcow2 image for reading, with its data file and backing chain.
 *
 * Names stored in the image go through the path policy unless `options.dataFile` /
 * `options.backing` name the files explicitly. Throws a typed error (see src/errors.ts) for
 * anything the reader refuses; nothing stays open after a failure.
 */
export async function openImage(path: string, options: OpenImageOptions = {}): Promise<DiskImage> {
  checkPath(path, 'image');
  checkOptionsObject(options, 'openImage()', false);
  const context = newContext(options);
  return openQcow2(path, context, 0, options.dataFile, options.backing, options.backingFormat);
}

/**
 * Opens a qcow2 or raw image. Without `options.format` the format is probed from the magic
 * (probing is safe here because a qcow2's stored names still pass the path policy); pass
 * `format: 'raw'` for raw files from untrusted sources, so a planted qcow2 header is not obeyed.
 */
export async function openDisk(path: string, options: OpenDiskOptions = {}): Promise<DiskImage> {
  checkPath(path, 'image');
  checkOptionsObject(options, 'openDisk()', false);
  const context = newContext(options);
  const format = options.format ?? (await probeFormat(path, { onWarning: context.warn }));
  switch (format) {
    case 'qcow2':
      return openQcow2(path, context, 0, options.dataFile, options.backing, options.backingFormat);
    case 'raw':
      return openRaw(path, context);
    case 'vpc':
      refuseDataFile(options, format);
      return openVhd(path, context, 0, options.backing);
    case 'vmdk':
      refuseDataFile(options, format);
      return openVmdk(path, context, 0, options.backing);
    case 'vhdx':
      refuseDataFile(options, format);
      return openVhdx(path, context, 0, options.backing);
  }
}

/** --data-file is a qcow2 notion: refused for other formats rather than silently ignored. */
function refuseDataFile(options: OpenDiskOptions, format: ImageFormat): void {
  if (options.dataFile !== undefined) throw new InvalidArgumentError(`A data file was given, but a ${format} image has no external data file`, { hint: 'Leave out --data-file (API: dataFile)' });
}
