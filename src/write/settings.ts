/**
 * The image parameters every writer entry point takes (cluster size, refcount width, raw bit),
 * validated once into the numbers the codec wants.
 */

import {
  AUTOCLEAR_DATA_FILE_RAW,
  checkClusterBits,
  DEFAULT_CLUSTER_BITS,
  DEFAULT_REFCOUNT_ORDER,
  encodeHeaderCluster,
  INCOMPAT_DATA_FILE,
  MAX_REFCOUNT_ORDER,
} from '../format/index.js';
import { InvalidArgumentError } from '../errors.js';
import { describeValue } from '../internal/arguments.js';

/** Image parameters a caller may choose. */
export interface ImageOptions {
  /** Bytes per cluster: a power of two from 512 to 2 MiB. Default 65536. */
  clusterSize?: number;
  /** Bits per refcount: 1, 2, 4, 8, 16, 32 or 64. Default 16. */
  refcountBits?: number;
  /**
   * Set the raw-external-data bit (like `qemu-img -o data_file_raw=on`): every L2 entry is
   * allocated and the data file alone is the guest image. Default true. When false, zero
   * clusters are left unallocated so readers and `qemu-img map` see the holes.
   */
  dataFileRaw?: boolean;
}

/** What every writer reports about the image it made (convert, wrap and the sinks extend it). */
export interface ImageShape {
  /** The image's virtual size: the input rounded up to 512. */
  virtualSize: number;
  /** Bytes per cluster. */
  clusterSize: number;
  /** Bits per refcount entry. */
  refcountBits: number;
  /** The raw-data-file bit. */
  dataFileRaw: boolean;
  /** Guest clusters of the image. */
  clusters: number;
  /** Clusters mapped to stored data. */
  dataClusters: number;
  /** Clusters not stored (all-zero; for the sink, also those unchanged from a backing file). */
  zeroClusters: number;
}

/** Validated image parameters. */
export interface ImageSettings {
  /** log2 of the cluster size. */
  clusterBits: number;
  /** Bytes per cluster. */
  clusterSize: number;
  /** log2 of the refcount width in bits. */
  refcountOrder: number;
  /** The raw-data-file bit. */
  dataFileRaw: boolean;
}

/** Validates the caller's choices; throws InvalidArgumentError naming the bad value. */
export function resolveImageSettings(options: ImageOptions): ImageSettings {
  const clusterSize = options.clusterSize ?? 2 ** DEFAULT_CLUSTER_BITS;
  // typeof first: Math.log2('65536') is 16, and a string cluster size would concatenate later.
  const clusterBits = typeof clusterSize === 'number' ? Math.log2(clusterSize) : Number.NaN;
  if (!Number.isInteger(clusterBits)) {
    throw new InvalidArgumentError(`Invalid cluster size ${describeValue(clusterSize)}: it must be a power of two from 512 bytes to 2 MiB`);
  }
  try {
    checkClusterBits(clusterBits);
  } catch {
    throw new InvalidArgumentError(`Invalid cluster size ${describeValue(clusterSize)}: it must be a power of two from 512 bytes to 2 MiB`);
  }
  const refcountBits = options.refcountBits ?? 2 ** DEFAULT_REFCOUNT_ORDER;
  const refcountOrder = typeof refcountBits === 'number' ? Math.log2(refcountBits) : Number.NaN;
  if (!Number.isInteger(refcountOrder) || refcountOrder < 0 || refcountOrder > MAX_REFCOUNT_ORDER) {
    throw new InvalidArgumentError(`Invalid refcount width ${describeValue(refcountBits)} bits: it must be 1, 2, 4, 8, 16, 32 or 64`);
  }
  if (options.dataFileRaw !== undefined && typeof options.dataFileRaw !== 'boolean') {
    throw new InvalidArgumentError(`dataFileRaw must be true or false, not ${describeValue(options.dataFileRaw)}`);
  }
  return { clusterBits, clusterSize, refcountOrder, dataFileRaw: options.dataFileRaw ?? true };
}

/** Feature bits of a data-file image: incompatible bit 2, plus autoclear bit 1 in raw mode (pitfall P1). */
export function featureBits(settings: ImageSettings): { incompatibleFeatures: bigint; autoclearFeatures: bigint } {
  return {
    incompatibleFeatures: INCOMPAT_DATA_FILE,
    autoclearFeatures: settings.dataFileRaw ? AUTOCLEAR_DATA_FILE_RAW : 0n,
  };
}

/**
 * Throws InvalidArgumentError when the data-file name cannot be stored: empty, containing a
 * NUL, or too long for cluster 0 at this cluster size.
 */
export function checkDataFileName(name: string, settings: ImageSettings): void {
  if (name.length === 0) throw new InvalidArgumentError('The data-file name stored in the image cannot be empty');
  if (name.includes('\0')) throw new InvalidArgumentError('The data-file name stored in the image cannot contain a NUL byte');
  // Encoding a header with placeholder numbers is the exact test: the fields are fixed-size.
  encodeHeaderCluster({
    clusterBits: settings.clusterBits,
    size: 0,
    l1Size: 0,
    l1TableOffset: 0,
    refcountTableOffset: 0,
    refcountTableClusters: 0,
    refcountOrder: settings.refcountOrder,
    ...featureBits(settings),
    dataFileName: name,
  });
}
