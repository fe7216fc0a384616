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
import { DedupUnsupportedError, InvalidArgumentError } from '../errors.js';
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
  /** Clusters not stored because they are all zeros. */
  zeroClusters: number;
}

/**
 * What every writer of an image reports (convert, wrap, and the external and internal sinks):
 * the same names for the same things, whichever made the image.
 */
export interface WriteSummary extends ImageShape {
  /** `external`: metadata plus a data file; `internal`: one self-contained file. */
  layout: 'external' | 'internal';
  /** Guest bytes taken in (the input size). */
  inputBytes: number;
  /** Clusters sharing an earlier cluster's storage (dedup; always 0 with a data file). */
  duplicateClusters: number;
  /** Clusters equal to the backing file, left unallocated (overlays). Not counted in `zeroClusters`. */
  unchangedClusters: number;
  /** Bytes of guest data written (to the data file, or inside the image). */
  dataBytesWritten: number;
  /** Bytes of metadata written (the metadata file, or the image's metadata clusters). */
  metadataBytesWritten: number;
  /** The data file's path, when it is one (external layout). */
  dataFile: string | undefined;
  /** The data-file name stored in the header (external layout). */
  dataFileName: string | undefined;
  /** What the run warned about (e.g. a stored data-file name our readers will refuse), also given to `onWarning`. */
  warnings: readonly string[];
  /** Wall-clock seconds. */
  seconds: number;
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

/**
 * Throws DedupUnsupportedError when dedup cannot share anything at this refcount width: a
 * 1-bit refcount counts one reference at most, so no cluster could ever be shared (silently
 * writing every copy would look like dedup found nothing).
 */
export function checkDedupSharing(settings: Pick<ImageSettings, 'refcountOrder'>): void {
  if (settings.refcountOrder === 0) {
    throw new DedupUnsupportedError('Dedup cannot share clusters with 1-bit refcounts: a shared cluster needs a refcount of 2 or more', {
      hint: 'Use a refcount width of 2 bits or more (--refcount-bits, refcountBits in the API; the default is 16)',
    });
  }
}
